"""Inherited config fields the lens cannot honour, refused at parse time naming the field.

``LensSFTConfig`` inherits every ``transformers.TrainingArguments`` field and ``LensGRPOConfig``
every TRL ``GRPOConfig`` field. A field either keeps its upstream meaning or appears in one of
the tables below with the only value accepted and the reason; :func:`refuse_fields` raises a
:class:`~lens_rl.config.ConfigError` for any other value, naming the field, the value and what
to do instead. Nothing is silently ignored. Lens fields renamed away are refused the same way,
naming the new field (:data:`RENAMED`).
"""

from __future__ import annotations

import importlib.util
import json
import os

from lens_rl.config import ConfigError

_EVAL = "the lens evaluates the whole val split itself (FVE, functional KL, explanations)"

# TrainingArguments fields (both stages).
TRAINING_ARGS_REFUSED: dict[str, tuple[object, str]] = {
    "remove_unused_columns": (False, "the lens batches are fixed records, not model inputs"),
    "push_to_hub": (False, "nothing is uploaded; the lens is saved to <output_dir>/lens"),
    "torch_compile": (False, "not supported by the lens generators"),
    "use_liger_kernel": (False, "the lens computes its own logits"),
    "neftune_noise_alpha": (None, "the lens feeds activations, not token embeddings"),
    "label_smoothing_factor": (0.0, "the lens has no token labels"),
    "label_names": (None, "the lens has no labels"),
    "auto_find_batch_size": (False, "not supported by the lens trainer"),
    "include_for_metrics": ([], _EVAL),
    "batch_eval_metrics": (False, _EVAL),
    "eval_accumulation_steps": (None, _EVAL),
    "eval_do_concat_batches": (True, _EVAL),
    "eval_use_gather_object": (False, _EVAL),
    "prediction_loss_only": (False, _EVAL),
    "bf16_full_eval": (False, "the evaluation runs in the training dtype"),
    "fp16_full_eval": (False, "the evaluation runs in the training dtype"),
}

_ROLLOUTS = "the lens generates fixed-length explanations from activations itself"
_SERVER = "only for vllm_mode='server', which the lens does not support (rollout_backend picks the engine)"

# TRL GRPOConfig fields (RL stage) beyond TrainingArguments.
GRPO_REFUSED: dict[str, tuple[object, str]] = {
    "model_init_kwargs": (None, "the lens loads the model itself: use model_dtype / attn_implementation"),
    "trust_remote_code": (False, "the lens loads local models of known families only"),
    "router_aux_loss_coef": (None, "the lens scorer returns no router logits (MoE aux loss)"),
    "cast_lm_head_to_fp32": (False, "not implemented for the lens head; use model_dtype float32"),
    "num_generations_eval": (None, _EVAL + "; eval_steps / per_device_eval_batch_size steer it"),
    "pad_to_multiple_of": ("auto", _ROLLOUTS + " (no prompt padding)"),
    "generation_kwargs": (None, _ROLLOUTS + "; the sampling fields (temperature, top_p, top_k, min_p) apply"),
    "chat_template_kwargs": (None, "the decoder prompt is the lens's own, not a chat"),
    "repetition_penalty": (1.0, "the lens sampling policy has no repetition penalty (log q would differ)"),
    "cache_implementation": (None, _ROLLOUTS),
    "use_vllm": (False, "TRL's text-prompt vLLM integration; set rollout_backend=vllm instead"),
    "vllm_mode": ("colocate", "the lens runs vLLM in-process (colocate) only"),
    "vllm_model_impl": ("vllm", "the lens vLLM backend uses vLLM's own model implementation"),
    "vllm_enable_sleep_mode": (False, "not supported by the lens vLLM backend"),
    "vllm_structured_outputs_regex": (None, _ROLLOUTS),
    "vllm_server_base_url": (None, _SERVER),
    "vllm_server_host": ("0.0.0.0", _SERVER),
    "vllm_server_port": (8000, _SERVER),
    "vllm_server_timeout": (240.0, _SERVER),
    "vllm_group_port": (51216, _SERVER),
    "vllm_tensor_parallel_size": (1, "the lens vLLM backend runs one engine per process"),
    "multi_objective_aggregation": ("sum_then_normalize", "the lens trainer implements TRL's default only"),
    "mask_truncated_completions": (
        False,
        "explanations are exactly t_text tokens long (EOS is ignored), so none is truncated",
    ),
    "sync_ref_model": (
        False,
        "the beta-KL reference (beta_reference) is fixed: the frozen LM or the initial policy, never synced",
    ),
    "max_tool_calling_iterations": (None, "explanations call no tools"),
    "log_completions_hub_repo": (None, "nothing is uploaded"),
    "use_transformers_continuous_batching": (False, _ROLLOUTS),
    "transformers_continuous_batching_config": (None, _ROLLOUTS),
    "use_transformers_paged": (False, _ROLLOUTS),
    "vllm_importance_sampling_cap": (None, "deprecated by TRL: use vllm_importance_sampling_clip_max"),
}


