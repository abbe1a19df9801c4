"""Shared pieces of the sharded-engine stage tests (tests/test_zero3.py, tests/test_fsdp2_stages.py):
the tiny runs' command-line flags and the comparisons of their saved lenses."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

TRAINABLE = ["--decoder", '{"trainable_base": true}', "--encoder", '{"trainable_base": true}']


def flags(fields: dict) -> list[str]:
    """``--key value`` for each field."""
    return [x for k, v in fields.items() for x in (f"--{k}", str(v))]


def sft_args(model_dir, splits, out, **kw) -> list[str]:
    """4 supervised steps at lr 1e-2, batch 8 per process, checkpoints every 2, trainable bases."""
    fields = {
        "model_name_or_path": model_dir,
        "train_data": splits["train"],
        "val_data": splits["val"],
        "output_dir": out,
        "max_steps": 4,
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 8,
        "t_text": 4,
        "plot": "false",
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "explain_texts": 0,
    } | kw
    return flags(fields) + TRAINABLE


def rl_args(model_dir, splits, sft_lens, out, **kw) -> list[str]:
    """3 GRPO steps at lr 1e-2 from ``sft_lens``, accumulation 2, the encoder co-trained, HF rollouts."""
    fields = {
        "model_name_or_path": model_dir,
        "sft_lens": sft_lens,
        "train_data": splits["train"],
        "val_data": splits["val"],
        "output_dir": out,
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "t_text": 4,
        "rollout_backend": "hf",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 0,
        "learning_rate": 1e-2,
        "encoder_mse_weight": 1.0,
        "gradient_accumulation_steps": 2,
        "explain_texts": 0,
        "disable_tqdm": "true",
    } | kw
    return flags(fields)


def lens_weights(out: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's saved lens."""
    return load_file(str(Path(out) / "lens" / "lens.safetensors"))


def max_weight_diff(a_dir: Path, b_dir: Path) -> float:
    """The largest absolute difference between two runs' saved lenses (same tensor names)."""
    a, b = lens_weights(a_dir), lens_weights(b_dir)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged_losses(out: Path) -> list[float]:
    """The training losses a supervised run logged (metrics.jsonl)."""
    rows = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows if '"loss"' in r]


def grpo_history(out: Path) -> list[dict]:
    """The logged GRPO steps of a run (final_metrics.json's log_history rows with a loss)."""
    result = json.loads((Path(out) / "final_metrics.json").read_text())
    return [h for h in result["log_history"] if "loss" in h]
