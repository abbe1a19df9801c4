"""DeepSpeed ZeRO-2 on CPU (DeepSpeed's CPU accelerator over gloo), both stages under
``accelerate launch --use_deepspeed``, 2 processes, trainable decoder and encoder bases: the same
run under DDP is the reference (same seeds, same batches, so the same rollouts in RL).

Opt-in (``-m slow``) and only with DeepSpeed installed (``EXTRAS=deepspeed make setup``); the
first launch builds DeepSpeed's shared-memory op with ninja. Tolerances are measured here:
SFT 4 steps at lr 1e-2 differs from DDP by at most 2.8e-7 (weights of magnitude ~1); GRPO 3
steps at lr 1e-2 with accumulation 2 and the encoder co-trained by at most 4.3e-5, where the
weights moved by up to 2e-2 (the reductions sum in another order, and 3 sampled steps amplify
that); resume is bit-exact.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from script_runner import accelerate_launch

from lens_rl.utils.launch import resolve_resume

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_deepspeed():
    """Skip, saying why, without DeepSpeed (a fixture, not a module-level skip: the default run
    deselects these slow tests instead of reporting a skip)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (EXTRAS=deepspeed make setup)")


TRAINABLE = ["--decoder", '{"trainable_base": true}', "--encoder", '{"trainable_base": true}']


def _sft_args(model_dir, splits, out, **kw) -> list[str]:
    base = {
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
    return [x for k, v in base.items() for x in (f"--{k}", str(v))] + TRAINABLE


def _max_diff(a_dir, b_dir) -> float:
    a = load_file(str(a_dir / "lens" / "lens.safetensors"))
    b = load_file(str(b_dir / "lens" / "lens.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(out) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]


def test_sft_zero2_matches_ddp_and_resumes_exactly(tiny_model_dir, tiny_dump, tmp_path):
    """ZeRO-2 on 2 processes == DDP on 2 processes (2.8e-7 measured; bound 5e-6); its
    checkpoints (engine state in global_stepN/, no optimizer.pt) are recognised as complete, a
    truncated one is skipped, and 2 steps + resume + 2 steps == 4 straight, bit for bit."""
    ds, ddp = tmp_path / "ds", tmp_path / "ddp"
    res = accelerate_launch(
        "sft_lens.py", _sft_args(tiny_model_dir, tiny_dump, ds), num_processes=2, port=29621, deepspeed_zero=2
    )
    assert "DistributedType.DEEPSPEED" in res.stdout
    accelerate_launch("sft_lens.py", _sft_args(tiny_model_dir, tiny_dump, ddp), num_processes=2, port=29622)
    assert _max_diff(ds, ddp) < 5e-6
    assert _losses(ds) == pytest.approx(_losses(ddp), rel=1e-6)

    assert resolve_resume("true", ds) == str(ds / "checkpoint-4")
    cut = tmp_path / "cut"
    shutil.copytree(ds, cut, ignore=shutil.ignore_patterns("lens", "final_metrics.json"))
    optim = sorted((cut / "checkpoint-4" / "global_step4").glob("*optim_states.pt"))[0]
    optim.write_bytes(b"")  # as a kill mid-save leaves it
    assert resolve_resume("true", cut) == str(cut / "checkpoint-2")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ds / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(ds / "metrics.jsonl", resumed / "metrics.jsonl")
    res = accelerate_launch(
        "sft_lens.py",
        _sft_args(tiny_model_dir, tiny_dump, resumed, resume_from_checkpoint="true"),
        num_processes=2,
        port=29623,
        deepspeed_zero=2,
    )
    assert "resuming from" in res.stdout
    assert _max_diff(ds, resumed) == 0.0
    assert _losses(resumed) == _losses(ds)


def test_grpo_zero2_matches_ddp(tiny_model_dir, tiny_dump, tmp_path):
    """GRPO under ZeRO-2 (2 processes, accumulation 2, encoder co-trained, trainable bases, from a
    saved lens) takes the same steps as under DDP: rewards and losses within 1e-5 relative,
    weights within 2e-4 (4.3e-5 measured; the weights move by ~2e-2)."""
    from lens_rl.models.lens import ConsistencyLens

    lens0 = tmp_path / "lens0"
    start = tmp_path / "sft"
    accelerate_launch(
        "sft_lens.py",
        _sft_args(tiny_model_dir, tiny_dump, start, max_steps=1, save_strategy="no"),
        port=29624,
    )
    shutil.copytree(start / "lens", lens0)
    assert ConsistencyLens.from_pretrained(lens0).decoder is not None

    def rl_args(out) -> list[str]:
        args = {
            "model_name_or_path": tiny_model_dir,
            "sft_lens": lens0,
            "train_data": tiny_dump["train"],
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
        }
        return [x for k, v in args.items() for x in (f"--{k}", str(v))]

    ds, ddp = tmp_path / "rl_ds", tmp_path / "rl_ddp"
    res = accelerate_launch(
        "rl_lens.py",
        rl_args(ds),
        num_processes=2,
        port=29625,
        deepspeed_zero=2,
        gradient_accumulation_steps=2,
    )
    assert "DistributedType.DEEPSPEED" in res.stdout
    accelerate_launch("rl_lens.py", rl_args(ddp), num_processes=2, port=29626)
    hist = {
        name: [h for h in json.loads((out / "final_metrics.json").read_text())["log_history"] if "loss" in h]
        for name, out in (("ds", ds), ("ddp", ddp))
    }
    assert len(hist["ds"]) == len(hist["ddp"]) == 3
    for key in ("reward", "loss", "lens/encoder_mse"):
        assert [h[key] for h in hist["ds"]] == pytest.approx([h[key] for h in hist["ddp"]], rel=1e-5)
    assert _max_diff(ds, ddp) < 2e-4
    moved = load_file(str(ddp / "lens" / "lens.safetensors"))
    before = load_file(str(lens0 / "lens.safetensors"))
    assert max((moved[k] - before[k]).abs().max().item() for k in moved) > 1e-3
    assert all(torch.isfinite(v).all() for v in moved.values())