# Lens fields renamed (old name -> new name), both stages. The old names stay declared on
# ``LensStageArguments`` (default None) so a YAML key, a flag or a keyword using one is refused by
# :func:`refuse_renamed` naming the new field, instead of argparse's bare "unrecognized argument".
RENAMED: dict[str, str] = {
    "lm_natural_prefix": "lm_prefix",  # the supervised stage's name of the frozen LM's prefix
    "ref_kl_prefix": "lm_prefix",  # the RL stage's name of the same text
    "num_explanations": "num_completions_to_print",  # TRL's name (GRPOConfig) for the same count
}


def refuse_renamed(cfg: object) -> None:
    """Raise :class:`ConfigError` for the first field of :data:`RENAMED` given a value on ``cfg``,
    naming the field that replaces it."""
    cls = type(cfg).__name__
    for old, new in RENAMED.items():
        value = getattr(cfg, old, None)
        if value is not None:
            raise ConfigError(f"{cls}.{old} was renamed {new}: set {new}={value!r} instead.")


def refuse_fields(cfg: object, table: dict[str, tuple[object, str]]) -> None:
    """Raise :class:`ConfigError` naming the first field of ``table`` whose value on ``cfg`` is
    not the accepted one (an empty list or dict counts as ``[]``/``None``)."""
    cls = type(cfg).__name__
    for name, (accepted, why) in table.items():
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        empty = value in (None, [], {}) or (isinstance(value, (list, dict)) and not value)
        if value == accepted or (accepted in (None, []) and empty):
            continue
        raise ConfigError(f"{cls}.{name}={value!r} is not supported: {why} (leave it at {accepted!r}).")


# Lens evaluation metrics a checkpoint can be chosen by (``save_strategy="best"``), with whether
# higher is better. transformers would guess the direction from a "loss" suffix, which reads
# ``nmse`` or ``kl_recon`` as higher-is-better and keeps the worst checkpoint as "best".
BEST_METRICS: dict[str, bool] = {
    "fve": True,
    "fve_recon": True,
    "nmse": False,
    "kl_recon": False,
    "kl_train": False,
    "lm_kl": False,
}


# transformers schedulers stepped with the evaluated metric_for_best_model; both take a ``mode``
# (default "min") that transformers does not derive from the metric's direction.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


def _set_scheduler_mode(cfg, kind: str, metric: str, higher: bool) -> None:
    """Set ``lr_scheduler_kwargs["mode"]`` from the metric's direction: left at its default
    ("min"), a plateau schedule on ``fve`` would cut the learning rate while FVE *rises*. An
    explicit contradicting ``mode`` is refused."""
    kwargs = cfg.lr_scheduler_kwargs
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs.strip() else {}
    kwargs = dict(kwargs or {})
    mode = "max" if higher else "min"
    if kwargs.get("mode", mode) != mode:
        raise ConfigError(
            f"{kind}.lr_scheduler_kwargs mode={kwargs['mode']!r} contradicts metric_for_best_model={metric!r} "
            f"({'higher' if higher else 'lower'} is better, so mode={mode!r}); leave mode unset."
        )
    kwargs["mode"] = mode
    cfg.lr_scheduler_kwargs = kwargs


