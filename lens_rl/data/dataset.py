"""Datasets of activation records: from dumps on disk, or computed on the fly.

Both yield the same record: ``input_ids`` ``(S,)`` (the context window; ``A`` is read after
token ``token_pos``), ``token_pos``, ``index``, ``a_prime_index`` and, for dumps, ``A`` and
``A_prime`` (fp32). The on-the-fly dataset leaves ``A``/``A_prime`` to :func:`materialize`,
which the trainer calls on each batch with the orig model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from lens_rl.config import InputError
from lens_rl.data.shards import (
    DTYPES,
    FORMAT_VERSION,
    FileCache,
    ShardedRows,
    ShardFormatError,
    ShardHeader,
    read_header,
    stream_shard,
)
from lens_rl.models.fingerprint import base_fingerprints

if TYPE_CHECKING:  # windows imports transformers; the dump reader does not need it
    from lens_rl.data.windows import WindowSet

REQUIRED_KEYS = ("A", "input_ids", "token_pos", "index", "a_prime_index")
# Larger magnitudes in A are taken for corruption (a flipped exponent bit gives ~1e37); the
# largest "massive activations" reported in LLM residual streams are ~1e4.
MAX_ABS_ACTIVATION = 1e8


class DumpError(InputError):
    """A dump folder is missing, incomplete, corrupted or inconsistent with its metadata."""


class _Moments:
    """Running per-feature sum and sum of squares (float64) of A, chunk by chunk."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.total = torch.zeros(d, dtype=torch.float64)
        self.total_sq = torch.zeros(d, dtype=torch.float64)

    def add(self, a: torch.Tensor) -> None:
        a = a.double()
        self.n += a.shape[0]
        self.total += a.sum(0)
        self.total_sq += (a * a).sum(0)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / max(self.n, 1)
        var = (self.total_sq / max(self.n, 1) - mean * mean).clamp(min=0)
        return mean.float(), var.float()


