"""Run guards shared by the training stages: divergence, and who owns the output folder.

- :class:`NonFiniteGuard` (a ``TrainerCallback``) checks the gradients just before every
  optimizer step. A NaN/inf gradient (what a diverging loss produces; under DDP the all-reduce
  spreads it to every process, so all of them decide alike) either stops the run with a
  message naming the step, before the update and before any checkpoint of the broken state
  is written, or (``on_nonfinite: skip``) drops that step's gradients so the optimizer leaves
  the weights alone, up to ``max_nonfinite_skips`` times.
- :func:`claim_output_dir` refuses a fresh run into a folder that holds an earlier run (its
  checkpoints would be rotated together with the new ones, and a later resume would pick the
  wrong one) unless ``overwrite_output_dir``, which clears the earlier run's outputs first; and
  it takes an exclusive lock on ``<output_dir>/.lens_rl.lock`` for the life of the process
  (:func:`lens_rl.utils.outputs.lock_output_dir`, which ``lens-rl explain`` takes too), so two
  runs cannot write one folder at once (the OS drops the lock when the process dies, even on
  kill -9).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from lens_rl.config import ConfigError
from lens_rl.utils.outputs import LOCK_FILE as LOCK_FILE  # re-exported: where the lock lives
from lens_rl.utils.outputs import lock_output_dir

logger = logging.getLogger(__name__)
# What a run writes into its output folder (an earlier run's copies are cleared on overwrite).
RUN_OUTPUTS = (
    "checkpoint-*",
    "lens",
    "metrics.jsonl",
    "explanations.jsonl",
    "explanations.html",
    "explanations_val.jsonl",
    "completions",
    "final_metrics.json",
    "training_curves.png",
    "config.json",
)


@dataclass
class RunGuardArguments:
    """Guard fields shared by the training configs (a base of ``LensSFTConfig`` and
    ``LensGRPOConfig``, next to ``TrainingArguments``' own ``learning_rate``/``max_grad_norm``)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Let a fresh run delete an earlier run's outputs in output_dir (else refused)."},
    )
    on_nonfinite: Literal["stop", "skip"] = field(
        default="stop",
        metadata={"help": "A NaN/inf gradient stops the run (naming the step), or skips that update."},
    )
    max_nonfinite_skips: int = field(
        default=3, metadata={"help": "With on_nonfinite=skip: stop after this many skipped updates."}
    )

    def check_run_guards(self) -> None:
        """Refuse guard values and rates that cannot mean anything (negative, unknown policy)."""
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}.")
        if self.max_nonfinite_skips < 0:
            raise ConfigError(f"max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}.")
        lr, clip = getattr(self, "learning_rate", 0.0), getattr(self, "max_grad_norm", 0.0)
        if lr < 0 or clip < 0:
            raise ConfigError(f"learning_rate ({lr}) and max_grad_norm ({clip}) must be >= 0.")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN/inf."""


class NonFiniteGuard(TrainerCallback):
    """Stop (or skip the update) when the gradients are not finite (see the module docstring)."""

    def __init__(self, args: RunGuardArguments) -> None:
        args.check_run_guards()
        self.policy, self.max_skips, self.skipped = args.on_nonfinite, args.max_nonfinite_skips, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: D102
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        # FSDP2: each process checks its own shards, and all agree (the same decision everywhere)
        sharded = any(isinstance(g, DTensor) for g in grads)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        finite = torch.isfinite(torch.stack(torch._foreach_norm([g.detach().float() for g in local]))).all()
        if sharded and dist.is_initialized():
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        if bool(finite):
            return
        step = state.global_step + 1
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for p in model.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient
            logger.warning(
                "non-finite gradient at optimizer step %d: update skipped (%d/%d)",
                step,
                self.skipped,
                self.max_skips,
            )
            return
        extra = f" after {self.skipped} skipped steps" if self.skipped else ""
        raise TrainingDivergedError(
            f"Training diverged: non-finite gradient at optimizer step {step}{extra} (learning_rate "
            f"{args.learning_rate:g}). The update was not applied and no checkpoint of this state was "
            "written; the newest checkpoint-N holds the last finite weights. Lower the learning rate, "
            "or set on_nonfinite=skip to skip up to max_nonfinite_skips such steps."
        )


def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> IO | None:
    """Check and lock ``output_dir`` for this run (main process only); return the lock's file
    object, which must stay referenced for the run's life.

    Raises:
        ConfigError: another run holds the folder, or a fresh run would mix with an earlier one.
    """
    out = Path(output_dir)
    lock = lock_output_dir(out)
    earlier = sorted({p.name for pattern in RUN_OUTPUTS for p in out.glob(pattern)})
    if earlier and not resume:
        if not overwrite:
            lock.close()
            raise ConfigError(
                f"{out} already holds a run ({', '.join(earlier[:5])}). Resume it with "
                "--resume_from_checkpoint true, choose another output_dir, or pass "
                "--overwrite_output_dir true to delete the earlier run's outputs."
            )
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


def main_then_all(fn: Callable[[], object], accelerator_state) -> object:
    """Run ``fn`` on the main process; if it raises a :class:`ConfigError`, raise it on every
    process (the others would otherwise wait forever at the next collective). Returns ``fn``'s
    result on the main process, None elsewhere."""
    from accelerate.utils import broadcast_object_list

    result, message = None, None
    if accelerator_state.is_main_process:
        try:
            result = fn()
        except ConfigError as e:
            message = str(e)
    if accelerator_state.num_processes > 1:
        box = [message]
        broadcast_object_list(box)
        message = box[0]
    if message is not None:
        raise ConfigError(message)
    return result


def train_or_finish(trainer, resume: str | None, log: Callable[[str], None] = print) -> bool:
    """``trainer.train(resume_from_checkpoint=resume)``, unless ``resume`` already reached the end
    of the schedule: transformers would then run one step *past* ``max_steps`` (an update at the
    schedule's last learning rate, and a ``checkpoint-<max_steps + 1>``). Such a checkpoint is
    loaded instead (weights and trainer state, then the best checkpoint under
    ``load_best_model_at_end``), nothing is trained, and the caller goes on to save the lens and
    evaluate, which finishes a run that was stopped after its last checkpoint.
    Returns whether training ran."""
    import os

    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import TrainerState

    if resume is not None:
        state = TrainerState.load_from_json(os.path.join(resume, TRAINER_STATE_NAME))
        args = trainer.args
        end = args.max_steps if args.max_steps > 0 else None
        if end is None and state.num_train_epochs == args.num_train_epochs:
            end = state.max_steps  # epoch-based: the recorded length, when the epochs are unchanged
        if end is not None and state.global_step >= end:
            if trainer.is_deepspeed_enabled:
                raise ConfigError(
                    f"{resume} is at step {state.global_step}, the end of the schedule (max_steps={end}): "
                    "nothing is left to train. Raise max_steps to train longer."
                )
            log(
                f"{resume} is at step {state.global_step}, the end of the schedule (max_steps={end}): "
                "nothing left to train; loading it to save the lens and evaluate (raise max_steps to "
                "train longer)."
            )
            trainer._load_from_checkpoint(resume)
            trainer.state = state
            best = state.best_model_checkpoint
            if args.load_best_model_at_end and best is not None and os.path.isdir(best):
                log(f"load_best_model_at_end: loading {best}")
                trainer._load_best_model()  # what train() would have done at its end
            return False
    trainer.train(resume_from_checkpoint=resume)
    return True