def resolve_best_metric(cfg) -> None:
    """Check ``metric_for_best_model`` / ``greater_is_better`` / ``save_strategy="best"`` /
    ``load_best_model_at_end`` before ``TrainingArguments.__post_init__`` and set
    ``greater_is_better`` from the metric when unset.

    ``metric_for_best_model`` must name a lens evaluation metric (``fve`` or ``eval_fve``);
    ``save_strategy="best"`` needs it and an evaluation; ``load_best_model_at_end`` and the
    metric-driven schedulers need it (transformers would default to ``loss``, never logged) and
    get their ``mode`` from its direction; an explicit ``greater_is_better`` that
    contradicts the metric's direction is refused."""
    kind = type(cfg).__name__
    strategy = getattr(cfg.save_strategy, "value", cfg.save_strategy)
    metric = cfg.metric_for_best_model
    choices = ", ".join(BEST_METRICS)
    scheduler = getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type)
    if metric is None:
        needs = (
            "save_strategy='best'"
            if strategy == "best"
            else "load_best_model_at_end"
            if cfg.load_best_model_at_end
            else f"lr_scheduler_type={scheduler!r}"
            if scheduler in METRIC_SCHEDULERS
            else None
        )
        if needs is not None:  # transformers would fall back to "loss", which the lens never logs
            raise ConfigError(
                f"{kind}.{needs} needs metric_for_best_model, one of the lens evaluation metrics: {choices}."
            )
        return
    name = metric.removeprefix("eval_")
    if name not in BEST_METRICS:
        raise ConfigError(
            f"{kind}.metric_for_best_model={metric!r} is not a lens evaluation metric; use one of: {choices}."
        )
    higher = BEST_METRICS[name]
    if cfg.greater_is_better is None:
        cfg.greater_is_better = higher
    elif bool(cfg.greater_is_better) != higher:
        raise ConfigError(
            f"{kind}.greater_is_better={cfg.greater_is_better} contradicts metric_for_best_model={metric!r} "
            f"({'higher' if higher else 'lower'} is better); leave greater_is_better unset."
        )
    if scheduler in METRIC_SCHEDULERS:
        _set_scheduler_mode(cfg, kind, metric, higher)
    if strategy == "best" and getattr(cfg.eval_strategy, "value", cfg.eval_strategy) == "no":
        raise ConfigError(
            f"{kind}.save_strategy='best' saves when an evaluation improves {name}: set eval_strategy "
            "(steps or epoch) and val_data."
        )


def deepspeed_config(deepspeed: str | dict | None) -> dict | None:
    """A DeepSpeed config given as a dict or a JSON file, as a dict (None when not given)."""
    if not deepspeed:
        return None
    cfg = deepspeed
    if isinstance(cfg, str):
        with open(cfg) as f:
            cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"The DeepSpeed config {deepspeed!r} is not a JSON object.")
    return cfg


