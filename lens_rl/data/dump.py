"""Activation dumps: capture ``A`` at block ``L`` over a corpus and store safetensors shards.

Layout (one folder per model and layer, one per split)::

    <output_dir>/<model name>/layer_<L>/<split>/
        metadata.json                 model, layer, positions, seed, counts, dtype, shard list
        stats.safetensors             per-feature mean and variance of A over the split
        rank_<r>/shard_<start>.safetensors   A, input_ids, token_pos, index, a_prime_index

Shard ``s`` (rows ``[s * shard_size, (s + 1) * shard_size)``) belongs to process
``s % world_size``, so ``accelerate launch --num_processes N`` splits the work and each
process writes its own folder. A shard is written to a temporary name and renamed when
complete: rerunning the same command skips finished shards (resume after interruption).
``A'`` is stored as an index into the same split (``a_prime_index``), not as a copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_rl.config import ConfigError, ValidatedConfig
from lens_rl.data.corpus import iter_corpus
from lens_rl.data.shards import DTYPES, FORMAT_VERSION, read_header, stream_shard, tensors_digest
from lens_rl.data.windows import WindowSet, build_windows, tokenize_corpus
from lens_rl.models.fingerprint import base_fingerprints
from lens_rl.models.hooks import resolve_layer
from lens_rl.models.loading import ModelLoadingArguments
from lens_rl.models.orig import OrigWrapper
from lens_rl.utils.files import decode_utf8, iter_jsonl
from lens_rl.utils.progress import progress_bar


@dataclass
class CorpusConfig(ValidatedConfig):
    """Where the text comes from: exactly one of a built-in corpus, a dataset name, or files."""

    corpus: Literal["pydoc", "stdlib", "both"] | None = field(
        default=None, metadata={"help": "Built-in offline corpus: pydoc topics, stdlib sources, or both."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` dataset name or local folder (must be cached offline)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name to read."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt, .jsonl/.json or .parquet files."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})

    def validate(self) -> None:
        """Exactly one source."""
        given = [n for n in ("corpus", "dataset_name", "data_files") if getattr(self, n)]
        if len(given) != 1:
            raise ConfigError(
                f"Give exactly one text source (corpus, dataset_name or data_files); got {given or 'none'}."
            )


def load_texts(cfg: CorpusConfig) -> list[str]:
    """Read the documents of the configured source (``None`` for a missing text).

    Raises:
        ConfigError: a data file is missing, empty, unreadable (naming ``file:line`` where the
            problem is a line), lacks ``text_column``, holds no text in it, or holds values of
            another type there (numbers).
    """
    if cfg.corpus:
        return list(iter_corpus(cfg.corpus))
    import datasets

    if cfg.dataset_name:
        ds = datasets.load_dataset(cfg.dataset_name, split=cfg.dataset_split)
        return _text_values(ds, cfg.text_column, f"dataset {cfg.dataset_name} (split {cfg.dataset_split})")
    exts = {Path(f).suffix.lower() for f in cfg.data_files or []}
    kinds = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if len(exts) != 1 or next(iter(exts)) not in kinds:
        raise ConfigError(f"data_files must share one extension among {sorted(kinds)}, got {sorted(exts)}.")
    kind = kinds[exts.pop()]
    texts: list[str] = []
    for f in cfg.data_files or []:  # one file at a time, so that every error names its file
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"data_files: {path}: no such file.")
        if path.stat().st_size == 0:
            raise ConfigError(f"data_files: {path} is empty.")
        try:
            ds = datasets.load_dataset(kind, data_files=[str(path)], split="train")
        except Exception as e:  # datasets' own errors name neither the file nor the line
            raise ConfigError(f"data_files: {_unreadable(path, kind, e)}") from e
        texts += _text_values(ds, cfg.text_column, str(path))
    return texts


def _unreadable(path: Path, kind: str, error: Exception) -> str:
    """Why ``path`` could not be read as ``kind``: the first line that is not UTF-8 or not JSON
    (``file:line: ...``), else the loader's own reason."""

    try:
        if kind == "text" or path.suffix.lower() == ".json":
            text = decode_utf8(path.read_bytes(), path)
            if kind == "json":
                try:
                    json.loads(text)
                except json.JSONDecodeError as e:
                    return f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})."
        elif path.suffix.lower() == ".jsonl":
            for _ in iter_jsonl(path):
                pass
    except ValueError as e:
        return str(e)
    cause = error.__cause__ or error.__context__ or error
    return f"{path} cannot be read as {kind} ({type(cause).__name__}: {cause})."


