"""The RL stage end to end: load the orig model and a lens, evaluate, train with GRPO, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lens_rl.generation.vllm_backend import VLLMBackend
from lens_rl.models.lens import ConsistencyLens
from lens_rl.training.evaluate import evaluate_lens
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.grpo_trainer import LensGRPOTrainer
from lens_rl.training.guards import train_or_finish
from lens_rl.training.reports import end_of_run_report
from lens_rl.training.sharded import final_lens, save_lens
from lens_rl.training.stage import checkpoint_step, claimed_stage, load_stage_inputs, stage_lens
from lens_rl.training.trackers import log_lens_artifact
from lens_rl.utils.launch import check_world_size


def run_rl(
    cfg: LensGRPOConfig, reward_funcs: list | None = None, callbacks: list[TrainerCallback] | None = None
) -> dict[str, Any]:
    """Train; returns the backend, held-out metrics before and after (when ``val_data`` is
    given) and TRL's ``log_history``. ``reward_funcs`` (TRL signature) are added after the
    reconstruction reward; weigh them with ``reward_weights``. ``callbacks``: extra Trainer
    callbacks (as :func:`~lens_rl.training.sft_trainer.run_sft` takes)."""
    from accelerate import PartialState

    def start() -> PartialState:
        state = PartialState(cpu=not torch.cuda.is_available())
        check_world_size(state.num_processes)
        return state

    with claimed_stage(cfg, start) as (state, resume):
        return _run_claimed(cfg, reward_funcs, callbacks, state, resume)


def _run_claimed(
    cfg: LensGRPOConfig, reward_funcs: list | None, callbacks: list | None, state, resume: str | None
) -> dict[str, Any]:
    """The body of :func:`run_rl` once the output folder is claimed."""
    inputs = load_stage_inputs(cfg, state.device)
    tok, orig, store, val = inputs.tokenizer, inputs.orig, inputs.train, inputs.val
    lens = stage_lens(cfg, inputs)
    lens.to(state.device)
    backend_name = cfg.rollout_backend
    if backend_name in ("auto", "vllm") and lens.decoder.n_patched:
        if backend_name == "vllm":
            raise ValueError(
                "rollout_backend=vllm cannot express multi-layer patching (patch_all_layers); use hf."
            )
        backend_name = "hf"
        state.print("rollouts: HF generator (multi-layer patching is not expressible as vLLM prompt_embeds)")
    if backend_name == "auto" and not torch.cuda.is_available():
        backend_name = "hf"
        state.print(
            "rollouts: HF generator (on CPU vLLM rollouts measured slower than HF: benchmarks/bench_rl.py; "
            "set rollout_backend=vllm to use it anyway)"
        )
    if backend_name in ("auto", "vllm") and any(p.requires_grad for p in lens.decoder.base.parameters()):
        state.print(
            "rollouts: a trainable decoder base is synced to the vLLM engine after each optimizer step"
        )
    vllm = None
    if backend_name in ("auto", "vllm"):
        try:
            vllm = VLLMBackend(
                cfg.model_name_or_path,
                cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib,
                seed=cfg.seed,
                dtype=cfg.model_dtype,
                # TRL's vllm_* fields reach the engine (memory fraction: CUDA only)
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                max_model_len=cfg.vllm_max_model_length,
            )
            backend_name = "vllm"
        except ImportError:
            if backend_name == "vllm":
                raise
            backend_name = "hf"
            state.print("rollouts: HF generator (vLLM is not installed)")
    state.print(f"rollout backend: {backend_name}")

    prefix = torch.tensor([tok(cfg.lm_prefix, add_special_tokens=False)["input_ids"]], device=state.device)

    def evaluate(lens: ConsistencyLens) -> dict[str, float]:
        if val is None or not state.is_main_process:
            return {}
        metrics, _ = evaluate_lens(
            lens,
            orig,
            val,
            layer=store.layer,
            t_text=cfg.t_text,
            train_mean=store.mean,
            train_var=store.var,
            prefix_ids=prefix,
            tokenizer=tok,
            batch_size=cfg.per_device_eval_batch_size,  # and the seed: as the trainer's evaluations
            seed=cfg.seed + 7919,
            resample_ablation=False,
            num_explanations=0,
            device=state.device,
        )
        return metrics

    before = evaluate(lens)
    try:
        trainer = LensGRPOTrainer(
            cfg, lens, orig, tok, store, reward_funcs=reward_funcs, vllm_backend=vllm, val_store=val
        )
        for callback in callbacks or []:
            trainer.add_callback(callback)
        state.print(  # the trainer's accelerator knows the backend (DDP, DeepSpeed, ...)
            f"rl: world size {state.num_processes} ({trainer.accelerator.distributed_type}); per-device batch "
            f"{cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps}"
        )
        if resume:
            step = checkpoint_step(resume)
            state.print(f"resuming from {resume} (step {step})")  # as the supervised stage says it
        train_or_finish(trainer, resume, log=state.print)
    finally:  # the engine's processes and its /dev/shm weight folder go, whether training ended or failed
        if vllm is not None:
            vllm.close()
    out = Path(cfg.output_dir)
    # saved before the final evaluation: a failing evaluation loses nothing (a collective when sharded)
    save_lens(trainer, out / "lens")
    trained = final_lens(trainer, out / "lens", orig, tok) if state.is_main_process else lens
    after = evaluate(trained)
    if state.is_main_process:
        title = f"held-out explanations after {trainer.state.global_step} GRPO steps"
        end_of_run_report(cfg, trained, orig, val, tok, store.layer, out, title, trainer=trainer)
        log_lens_artifact(trainer, out / "lens", after)
    result = {
        "backend": backend_name,
        "num_processes": state.num_processes,
        "gradient_checkpointing": lens.is_gradient_checkpointing,
        "before": before,
        "after": after,
        "log_history": trainer.state.log_history,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,  # save_strategy: best
    }
    if state.is_main_process:
        (out / "final_metrics.json").write_text(json.dumps(result, indent=2))
    return result