def zero_stage(deepspeed: str | dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a dict or a JSON file), or None."""
    cfg = deepspeed_config(deepspeed)
    if cfg is None:
        return None
    stage = (cfg.get("zero_optimization") or {}).get("stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def refuse_sharded_parameters(cfg) -> None:
    """Refuse accelerate's FSDP, and what the sharded engines (DeepSpeed ZeRO-3, lens_rl's own
    FSDP2: ``lens_fsdp2``) do not support yet, asked for in the config (``fsdp``, ``deepspeed``,
    ``lens_fsdp2``) or by the launcher (``accelerate launch --use_fsdp`` / ``--use_deepspeed
    --zero_stage 3`` or a DeepSpeed config file; they reach the job as ``ACCELERATE_*``
    environment variables and would bypass a check on the config alone).

    accelerate's FSDP plugin is not wired in, and on a CPU-only machine accelerate runs plain DDP
    instead: ``lens_fsdp2`` shards with FSDP2 on any device. ZeRO-3 and FSDP2 run
    (:mod:`lens_rl.training.sharded`) except where a computation swaps weights in with
    ``torch.func.functional_call`` (sharded weights cannot be swapped) or keeps the frozen base
    (LoRA): each is refused here, naming the field. A lens whose
    base is the original model's (frozen, shared) is refused when the trainer starts
    (:func:`lens_rl.training.sharded.prepare_sharding`)."""
    kind = type(cfg).__name__
    if cfg.fsdp or _env_true("ACCELERATE_USE_FSDP"):
        how = f"fsdp={cfg.fsdp!r}" if cfg.fsdp else "accelerate launch --use_fsdp (ACCELERATE_USE_FSDP)"
        raise ConfigError(
            f"{kind}: accelerate's FSDP ({how}) is not supported by the training stages: its plugin is "
            "not wired in, and on a CPU-only machine accelerate would run plain DDP instead. Set "
            "lens_fsdp2: true (lens_rl shards the lens with FSDP2 itself, on CPU or GPU, launched as "
            "plain multi-process: accelerate launch --multi_gpu), or use DeepSpeed ZeRO-3 "
            "(docs/sharding.md)."
        )
    stage, how = sharding_stage(cfg)
    fsdp2 = bool(getattr(cfg, "lens_fsdp2", False))
    if fsdp2 and stage is not None:
        raise ConfigError(f"{kind}.lens_fsdp2: FSDP2 and DeepSpeed ({how}) are two engines; choose one.")
    if stage != 3 and not fsdp2:
        return
    engine = f"DeepSpeed ZeRO-3 ({how})" if stage == 3 else "FSDP2 (lens_fsdp2)"
    unsupported = {
        "beta_reference": (
            getattr(cfg, "beta", 0.0) > 0 and getattr(cfg, "beta_reference", "base_lm") == "initial_policy",
            "beta_reference='initial_policy' (functional_call swaps the starting weights in)",
        ),
        "encoder_mse_weight": (
            getattr(cfg, "encoder_mse_weight", 0.0) > 0 and getattr(cfg, "eval_strategy", "no") != "no",
            "with eval_strategy set, each evaluation's eval_fve_frozen_encoder swaps the starting "
            "encoder in with functional_call; set eval_strategy='no' (the stage still evaluates the "
            "saved lens before and after) or encoder_mse_weight=0",
        ),
        "load_best_model_at_end": (
            fsdp2 and bool(getattr(cfg, "load_best_model_at_end", False)),
            "reloading the best checkpoint into FSDP2's shards is not wired (resuming is); the best "
            "checkpoint stays in its folder",
        ),
        "peft_config": (
            getattr(cfg, "peft_config", None) is not None,
            "peft_config (LoRA keeps the frozen base, which the lens shares with the original model)",
        ),
    }
    for name, (refused, why) in unsupported.items():
        if refused:
            raise ConfigError(f"{kind}.{name}: not supported under {engine}: {why}.")


def refuse_missing_deepspeed(cfg) -> None:
    """A run asking for DeepSpeed (:func:`sharding_stage`) where it is not installed is refused,
    saying how to install it. Called last before the upstream ``__post_init__`` (which would fail
    with a bare package-metadata error), after every refusal that names a field."""
    stage, how = sharding_stage(cfg)
    if stage is not None and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"{type(cfg).__name__}: DeepSpeed ZeRO-{stage} ({how}) needs DeepSpeed, which is not "
            "installed: EXTRAS=deepspeed make setup (or pip install 'lens_rl[deepspeed]')."
        )


def sharding_stage(cfg) -> tuple[int | None, str]:
    """The DeepSpeed ZeRO stage a run will use (None: no DeepSpeed or no stage given) and where
    it was asked for: the ``deepspeed`` field, else the launcher's environment (a DeepSpeed config
    file, or ``--zero_stage``)."""
    stage, how = zero_stage(cfg.deepspeed), "deepspeed"
    if stage is None and _env_true("ACCELERATE_USE_DEEPSPEED"):
        env_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        stage = int(env_stage) if env_stage.isdigit() else None
        how = "accelerate launch --zero_stage (ACCELERATE_DEEPSPEED_ZERO_STAGE)"
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            stage = zero_stage(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
            how = f"the DeepSpeed config file {os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']}"
    return stage, how
