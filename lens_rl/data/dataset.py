"""Datasets of activation records: from dumps on disk, or computed on the fly.

Both yield the same record: ``input_ids`` ``(S,)`` (the context window; ``A`` is read after
token ``token_pos``), ``token_pos``, ``index``, ``a_prime_index`` and, for dumps, ``A`` and
``A_prime`` (fp32). The on-the-fly dataset leaves ``A``/``A_prime`` to :func:`materialize`,
which the trainer calls on each batch with the orig model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from lens_rl.data.dump import DTYPES, FORMAT_VERSION, tensors_digest
from lens_rl.data.windows import WindowSet

REQUIRED_KEYS = ("A", "input_ids", "token_pos", "index", "a_prime_index")
# Larger magnitudes in A are taken for corruption (a flipped exponent bit gives ~1e37); the
# largest "massive activations" reported in LLM residual streams are ~1e4.
MAX_ABS_ACTIVATION = 1e8


class DumpError(ValueError):
    """A dump folder is missing, incomplete, corrupted or inconsistent with its metadata."""


class ActivationDataset(Dataset):
    """Activation records of one split of a dump (single- or multi-process).

    Every shard listed in ``metadata.json`` is opened and checked (keys, shapes, dtype, layer,
    index coverage) when the dataset is built, so a bad dump fails before training starts.
    The split is held in memory (A in its storage dtype; converted to fp32 per record).
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
        self.A = torch.empty(n, d, dtype=dtype)
        self.input_ids = torch.empty(n, s_len, dtype=torch.int32)
        self.token_pos = torch.empty(n, dtype=torch.long)
        self.a_prime_index = torch.empty(n, dtype=torch.long)
        seen = torch.zeros(n, dtype=torch.bool)
        for shard in md["shards"]:
            file = self.path / shard["file"]
            if not file.exists():
                raise DumpError(f"Shard {file} listed in {meta_path} is missing.")
            try:
                with safe_open(str(file), "pt") as f:
                    keys = set(f.keys())
                    missing = [k for k in REQUIRED_KEYS if k not in keys]
                    if missing:
                        raise DumpError(f"Shard {file} lacks tensors {missing}.")
                    smeta = f.metadata() or {}
                    t = {k: f.get_tensor(k) for k in REQUIRED_KEYS}
                    stored = {k: f.get_tensor(k) for k in keys}
            except DumpError:
                raise
            except Exception as e:  # safetensors raises its own error types on corrupted files
                raise DumpError(f"Shard {file} cannot be read (corrupted or truncated): {e}") from e
            if "sha256" in smeta and tensors_digest(stored) != smeta["sha256"]:
                raise DumpError(
                    f"Shard {file}: content checksum mismatch (the file changed after it was written); "
                    "delete it and rerun the dump to redo it."
                )
            c, start = shard["count"], shard["start"]
            expect = {
                "A": (c, d),
                "input_ids": (c, s_len),
                "token_pos": (c,),
                "index": (c,),
                "a_prime_index": (c,),
            }
            for k, shape in expect.items():
                if tuple(t[k].shape) != shape:
                    raise DumpError(
                        f"Shard {file}: {k} has shape {tuple(t[k].shape)}, metadata implies {shape}."
                    )
            if t["A"].dtype != dtype:
                raise DumpError(f"Shard {file}: A is {t['A'].dtype}, metadata says {md['dtype']}.")
            if int(smeta.get("layer", self.layer)) != self.layer:
                raise DumpError(
                    f"Shard {file} was captured at layer {smeta.get('layer')}, metadata says {self.layer}."
                )
            idx = t["index"]
            if not torch.equal(idx, torch.arange(start, start + c)):
                raise DumpError(f"Shard {file}: index does not cover [{start}, {start + c}).")
            self.A[idx] = t["A"]
            self.input_ids[idx] = t["input_ids"]
            self.token_pos[idx] = t["token_pos"]
            self.a_prime_index[idx] = t["a_prime_index"]
            seen[idx] = True
        if not bool(seen.all()):
            raise DumpError(f"{self.path}: {int((~seen).sum())} of {n} samples are in no shard.")

        def shard_of(i: int) -> Path:
            return next(
                self.path / s["file"] for s in md["shards"] if s["start"] <= i < s["start"] + s["count"]
            )

        finite = torch.isfinite(self.A.float()).all(dim=1)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            raise DumpError(f"Shard {shard_of(i)}: A of sample {i} contains NaN or inf.")
        big = self.A.float().abs().amax(dim=1)
        if bool((big > MAX_ABS_ACTIVATION).any()):
            i = int(big.argmax())
            raise DumpError(
                f"Shard {shard_of(i)}: sample {i} has |A| = {float(big[i]):.3g} > {MAX_ABS_ACTIVATION:g} "
                "(a corrupted value; residual streams stay far below this)."
            )
        bad_pos = (self.token_pos < 0) | (self.token_pos >= s_len)
        if bool(bad_pos.any()):
            i = int(bad_pos.nonzero()[0])
            raise DumpError(
                f"Shard {shard_of(i)}: token_pos {int(self.token_pos[i])} of sample {i} outside the window "
                f"[0, {s_len})."
            )
        bad_prime = (self.a_prime_index < 0) | (self.a_prime_index >= n)
        if bool(bad_prime.any()):
            i = int(bad_prime.nonzero()[0])
            raise DumpError(
                f"Shard {shard_of(i)}: a_prime_index {int(self.a_prime_index[i])} of sample {i} outside [0, {n})."
            )
        stats_path = self.path / "stats.safetensors"
        if stats_path.exists():
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
            a = self.A.double()
            self.mean, self.var = a.mean(0).float(), a.var(0, unbiased=False).float()

    def __len__(self) -> int:
        return self.A.shape[0]

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

    def check_compatible(self, d_model: int, layer: int | None = None, vocab_size: int | None = None) -> None:
        """Raise :class:`DumpError` if the dump's width, layer or token ids do not fit the model."""
        if self.metadata["d_model"] != d_model:
            raise DumpError(f"{self.path}: d_model {self.metadata['d_model']} != the model's {d_model}.")
        if vocab_size is not None:
            lo, hi = int(self.input_ids.min()), int(self.input_ids.max())
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
