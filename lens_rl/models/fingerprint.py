"""A cheap fingerprint of a base model's weights (:func:`base_fingerprint`), the same whether
it is loaded in fp32, bf16 or fp16: what dumps and lenses record about their base, so that
activations or a lens are never used with another model of the same shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

# Samples per parameter in :func:`base_fingerprint`.
_FINGERPRINT_SAMPLES = 4096
# fp16's smallest normal magnitude: below it fp16 keeps fewer significant bits than bf16.
_FP16_MIN_NORMAL = 2.0**-14


def _fp16_uncertain(sample: torch.Tensor) -> torch.Tensor:
    """Where the bf16 rounding of an fp16 value may differ from that of the fp32 value it was
    rounded from: an exact bf16 tie (the fp32 bits end in ``0x8000``: a double rounding),
    below fp16's normal range (fewer bits than bf16), or overflowed to inf/nan."""
    bits = sample.float().view(torch.int32)
    tie = (bits & 0xFFFF) == 0x8000
    return tie | (sample.float().abs() < _FP16_MIN_NORMAL) | ~torch.isfinite(sample)


class _CheckpointFiles:
    """Read-only access to the safetensors files of a model's folder, by tensor name (opened
    lazily, for :func:`base_fingerprint`'s fp16 path)."""

    def __init__(self, model: PreTrainedModel, param_names: set[str]) -> None:
        self.folder = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
        self.prefix = (getattr(model, "base_model_prefix", "") or "") + "."
        self.param_names = param_names
        self._where: dict[str, Path] | None = None
        self._open: dict[Path, Any] = {}

    def _index(self) -> dict[str, Path]:
        if self._where is None:
            self._where = {}
            index = self.folder / "model.safetensors.index.json"
            try:
                if index.is_file():
                    weight_map = json.loads(index.read_text())["weight_map"]
                    self._where = {k: self.folder / v for k, v in weight_map.items()}
                elif (self.folder / "model.safetensors").is_file():
                    with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                        self._where = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
            except (OSError, ValueError, KeyError, TypeError):
                self._where = {}
        return self._where

    def _slice(self, key: str):
        file = self._index()[key]
        if file not in self._open:
            self._open[file] = safe_open(str(file), "pt")
        return self._open[file].get_slice(key)

    def _claimed(self, key: str) -> bool:
        return any(k in self.param_names for k in (key, self.prefix + key, key.removeprefix(self.prefix)))

    def values(self, names: list[str], shape: torch.Size, idx: torch.Tensor, loaded: torch.Tensor):
        """float32 values at the flat indices ``idx`` of the file tensor behind the parameter
        ``names`` that round to ``loaded`` (fp16) there, else None. Tried: the names (with or
        without the base-model prefix), then unclaimed file tensors of the same shape (a key
        that transformers renames on load, e.g. GPT-NeoX's ``embed_out`` -> ``lm_head``)."""
        index = self._index()
        named = [n for name in names for n in (name, name.removeprefix(self.prefix), self.prefix + name)]
        named = [n for n in dict.fromkeys(named) if n in index]
        others = [k for k in index if k not in named and not self._claimed(k)]
        for key in named + others:
            try:
                sl = self._slice(key)
                if tuple(sl.get_shape()) != tuple(shape):
                    continue
                if len(shape) < 2:
                    out = sl[:].reshape(-1).float()[idx]
                else:
                    row = int(torch.Size(shape[1:]).numel())
                    out = torch.empty(idx.numel(), dtype=torch.float32)
                    for r in torch.unique(idx // row).tolist():
                        at = (idx // row) == r
                        out[at] = sl[r : r + 1].reshape(-1).float()[idx[at] - r * row]
            except Exception:  # an unreadable file or tensor: the loaded values are used instead
                continue
            if torch.equal(out.to(torch.float16).view(torch.int16), loaded.view(torch.int16)):
                return out
        return None


def base_fingerprint(model: PreTrainedModel, *, resolve_fp16: bool = True) -> str:
    """A cheap fingerprint of a model's weights, the same whether it is loaded in fp32, bf16 or
    fp16, different for another checkpoint of the same shape.

    sha256 over every parameter's name, shape and up to 4,096 evenly strided values rounded to
    bf16. An fp32 or bf16 load gives the same bf16 values. An fp16 load of a checkpoint stored
    with more precision (fp32) does not always: ``fp32 -> fp16 -> bf16`` rounds twice, and
    differs from ``fp32 -> bf16`` by one bf16 step wherever the fp16 value is an exact bf16 tie
    (~1 value in 16), and fp16 loses bits below 2**-14 and overflows above 65504. No rounding of
    the loaded values alone can agree for every weight (the fp16 and bf16 rounding boundaries
    interleave), so those uncertain values (and only those) are read from the model's
    safetensors files, and used when they round to the loaded fp16 values (the loaded model is
    that file's); elsewhere the fp16 value already fixes the bf16 one. An fp16 model that is
    not a folder's unmodified load keeps its own values at those places.

    Args:
        model: the loaded model.
        resolve_fp16: read the uncertain fp16 values from the files (False: what lens_rl
            recorded before it did, for :func:`base_fingerprints`).
    """
    h = hashlib.sha256()
    files: _CheckpointFiles | None = None
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            flat = p.detach().reshape(-1)
            n = min(_FINGERPRINT_SAMPLES, flat.numel())
            idx = torch.linspace(0, flat.numel() - 1, n, device=flat.device).long()
            sample = flat[idx]
            if resolve_fp16 and p.dtype == torch.float16:
                uncertain = _fp16_uncertain(sample).cpu()
                if uncertain.any():
                    files = files or _CheckpointFiles(model, {k for v in names.values() for k in v})
                    sample = sample.cpu()
                    exact = files.values(names[id(p)], p.shape, idx.cpu()[uncertain], sample[uncertain])
                    if exact is not None:
                        sample = sample.float()
                        sample[uncertain] = exact
            values = sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
            h.update(f"{name}:{tuple(p.shape)};".encode())
            h.update(values)
    return h.hexdigest()[:20]


def base_fingerprints(model: PreTrainedModel) -> tuple[str, ...]:
    """Every fingerprint a record of this model's weights may hold: :func:`base_fingerprint`,
    then (an fp16 model only) the one earlier versions recorded for the same fp16 load."""
    current = base_fingerprint(model)
    if not any(p.dtype == torch.float16 for p in model.parameters()):
        return (current,)
    legacy = base_fingerprint(model, resolve_fp16=False)
    return (current,) if legacy == current else (current, legacy)
