"""A dump split of random activations in the real on-disk format (for memory benchmarks/tests).

The shards, ``stats.safetensors`` and ``metadata.json`` are the ones
:func:`lens_rl.data.dump.run_dump` writes (same keys, checksums and metadata), but ``A`` is
Gaussian noise and the windows are random token ids: no model is run, so a dump of any size
is written at disk speed, one shard in memory at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from lens_rl.data.dump import DTYPES, FORMAT_VERSION, _shard_name, _write_shard, tensors_digest


def write_synthetic_dump(
    out: str | Path,
    num_samples: int,
    d_model: int,
    seq_len: int = 32,
    vocab_size: int = 512,
    layer: int = 1,
    shard_size: int = 4096,
    dtype: str = "float32",
    seed: int = 0,
    model_name_or_path: str = "synthetic",
) -> Path:
    """Write a split of ``num_samples`` random records to ``out`` and return it."""
    out = Path(out)
    rank_dir = out / "rank_0"
    rank_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(d_model, dtype=torch.float64)
    total_sq = torch.zeros(d_model, dtype=torch.float64)
    shards = []
    for s in range(math.ceil(num_samples / shard_size)):
        start, stop = s * shard_size, min((s + 1) * shard_size, num_samples)
        c = stop - start
        a = torch.randn(c, d_model, generator=gen).to(DTYPES[dtype])
        tensors = {
            "A": a,
            "input_ids": torch.randint(0, vocab_size, (c, seq_len), generator=gen, dtype=torch.int32),
            "token_pos": torch.randint(1, seq_len, (c,), generator=gen),
            "index": torch.arange(start, stop),
            "a_prime_index": torch.randint(0, num_samples, (c,), generator=gen),
        }
        total += a.double().sum(0)
        total_sq += a.double().pow(2).sum(0)
        meta = {
            "layer": str(layer),
            "start": str(start),
            "count": str(c),
            "format": str(FORMAT_VERSION),
            "sha256": tensors_digest(tensors),
        }
        name = _shard_name(start)
        _write_shard(rank_dir / name, tensors, meta)
        shards.append({"file": f"rank_0/{name}", "start": start, "count": c})
    mean = total / num_samples
    var = (total_sq / num_samples - mean * mean).clamp(min=0)
    save_file({"mean": mean.float(), "var": var.float()}, str(out / "stats.safetensors"))
    metadata = {
        "format_version": FORMAT_VERSION,
        "split": "train",
        "model_name_or_path": model_name_or_path,
        "tokenizer_name_or_path": model_name_or_path,
        "layer": layer,
        "d_model": d_model,
        "seq_len": seq_len,
        "min_pos": 1,
        "position_strategy": "random",
        "seed": seed,
        "dtype": dtype,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "world_size": 1,
        "shards": shards,
        "config": {"synthetic": True},
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return out
