"""The probe's settings from a lens RL run (``scripts/rl_lens.py``): "the step this run would
take next".

A ``checkpoint-N`` folder written by TRL's trainer holds ``training_args.bin`` (the pickled
:class:`~lens_rl.training.grpo_config.LensGRPOConfig`), ``trainer_state.json`` (``global_step``,
``max_steps``), ``scheduler.pt`` and ``optimizer.pt``. A checkpoint is untrusted input: its
pickles are read with ``torch.load(weights_only=True)``, ``training_args.bin`` with an
allowlist of exactly the classes a lens GRPO run's arguments hold (:data:`RUN_ARGS_GLOBALS`), so
a crafted file is refused instead of running code. The learning rate of the next step is
the scheduler's: the run's scheduler is rebuilt with ``transformers.get_scheduler`` from the
run's arguments, its saved state is loaded, and ``get_last_lr()`` is read (the lr that
``optimizer.step()`` would use at step ``global_step + 1``); it is checked against the
schedule's formula at ``global_step``. At the end of a linear schedule it is 0: the probe then
refuses (there is no next step) unless the user passes ``--learning_rate``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.dataclasses import DistributedType
from transformers.trainer_pt_utils import AcceleratorConfig
from transformers.trainer_utils import HubStrategy, IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from lens_rl.config import ConfigError
from lens_rl.models.configuration import DecoderConfig, EncoderConfig
from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.probe.config import EntropyProbeConfig
from lens_rl.training.grpo_config import LensGRPOConfig


class SavedPartialState:
    """Stands in for ``accelerate.state.PartialState`` in a run's ``training_args.bin``: the
    saved fields (``distributed_type``, ``num_processes``, ...) become plain attributes, and no
    process group is set up (the probe does not use them)."""


# Every global that torch.save(LensGRPOConfig) writes (TrainingArguments keeps its enums, the
# accelerator config and the process state; the lens keeps its sub-configs and sampling policy).
RUN_ARGS_GLOBALS: list[Any] = [
    LensGRPOConfig,
    DecoderConfig,
    EncoderConfig,
    SamplingPolicy,
    AcceleratorConfig,
    IntervalStrategy,
    SaveStrategy,
    HubStrategy,
    SchedulerType,
    OptimizerNames,
    DistributedType,
    (SavedPartialState, "accelerate.state.PartialState"),
    # where checkpoints written before the configs moved to lens_rl.models.configuration name them
    (DecoderConfig, "lens_rl.models.decoder.DecoderConfig"),
    (EncoderConfig, "lens_rl.models.encoder.EncoderConfig"),
]


def _global_name(g: Any) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


def _load_failure(e: Exception) -> str:
    """The cause in torch's weights-only error, without its advice to allowlist the global or
    to turn weights-only loading off (either would run the file's code)."""
    text = str(e)
    found = re.search(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)", text)
    if found:
        return f"it refers to {found.group(1)}, which is not allowed"
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    lines = [found.group(1)] if found else text.splitlines()
    cause = next((ln.strip() for ln in lines if ln.strip() and "weights_only" not in ln), "")
    return f"{type(e).__name__}: {cause}" if cause else type(e).__name__


def load_untrusted(path: Path, allowed: list[Any] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with only the globals in ``allowed`` (classes, or
    ``(stand-in, "module.Name")`` pairs) allowlisted beyond tensors and plain containers.

    Raises:
        ValueError: naming ``path``, for a global outside the allowlist or a malformed file.
    """
    allowed = list(allowed or [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # untrusted bytes: every way of failing is the same refusal
        classes = f" and these classes: {', '.join(map(_global_name, allowed))}" if allowed else ""
        raise ValueError(
            f"{path}: refused to load it ({_load_failure(e)}). Checkpoint files are untrusted data, "
            f"read with torch.load(weights_only=True) allowing only tensors, plain containers{classes}. "
            "Pass a checkpoint written by scripts/rl_lens.py."
        ) from e


@dataclass
class RunSettings:
    """What the probe takes from a run: ``values`` (probe field -> the run's value) and
    ``record`` (everything reported in ``results.json``)."""

    checkpoint: Path
    args: Any
    values: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint (holds ``trainer_state.json``), else the latest
    ``checkpoint-N`` in it (a run's output folder)."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    found = sorted(
        (p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if not found:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint-N folder (no trainer_state.json) nor a run folder with "
            "checkpoint-N subfolders: pass a checkpoint of scripts/rl_lens.py (save_strategy steps)."
        )
    return found[-1]


def next_step_learning_rates(checkpoint: Path, args: Any, global_step: int, max_steps: int) -> dict[str, Any]:
    """The lr per optimizer group that the step after ``global_step`` uses, from the run's
    scheduler rebuilt and loaded from ``scheduler.pt`` (``get_last_lr()``), with the schedule's
    own value at ``global_step`` as a check."""
    from transformers.optimization import get_scheduler

    path = checkpoint / "scheduler.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint holds no scheduler state.")
    state = load_untrusted(path)
    if not isinstance(state, dict) or "base_lrs" not in state:
        raise ValueError(f"{path} holds a {type(state).__name__} without base_lrs, not a scheduler state.")
    base = [float(b) for b in state["base_lrs"]]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base]
    opt = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, base, strict=True)])
    sched = get_scheduler(
        args.lr_scheduler_type,
        opt,
        num_warmup_steps=args.get_warmup_steps(max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}),
    )
    sched.load_state_dict(state)
    last = [float(x) for x in sched.get_last_lr()]
    lambdas = getattr(sched, "lr_lambdas", None)
    formula = [float(f(global_step)) * b for f, b in zip(lambdas, base, strict=True)] if lambdas else None
    if formula is not None and any(
        abs(a - b) > 1e-12 * max(abs(b), 1e-30) + 1e-20 for a, b in zip(last, formula, strict=True)
    ):
        raise ValueError(
            f"{path}: get_last_lr() {last} differs from the {args.lr_scheduler_type} schedule at step "
            f"{global_step} ({formula}); the checkpoint does not match its training_args.bin."
        )
    return {
        "next_step_lr": last,
        "base_lrs": base,
        "scheduler": str(args.lr_scheduler_type),
        "last_epoch": state.get("last_epoch"),
    }


def read_run(path: str | Path) -> RunSettings:
    """Read a checkpoint (or a run folder's latest checkpoint): the probe's fields from the run."""
    ckpt = find_checkpoint(path)
    for name in ("training_args.bin", "model.safetensors", "optimizer.pt"):
        if not (ckpt / name).exists():
            raise FileNotFoundError(
                f"{ckpt / name} not found: trl_checkpoint must be a checkpoint of rl_lens.py."
            )
    args = load_untrusted(ckpt / "training_args.bin", RUN_ARGS_GLOBALS)
    if not isinstance(args, LensGRPOConfig):
        raise ValueError(
            f"{ckpt}/training_args.bin is a {type(args).__name__}, not a lens GRPO run's config."
        )
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    step, max_steps = int(trainer_state["global_step"]), int(trainer_state["max_steps"])
    lrs = next_step_learning_rates(ckpt, args, step, max_steps)
    values = {
        "policy": "lens",
        "model_name_or_path": str(args.model_name_or_path),
        "lens_path": str(args.sft_lens) if args.sft_lens else None,
        "activations": str(args.train_data),
        "num_generations": int(args.num_generations),
        "max_new_tokens": int(args.t_text),
        "temperature": float(args.temperature),
        "top_p": float(args.top_p),
        "top_k": int(args.top_k or 0),
        "min_p": float(args.min_p or 0.0),
        "learning_rate": lrs["next_step_lr"][0],
        "adam_beta1": float(args.adam_beta1),
        "adam_beta2": float(args.adam_beta2),
        "adam_epsilon": float(args.adam_epsilon),
        "weight_decay": float(args.weight_decay),
        "max_grad_norm": float(args.max_grad_norm or 0.0),
        "loss_type": str(args.loss_type),
        "scale_rewards": str(args.scale_rewards),
    }
    record = {
        "checkpoint": str(ckpt),
        "global_step": step,
        "max_steps": max_steps,
        **lrs,
        "beta": float(args.beta),
        "epsilon": float(args.epsilon),
        "epsilon_high": None if args.epsilon_high is None else float(args.epsilon_high),
        # the probe's dr_grpo constant is t_text; TRL 1.16's trainer reads args.max_completion_length
        "max_completion_length_used": int(args.t_text),
        "run_max_completion_length": getattr(args, "max_completion_length", None),
    }
    return RunSettings(ckpt, args, values, record)


def unsupported(settings: RunSettings) -> list[str]:
    """Run settings whose step the probe's update vector does not reproduce (one line each)."""
    a, out = settings.args, []
    if a.beta != 0:
        out.append(f"beta={a.beta}: the KL-to-reference term of the loss is not in the probe's update")
    if a.loss_type == "vespo":
        out.append("loss_type=vespo: its sequence-level gamma weights are not in the probe's update")
    if a.loss_type == "cispo" and a.epsilon_high is not None and a.epsilon_high < 1:
        out.append(f"loss_type=cispo with epsilon_high={a.epsilon_high} < 1 clips the on-policy ratio")
    if getattr(a, "top_entropy_quantile", 1.0) < 1.0:
        out.append(f"top_entropy_quantile={a.top_entropy_quantile}: the entropy mask is not applied")
    if getattr(a, "functional_kl_reward", 0.0) > 0:
        out.append("functional_kl_reward > 0: the probe's reward is the reconstruction reward only")
    if getattr(a, "encoder_mse_weight", 0.0) > 0:
        out.append("encoder_mse_weight > 0: the encoder's loss is not in the probe's update")
    if getattr(a, "importance_sampling_level", "token") != "token":
        out.append(f"importance_sampling_level={a.importance_sampling_level}")
    return out


def apply_run(cfg: EntropyProbeConfig, settings: RunSettings) -> dict[str, Any]:
    """Fill ``cfg``'s unset fields from the run and re-validate; explicit fields stay and are
    reported as overrides. Returns the record for ``results.json`` (``run``)."""
    problems = unsupported(settings)
    if problems:
        raise ConfigError(
            f"{settings.checkpoint}: the probe cannot reproduce this run's step: " + "; ".join(problems) + "."
        )
    overrides = {}
    for name, value in settings.values.items():
        if name in cfg.explicit:
            if getattr(cfg, name) != value:
                overrides[name] = {"run": value, "probe": getattr(cfg, name)}
        else:
            setattr(cfg, name, value)
    cfg.trl_checkpoint = str(settings.checkpoint)
    lr = cfg.learning_rate
    if "learning_rate" not in cfg.explicit and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(
            f"{settings.checkpoint.name} is at step {settings.record['global_step']} of "
            f"{settings.record['max_steps']} of its {settings.record['scheduler']} schedule: the next step's "
            f"learning rate is {lr}, so there is no step to probe; pass --learning_rate to probe a "
            "hypothetical step (reported as an override)."
        )
    cfg.fill_defaults()
    cfg.validate()
    return settings.record | {
        "from_run": {k: v for k, v in settings.values.items() if k not in overrides},
        "overrides": overrides,
    }