def _text_values(ds, column: str, where: str) -> list[str]:
    """``ds[column]``, checked: the column exists, holds strings, and some text."""
    from datasets import Value

    if column not in ds.column_names:
        raise ConfigError(
            f"Column {column!r} not in the columns {ds.column_names} of {where}; set text_column to one of them."
        )
    feature = ds.features[column]
    dtype = feature.dtype if isinstance(feature, Value) else type(feature).__name__
    if dtype == "null":
        raise ConfigError(f"{where} holds no text: every value of field {column!r} is null.")
    if dtype not in ("string", "large_string"):
        raise ConfigError(
            f"{where}: field {column!r} holds {dtype} values, not text; point text_column at a text field."
        )
    values = ds[column]
    if not any(v and v.strip() for v in values):
        raise ConfigError(f"{where} holds no text: field {column!r} is empty or blank in every row.")
    return list(values)


@dataclass
class DumpConfig(CorpusConfig, ModelLoadingArguments):
    """Options of ``scripts/dump_activations.py``."""

    model_name_or_path: str = field(default="", metadata={"help": "Local folder of the original model."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Local tokenizer folder (default: the model folder)."}
    )
    layer: int = field(
        default=0, metadata={"help": "Block L whose output is A (negative counts from the end)."}
    )
    seq_len: int = field(default=64, metadata={"help": "Tokens per context window."})
    min_pos: int = field(default=4, metadata={"help": "Smallest position P at which A is read."})
    position_strategy: Literal["random", "last", "midpoint"] = field(
        default="random", metadata={"help": "How P is chosen in [min_pos, seq_len - 1]."}
    )
    num_train: int = field(default=1024, metadata={"help": "Training samples."})
    num_val: int = field(default=256, metadata={"help": "Validation samples."})
    shard_size: int = field(default=4096, metadata={"help": "Samples per shard file."})
    batch_size: int = field(default=64, metadata={"help": "Windows per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the window order, positions and A' choice."})
    dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "Storage dtype of A."}
    )
    output_dir: str = field(default="outputs/activations", metadata={"help": "Root folder of the dumps."})

    def validate(self) -> None:
        """Check the source, the model path and the sizes."""
        super().validate()
        self.check_model_loading()
        if not self.model_name_or_path:
            raise ConfigError("DumpConfig.model_name_or_path is required (a local model folder).")
        for name in ("seq_len", "num_train", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DumpConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_val < 0:
            raise ConfigError(f"DumpConfig.num_val must be >= 0, got {self.num_val}.")
        if not 0 <= self.min_pos < self.seq_len:
            raise ConfigError(
                f"DumpConfig.min_pos must be in [0, seq_len={self.seq_len}), got {self.min_pos}."
            )


def split_dir(output_dir: str | Path, model_name_or_path: str, layer: int, split: str) -> Path:
    """``<output_dir>/<model folder name>/layer_<L>/<split>``."""
    return Path(output_dir) / Path(model_name_or_path.rstrip("/")).name / f"layer_{layer}" / split


def _shard_name(start: int) -> str:
    return f"shard_{start:09d}.safetensors"


def _content_config(cfg: DumpConfig) -> dict:
    """The config fields that decide a shard's content (not where it is written or how fast)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "batch_size")}


def _same_path(a: object, b: object) -> bool:
    """Two model references name the same local folder (``./m`` vs ``/abs/m``)."""
    if not (isinstance(a, str) and isinstance(b, str)) or not (Path(a).is_dir() and Path(b).is_dir()):
        return False
    return Path(a).resolve() == Path(b).resolve()


def _config_diff(theirs: dict, mine: dict) -> list[str]:
    """Content fields whose values differ; a field one side lacks (written by an older or newer
    version) counts as its default value. A model or tokenizer folder given by another spelling
    of the same path is the same value (the weights themselves are checked by fingerprint)."""
    import dataclasses

    defaults = {
        f.name: f.default for f in dataclasses.fields(DumpConfig) if f.default is not dataclasses.MISSING
    }
    missing = object()
    out = []
    for k in sorted(set(theirs) | set(mine)):
        if k in ("output_dir", "batch_size"):
            continue
        a, b = theirs.get(k, defaults.get(k, missing)), mine.get(k, defaults.get(k, missing))
        if a != b and not (k in ("model_name_or_path", "tokenizer_name_or_path") and _same_path(a, b)):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_fingerprint(where: Path, recorded: str | None, fingerprints: tuple[str, ...]) -> None:
    """Refuse a dump made from other weights under the same model path (a retrained or replaced
    model folder): its activations would silently be mixed with, or stand in for, this model's.
    ``fingerprints``: the model's, then any an older version recorded for it
    (:func:`~lens_rl.models.lens.base_fingerprints`)."""
    if recorded is not None and recorded not in fingerprints:
        raise ConfigError(
            f"{where} was dumped from other weights at the same model path (base fingerprint "
            f"{recorded}; the model there now has {fingerprints[0]}). Its activations do not belong to "
            f"this model: use another output_dir, or delete {where} to redo the dump."
        )


def _check_existing_shards(rank_dir: Path, cfg: DumpConfig, fingerprints: tuple[str, ...]) -> None:
    """Refuse to add to shards written with another config (a rerun with a new seed, positions,
    model, ...), naming the fields that differ, or from other weights (``base_fingerprint``)."""
    mine = _content_config(cfg)
    for path in sorted(rank_dir.glob("shard_*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ConfigError(f"Existing shard {path} cannot be read ({e}); delete it to redo it.") from e
        _check_fingerprint(rank_dir.parent, meta.get("base_fingerprint"), fingerprints)
        if meta.get("config_hash") == _config_hash(mine):
            continue
        if "config" not in meta and (rank_dir.parent / "metadata.json").exists():
            continue  # a finished dump of an older version, whose metadata.json config matched
        diff = _config_diff(json.loads(meta.get("config", "{}")), mine)
        if not diff and "config" in meta:
            continue  # same content config, written by another version
        raise ConfigError(
            f"{path} was written by a dump with another config (differing fields: "
            f"{', '.join(diff) or 'not recorded (an older dump)'}); "
            f"use another output_dir, or delete {rank_dir.parent} to redo the dump."
        )


def _lock_rank_dir(rank_dir: Path) -> IO:
    """Exclusive lock on ``rank_dir`` for this process (a second concurrent dump is refused)."""
    lock = (rank_dir / ".lock").open("a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        raise ConfigError(
            f"{rank_dir} is being written by another dump (it holds {rank_dir / '.lock'})."
        ) from e
    return lock


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a shard file either is complete or does not exist


def _dump_split(
    orig,
    windows: WindowSet,
    cfg: DumpConfig,
    layer: int,
    out: Path,
    rank: int,
    world: int,
    device,
    show: bool,
    fingerprints: tuple[str, ...],
) -> None:
    n = len(windows)
    n_shards = math.ceil(n / cfg.shard_size)
    mine = [s for s in range(n_shards) if s % world == rank]
    rank_dir = out / f"rank_{rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_rank_dir(rank_dir)  # held until this split is written
    _check_existing_shards(rank_dir, cfg, fingerprints)
    content = _content_config(cfg)
    todo = [s for s in mine if not (rank_dir / _shard_name(s * cfg.shard_size)).exists()]
    total = sum(min(cfg.shard_size, n - s * cfg.shard_size) for s in todo)
    with progress_bar(f"dump {out.name} (rank {rank})", total=total, enabled=show) as advance:
        for s in todo:
            start, stop = s * cfg.shard_size, min((s + 1) * cfg.shard_size, n)
            acts = []
            for b in range(start, stop, cfg.batch_size):
                e = min(b + cfg.batch_size, stop)
                ids = windows.input_ids[b:e].to(device)
                acts.append(
                    orig.capture(ids, layer, windows.token_pos[b:e].to(device)).to(DTYPES[cfg.dtype]).cpu()
                )
                advance(e - b)
            tensors = {
                "A": torch.cat(acts),
                "input_ids": windows.input_ids[start:stop].to(torch.int32),
                "token_pos": windows.token_pos[start:stop],
                "index": torch.arange(start, stop),
                "a_prime_index": windows.a_prime_index[start:stop],
            }
            meta = {
                "layer": str(layer),
                "start": str(start),
                "count": str(stop - start),
                "format": str(FORMAT_VERSION),
                "config": json.dumps(content, sort_keys=True, default=str),
                "config_hash": _config_hash(content),
                "sha256": tensors_digest(tensors),
                "base_fingerprint": fingerprints[0],
            }
            _write_shard(rank_dir / _shard_name(start), tensors, meta)
    lock.close()


def _finalize_split(
    out: Path, cfg: DumpConfig, layer: int, n: int, d_model: int, world: int, split: str, fingerprint: str
) -> None:
    shards = []
    total = torch.zeros(d_model, dtype=torch.float64)
    total_sq = torch.zeros(d_model, dtype=torch.float64)

    def add(name: str, first_row: int, a: torch.Tensor) -> None:
        a = a.to(torch.float64)
        total.add_(a.sum(0))
        total_sq.add_((a * a).sum(0))

    for path in sorted(out.glob("rank_*/shard_*.safetensors")):
        header = read_header(path)
        meta = header.metadata
        stream_shard(header, add, names=["A"])  # one bounded chunk in memory at a time
        shards.append(
            {"file": str(path.relative_to(out)), "start": int(meta["start"]), "count": int(meta["count"])}
        )
    counted = sum(s["count"] for s in shards)
    if counted != n:
        raise RuntimeError(
            f"{out}: shards hold {counted} samples, expected {n}; rerun the dump to finish it."
        )
    mean = total / max(n, 1)
    var = total_sq / max(n, 1) - mean * mean
    save_file({"mean": mean.float(), "var": var.clamp(min=0).float()}, str(out / "stats.safetensors"))
    metadata = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "model_name_or_path": cfg.model_name_or_path,
        "base_fingerprint": fingerprint,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path or cfg.model_name_or_path,
        "layer": layer,
        "d_model": d_model,
        "seq_len": cfg.seq_len,
        "min_pos": cfg.min_pos,
        "position_strategy": cfg.position_strategy,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "num_samples": n,
        "shard_size": cfg.shard_size,
        "world_size": world,
        "shards": sorted(shards, key=lambda s: s["start"]),
        "config": asdict(cfg),
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2))


def dump_windows(cfg: DumpConfig, tokenizer) -> dict[str, WindowSet]:
    """The train/val windows a dump config describes (shared by the dumper and on-the-fly data)."""
    stream = tokenize_corpus(load_texts(cfg), tokenizer)
    return build_windows(
        stream,
        cfg.seq_len,
        cfg.num_train,
        cfg.num_val,
        min_pos=cfg.min_pos,
        strategy=cfg.position_strategy,
        seed=cfg.seed,
    )


def run_dump(cfg: DumpConfig) -> dict[str, Path]:
    """Dump train and val activations; returns the split folders. Works under ``accelerate launch``."""
    import torch.cuda
    from accelerate import PartialState
    from transformers import AutoTokenizer

    # On a machine without CUDA, `accelerate launch --multi_gpu` starts N processes that must run
    # as MULTI_CPU (gloo); PartialState only picks that when told cpu=True.
    state = PartialState(cpu=not torch.cuda.is_available())
    cfg.check_model_folders()  # local folders only: no Hub lookup for a mistyped path
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    orig = OrigWrapper.from_pretrained(cfg.model_name_or_path, **cfg.load_kwargs()).to(state.device)
    layer = resolve_layer(cfg.layer, orig.n_layers, "DumpConfig.layer")
    d_model = orig.model.get_input_embeddings().weight.shape[1]
    fingerprints = base_fingerprints(orig.model)  # the current one first
    splits = dump_windows(cfg, tok)
    outs = {}
    for split, windows in splits.items():
        if len(windows) == 0:
            continue
        out = split_dir(cfg.output_dir, cfg.model_name_or_path, layer, split)
        if state.is_main_process and (out / "metadata.json").exists():
            prev = json.loads((out / "metadata.json").read_text())
            _check_fingerprint(out, prev.get("base_fingerprint"), fingerprints)
            diff = _config_diff(prev["config"], asdict(cfg))
            if diff:
                raise ConfigError(
                    f"{out} holds a dump made with a different config ({', '.join(diff)}); use another "
                    "output_dir."
                )
        _dump_split(
            orig,
            windows,
            cfg,
            layer,
            out,
            state.process_index,
            state.num_processes,
            state.device,
            show=state.is_main_process,
            fingerprints=fingerprints,
        )
        outs[split] = out
    state.wait_for_everyone()
    if state.is_main_process:
        for split, out in outs.items():
            _finalize_split(
                out, cfg, layer, len(splits[split]), d_model, state.num_processes, split, fingerprints[0]
            )
    state.wait_for_everyone()
    return outs