class ActivationDataset(Dataset):
    """Activation records of one split of a dump (single- or multi-process), read lazily.

    Every shard listed in ``metadata.json`` is checked when the dataset is built (keys, shapes,
    dtype, layer, index coverage, content checksum, finite and plausible ``A``, positions and
    ``A'`` indices in range), one bounded chunk at a time, so a bad dump fails before training
    starts and the check's memory does not grow with the dump. Afterwards ``A``, ``input_ids``,
    ``token_pos`` and ``a_prime_index`` are :class:`~lens_rl.data.shards.ShardedRows` views:
    indexing them (``store.A[idx]``, ``store.input_ids[idx, store.token_pos[idx]]``) reads only
    those rows from disk, so resident memory stays flat in the number of activations. ``A`` is
    returned in its storage dtype (``float32``, ``float16`` or ``bfloat16``); records upcast it
    to fp32.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.exists():
            raise DumpError(
                f"{self.path} has no metadata.json: not a finished dump. Run scripts/dump_activations.py "
                "(rerunning it resumes an interrupted dump)."
            )
        try:
            self.metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DumpError(f"{meta_path} is not valid JSON: {e}") from e
        md = self.metadata
        if md.get("format_version") != FORMAT_VERSION:
            raise DumpError(f"{meta_path}: format_version {md.get('format_version')} != {FORMAT_VERSION}.")
        n, d, s_len = md["num_samples"], md["d_model"], md["seq_len"]
        self.layer: int = md["layer"]
        dtype = DTYPES[md["dtype"]]
        shards = sorted(md["shards"], key=lambda s: s["start"])
        headers = []
        covered = 0
        for shard in shards:
            file = self.path / shard["file"]
            if not file.exists():
                raise DumpError(f"Shard {file} listed in {meta_path} is missing.")
            try:
                header = read_header(file)
            except (ShardFormatError, OSError) as e:
                raise DumpError(f"Shard {file} cannot be read (corrupted or truncated): {e}") from e
            missing = [k for k in REQUIRED_KEYS if k not in header.tensors]
            if missing:
                raise DumpError(f"Shard {file} lacks tensors {missing}.")
            c, start = shard["count"], shard["start"]
            if start != covered:
                raise DumpError(
                    f"Shard {file} starts at sample {start}; the shards before it end at {covered} "
                    f"(samples [{min(start, covered)}, {max(start, covered)}) are in no shard or in two)."
                )
            covered = start + c
            expect = {
                "A": (c, d),
                "input_ids": (c, s_len),
                "token_pos": (c,),
                "index": (c,),
                "a_prime_index": (c,),
            }
            for k, shape in expect.items():
                if header.tensors[k].shape != shape:
                    raise DumpError(
                        f"Shard {file}: {k} has shape {header.tensors[k].shape}, metadata implies {shape}."
                    )
            if header.tensors["A"].dtype != dtype:
                raise DumpError(
                    f"Shard {file}: A is {header.tensors['A'].dtype}, metadata says {md['dtype']}."
                )
            if int(header.metadata.get("layer", self.layer)) != self.layer:
                raise DumpError(
                    f"Shard {file} was captured at layer {header.metadata.get('layer')}, metadata says "
                    f"{self.layer}."
                )
            headers.append(header)
        if covered != n:
            raise DumpError(f"{self.path}: {n - covered} of {n} samples are in no shard.")
        stats_path = self.path / "stats.safetensors"
        sums = None if stats_path.exists() else _Moments(d)
        self._ids_range = [None, None]
        for shard, header in zip(shards, headers, strict=True):
            self._check_shard(header, shard["start"], n, s_len, sums)
        self._files = FileCache()
        starts = [s["start"] for s in shards]
        self.A = ShardedRows("A", headers, starts, self._files)
        self.input_ids = ShardedRows("input_ids", headers, starts, self._files)
        self.token_pos = ShardedRows("token_pos", headers, starts, self._files)
        self.a_prime_index = ShardedRows("a_prime_index", headers, starts, self._files)
        if sums is None:
            try:
                with safe_open(str(stats_path), "pt") as f:
                    self.mean, self.var = f.get_tensor("mean"), f.get_tensor("var")
            except Exception as e:
                raise DumpError(f"{stats_path} cannot be read (corrupted or truncated): {e}") from e
            if self.mean.shape != (d,) or self.var.shape != (d,):
                raise DumpError(f"{stats_path}: mean/var must have shape ({d},).")
            if not (torch.isfinite(self.mean).all() and torch.isfinite(self.var).all()):
                raise DumpError(f"{stats_path}: mean or var contains NaN or inf.")
            if bool((self.var <= 0).any()):
                raise DumpError(
                    f"{stats_path}: var has {int((self.var <= 0).sum())} zero or negative entries; the "
                    "reconstruction loss divides by the variance. Recompute the statistics (rerun the dump)."
                )
        else:
            self.mean, self.var = sums.mean_var()

    def _check_shard(
        self, header: ShardHeader, start: int, n: int, s_len: int, sums: _Moments | None
    ) -> None:
        """Stream one shard: checksum, index coverage, finite and plausible A, positions and A'
        indices in range, token id range; accumulate the moments of A when there is no stats file."""
        file = header.path

        def on_chunk(name: str, r: int, t: torch.Tensor) -> None:
            first = start + r
            if name == "A":
                a = t.float()
                finite = torch.isfinite(a).all(dim=1)
                if not bool(finite.all()):
                    i = first + int((~finite).nonzero()[0])
                    raise DumpError(f"Shard {file}: A of sample {i} contains NaN or inf.")
                big = a.abs().amax(dim=1)
                if bool((big > MAX_ABS_ACTIVATION).any()):
                    k = int(big.argmax())
                    raise DumpError(
                        f"Shard {file}: sample {first + k} has |A| = {float(big[k]):.3g} > "
                        f"{MAX_ABS_ACTIVATION:g} (a corrupted value; residual streams stay far below this)."
                    )
                if sums is not None:
                    sums.add(t)
            elif name == "index":
                if not torch.equal(t.long(), torch.arange(first, first + t.shape[0])):
                    c = header.tensors["index"].shape[0]
                    raise DumpError(f"Shard {file}: index does not cover [{start}, {start + c}).")
            elif name == "token_pos":
                bad = (t < 0) | (t >= s_len)
                if bool(bad.any()):
                    k = int(bad.nonzero()[0])
                    raise DumpError(
                        f"Shard {file}: token_pos {int(t[k])} of sample {first + k} outside the window "
                        f"[0, {s_len})."
                    )
            elif name == "a_prime_index":
                bad = (t < 0) | (t >= n)
                if bool(bad.any()):
                    k = int(bad.nonzero()[0])
                    raise DumpError(
                        f"Shard {file}: a_prime_index {int(t[k])} of sample {first + k} outside [0, {n})."
                    )
            elif name == "input_ids" and t.numel():
                lo, hi = int(t.min()), int(t.max())
                cur_lo, cur_hi = self._ids_range
                self._ids_range = [
                    lo if cur_lo is None else min(lo, cur_lo),
                    hi if cur_hi is None else max(hi, cur_hi),
                ]

        want = header.metadata.get("sha256")
        try:
            got = stream_shard(header, on_chunk, digest=want is not None)
        except (ShardFormatError, OSError) as e:
            raise DumpError(f"Shard {file} cannot be read (corrupted or truncated): {e}") from e
        if want is not None and got != want:
            raise DumpError(
                f"Shard {file}: content checksum mismatch (the file changed after it was written); "
                "delete it and rerun the dump to redo it."
            )

    def __len__(self) -> int:
        return len(self.A)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.a_prime_index[i])
        return {
            "A": self.A[i].float(),
            "A_prime": self.A[j].float(),
            "input_ids": self.input_ids[i].long(),
            "token_pos": self.token_pos[i],
            "index": torch.tensor(i),
            "a_prime_index": self.a_prime_index[i],
            "prime_input_ids": self.input_ids[j].long(),
            "prime_token_pos": self.token_pos[j],
        }

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """The records of ``indices`` (what ``__getitem__`` gives for each), read in one pass per
        tensor: ``DataLoader`` calls this for a whole batch instead of one read per record."""
        i = torch.as_tensor(indices, dtype=torch.long)
        j = self.a_prime_index[i]
        both = torch.cat([i, j])
        a = self.A[both].float()
        ids = self.input_ids[both].long()
        pos = self.token_pos[both]
        n = len(indices)
        return [
            {
                "A": a[k],
                "A_prime": a[n + k],
                "input_ids": ids[k],
                "token_pos": pos[k],
                "index": i[k],
                "a_prime_index": j[k],
                "prime_input_ids": ids[n + k],
                "prime_token_pos": pos[n + k],
            }
            for k in range(n)
        ]

    def check_compatible(
        self,
        d_model: int,
        layer: int | None = None,
        vocab_size: int | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        """Raise :class:`DumpError` if the dump's width, layer or token ids do not fit the model,
        or (``model`` given, dump recording ``base_fingerprint``) if it was dumped from other
        weights: a same-shaped model would otherwise train on activations that are not its own."""
        if self.metadata["d_model"] != d_model:
            raise DumpError(f"{self.path}: d_model {self.metadata['d_model']} != the model's {d_model}.")
        recorded = self.metadata.get("base_fingerprint")
        if model is not None and recorded is not None:
            mine = base_fingerprints(model)  # the same for an fp32, bf16 or fp16 load
            if recorded not in mine:
                raise DumpError(
                    f"{self.path} was dumped from {self.metadata.get('model_name_or_path')!r} (fingerprint "
                    f"{recorded}), not from the model given (fingerprint {mine[0]}): its activations are "
                    "another model's. Dump this model's activations, or give the model the dump came from."
                )
        if vocab_size is not None:
            lo, hi = self._ids_range
            if lo < 0 or hi >= vocab_size:
                raise DumpError(
                    f"{self.path}: token ids span [{lo}, {hi}], outside the model's vocabulary of {vocab_size}."
                )
        if layer is not None and layer != self.layer:
            raise DumpError(f"{self.path}: dumped at layer {self.layer}, training expects layer {layer}.")


class OnTheFlyDataset(Dataset):
    """Windows and positions only; :func:`materialize` computes ``A`` and ``A'`` per batch."""

    def __init__(self, windows: WindowSet, layer: int) -> None:
        self.windows = windows
        self.layer = layer

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.windows
        j = int(w.a_prime_index[i])
        return {
            "input_ids": w.input_ids[i],
            "token_pos": w.token_pos[i],
            "index": torch.tensor(i),
            "a_prime_index": w.a_prime_index[i],
            "prime_input_ids": w.input_ids[j],
            "prime_token_pos": w.token_pos[j],
        }


def materialize(batch: dict[str, torch.Tensor], orig, layer: int) -> dict[str, torch.Tensor]:
    """Fill ``A`` / ``A_prime`` of an on-the-fly batch with the orig model (no-op for dumps)."""
    if "A" in batch:
        return batch
    batch = dict(batch)
    batch["A"] = orig.capture(batch["input_ids"], layer, batch["token_pos"]).float()
    batch["A_prime"] = orig.capture(batch["prime_input_ids"], layer, batch["prime_token_pos"]).float()
    return batch
