"""Supervised consistency-lens training on ``transformers.Trainer``.

:class:`LensSFTTrainer` is a ``Trainer`` whose model is the lens (:class:`LensModule`); it
overrides only what a lens needs:

- ``compute_loss``: the lens objective (:func:`~lens_rl.training.sft_losses.sft_losses`) with
  the loss-weight and Gumbel-temperature schedules read at ``state.global_step``, and Gumbel
  noise from an explicit generator seeded from (seed, global step, micro-step, process), so a
  resumed run draws exactly the noise the uninterrupted run drew;
- ``create_optimizer``: the optimizer ``optim`` names, built on the lens's parameter groups
  (projections, prompts, base; no decay on 1-D tensors and prompts) with per-group LR
  multipliers, which the Trainer's LR schedule scales together;
- ``evaluate``: the whole-set lens evaluation (FVE, normalised MSE, functional and LM KL,
  baselines) sharded over processes, logged as ``eval_*`` and with sample explanations, both
  printed as tables on the main process (:class:`~lens_rl.training.evaluate.LensEvaluationMixin`,
  shared with the RL trainer);
- ``log``: adds the loss parts, schedule values and per-group learning rates.

Everything else (DDP/DeepSpeed/FSDP through accelerate, gradient accumulation and clipping,
LR schedules, ``checkpoint-N`` folders with rotation, ``resume_from_checkpoint``,
``report_to``, callbacks) is the Trainer's own. :func:`run_sft` builds the pieces, trains,
saves the lens, evaluates it, and explains ``explain_texts`` held-out windows at every position
(:func:`lens_rl.training.reports.report_samples`: a table, ``explanations.html``,
``explanations_val.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from lens_rl.data.dataset import materialize
from lens_rl.models.lens import ConsistencyLens, LensModule
from lens_rl.models.orig import OrigWrapper
from lens_rl.ops.sampling import step_seed
from lens_rl.training.evaluate import LensEvaluationMixin
from lens_rl.training.guards import NonFiniteGuard, train_or_finish
from lens_rl.training.optim import optimizer_on_groups
from lens_rl.training.plots import plot_curves
from lens_rl.training.reports import end_of_run_report
from lens_rl.training.sft_config import LensSFTConfig
from lens_rl.training.sft_losses import StepWeights, sft_losses
from lens_rl.training.sharded import ShardedCheckpointMixin, final_lens, prepare_sharding, save_lens
from lens_rl.training.stage import checkpoint_step, claimed_stage, load_stage_inputs, stage_lens
from lens_rl.training.trackers import log_lens_artifact
from lens_rl.utils.files import iter_jsonl, write_jsonl
from lens_rl.utils.launch import check_world_size

METRICS_FILE = "metrics.jsonl"
EXPLANATIONS_FILE = "explanations.jsonl"


def param_groups(lens: ConsistencyLens, args: LensSFTConfig) -> list[dict[str, Any]]:
    """Optimizer groups by module ownership (not name substrings), each with its LR multiplier
    applied to ``learning_rate``; no weight decay on 1-D tensors and prompts."""
    dec, enc = lens.decoder, lens.encoder
    owners: list[tuple[str, list[torch.nn.Parameter], float]] = [
        ("projection", [*dec.projection_parameters(), *enc.proj.parameters()], args.lr_projection),
        ("prompt", [*dec.prompt_parameters(), enc.prompt_left_emb, enc.prompt_right_emb], args.lr_prompt),
    ]
    claimed = {id(p) for _, ps, _ in owners for p in ps}
    base = [p for p in lens.parameters() if id(p) not in claimed]  # base weights of decoder/encoder
    owners.append(("base", base, args.lr_base))
    groups = []
    seen: set[int] = set()
    for name, params, mult in owners:
        params = [p for p in params if p.requires_grad and id(p) not in seen and not seen.add(id(p))]
        decay = [p for p in params if p.dim() >= 2 and name != "prompt"]
        no_decay = [p for p in params if not (p.dim() >= 2 and name != "prompt")]
        for suffix, ps, wd in (("", decay, args.weight_decay), ("_no_decay", no_decay, 0.0)):
            if ps:
                groups.append(
                    {"name": name + suffix, "params": ps, "lr": args.learning_rate * mult, "weight_decay": wd}
                )
    if not groups:
        raise ValueError("No trainable parameters: every trainable_* flag of decoder and encoder is False.")
    return groups


class _MetricsFile(TrainerCallback):
    """Append every log row (train and eval) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class _FinalEvaluationAfterSave(TrainerCallback):
    """Skip the Trainer's evaluation at the last step: :func:`run_sft` evaluates once the
    final checkpoint and the lens are on disk, so a failing evaluation loses nothing.

    Not when a best checkpoint is tracked (``metric_for_best_model`` set: ``save_strategy="best"``,
    ``load_best_model_at_end``, or plain ``best_model_checkpoint`` bookkeeping): the last step's
    evaluation decides whether the last step is the best checkpoint, so it stays (and the final
    evaluation, seeded the same, repeats its values)."""

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.global_step >= state.max_steps and args.metric_for_best_model is None:
            control.should_evaluate = False
        return control


class LensSFTTrainer(ShardedCheckpointMixin, LensEvaluationMixin, Trainer):
    """``transformers.Trainer`` for a consistency lens (see the module docstring)."""

    explanations_file = EXPLANATIONS_FILE

    def __init__(
        self,
        args: LensSFTConfig,
        lens: ConsistencyLens,
        orig: OrigWrapper,
        tokenizer,
        train_dataset,
        eval_dataset=None,
        *,
        layer: int,
        train_mean: torch.Tensor,
        train_var: torch.Tensor,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        self.lens = lens
        self.orig = orig
        self.layer = layer
        self.train_mean, self.train_var = train_mean, train_var
        self.group_names: list[str] = []
        self._metrics: dict[str, list[float]] = {}
        self._noise_step: int | None = None
        self._noise_micro = 0
        self._group_lrs: list[float] = []
        self.last_samples: list[dict[str, Any]] = []
        super().__init__(
            model=LensModule(lens),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=torch.utils.data.default_collate,
            callbacks=[
                NonFiniteGuard(args),
                _FinalEvaluationAfterSave(),
                *(callbacks or []),
            ],
        )
        prepare_sharding(self.accelerator, self.model, orig, fsdp2=args.lens_fsdp2)  # ZeRO-3, FSDP2
        device = self.args.device
        self.orig.to(device)
        self.feature_var = train_var.to(device)
        self.prefix_ids = torch.tensor(
            [tokenizer(args.lm_prefix, add_special_tokens=False)["input_ids"]], device=device
        )

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The optimizer ``optim`` names, on the lens's parameter groups (see :func:`param_groups`)."""
        if self.optimizer is None:
            groups = param_groups(self.lens, self.args)
            self.group_names = [g.pop("name") for g in groups]
            self.optimizer = optimizer_on_groups(
                self, self.model, groups, "the lens's per-group learning rates"
            )
        return self.optimizer

    def step_weights(self, step: int) -> StepWeights:
        """Loss weights and Gumbel temperature at optimizer step ``step``."""
        s = self.args.schedules
        return StepWeights(
            mse=s["mse_weight"](step),
            lm=s["lm_weight"](step),
            kl=s["kl_weight"](step),
            entropy=s["entropy_weight"](step),
            tau=s["gumbel_tau"](step),
        )

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, global step, micro-step within it, process index)."""
        step = self.state.global_step
        if step != self._noise_step:
            self._noise_step, self._noise_micro = step, 0
        else:
            self._noise_micro += 1
        seed = step_seed(self.args.seed, step, self._noise_micro, self.accelerator.process_index)
        return torch.Generator(device).manual_seed(seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The lens loss on one micro-batch, run through the (wrapped) model's forward."""
        batch = materialize(inputs, self.orig, self.layer)
        weights = self.step_weights(self.state.global_step)
        device = batch["A"].device
        losses = model(
            sft_losses,
            self.orig,
            batch,
            weights=weights,
            layer=self.layer,
            t_text=self.args.t_text,
            feature_var=self.feature_var,
            prefix_ids=self.prefix_ids,
            generator=self._noise_generator(device),
            resample_ablation=self.args.resample_ablation,
        )
        if self.optimizer is not None:  # the rates this step's update will use (before the scheduler steps)
            self._group_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for k, v in losses.items():
            if k != "loss":
                self._metrics.setdefault(k, []).append(float(v.detach()))
        return (losses["loss"], losses) if return_outputs else losses["loss"]

    # ------------------------------------------------------------------ logging and evaluation
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss parts (averaged over the interval and the processes), the schedule values
        and each group's learning rate to a training log row."""
        if "loss" in logs and self._metrics:
            keys = sorted(self._metrics)
            local = torch.tensor(
                [sum(self._metrics[k]) / len(self._metrics[k]) for k in keys],
                device=self.args.device,
                dtype=torch.float64,
            )
            mean = self.accelerator.reduce(local, "mean") if self.accelerator.num_processes > 1 else local
            logs.update({k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)})
            self._metrics = {}
            w = self.step_weights(max(self.state.global_step - 1, 0))
            logs.update({"w_mse": w.mse, "w_lm": w.lm, "w_kl": w.kl, "w_entropy": w.entropy, "tau": w.tau})
            for name, lr in zip(self.group_names, self._group_lrs, strict=False):
                logs[f"lr/{name}"] = lr
        super().log(logs, start_time)

    def eval_split(self, eval_dataset=None):
        """``eval_dataset`` if given, else the validation split."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a validation split (val_data or on_the_fly).")
        return dataset


# ---------------------------------------------------------------------- the stage end to end
def build_sft(cfg: LensSFTConfig, callbacks: list[TrainerCallback] | None = None) -> LensSFTTrainer:
    """Load the orig model and the data, build a fresh lens and its trainer (checks run first:
    the data is validated before anything trains; :mod:`lens_rl.training.stage`)."""
    check_world_size(cfg.world_size)
    inputs = load_stage_inputs(cfg)
    train, val = inputs.train, inputs.val
    if cfg.eval_strategy != "no" and val is None:
        raise ValueError(
            f"eval_strategy={getattr(cfg.eval_strategy, 'value', cfg.eval_strategy)!r} but the validation "
            f"split of {cfg.on_the_fly} is empty (num_val: 0); set eval_strategy=no or num_val > 0."
        )
    per_step = cfg.per_device_train_batch_size * cfg.world_size
    if len(train) < per_step:
        raise ValueError(
            f"The training set ({len(train)} samples) is smaller than one batch over all processes "
            f"({cfg.per_device_train_batch_size} x {cfg.world_size}); lower per_device_train_batch_size."
        )
    lens = stage_lens(cfg, inputs)
    lens.train()
    return LensSFTTrainer(
        cfg,
        lens,
        inputs.orig,
        inputs.tokenizer,
        train,
        val,
        layer=inputs.layer,
        train_mean=inputs.train_mean,
        train_var=inputs.train_var,
        callbacks=[_MetricsFile(Path(cfg.output_dir) / METRICS_FILE), *(callbacks or [])],
    )


def _trim_logs(out: Path, step: int) -> None:
    """Drop log rows written after ``step`` (by the run a resume continues), and a last row cut
    short by a full disk or a kill (with a warning naming the file); rewritten atomically."""
    for name in (METRICS_FILE, EXPLANATIONS_FILE):
        path = out / name
        if path.exists():
            rows = []
            for line, r in iter_jsonl(path, partial_tail=True):
                if not (isinstance(r, dict) and isinstance(r.get("step"), int)):
                    raise ValueError(f"{path}:{line}: expected a JSON object with an integer 'step'.")
                rows.append(r)
            write_jsonl(path, [r for r in rows if r["step"] <= step])


def run_sft(cfg: LensSFTConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train to ``max_steps`` (or continue from ``resume_from_checkpoint``), save the lens to
    ``<output_dir>/lens``, then evaluate it; return the final evaluation (without the
    ``eval_`` prefix; empty without a validation split) and the trainer."""
    from accelerate import PartialState

    def start() -> PartialState:
        _ = cfg.device  # sets up the process group exactly as the Trainer will
        return PartialState()

    with claimed_stage(cfg, start) as (_, resume):
        return _train_and_finish(cfg, Path(cfg.output_dir), resume, callbacks)


def _train_and_finish(cfg: LensSFTConfig, out: Path, resume: str | None, callbacks) -> dict[str, Any]:
    """The body of :func:`run_sft` once the output folder is claimed."""
    trainer = build_sft(cfg, callbacks)
    acc = trainer.accelerator
    effective = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.world_size
    acc.print(
        f"sft: world size {cfg.world_size} ({acc.distributed_type}); per-device batch "
        f"{cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps} x "
        f"{cfg.world_size} processes = effective batch {effective}; layer {trainer.layer}"
    )
    if acc.is_main_process:
        (out / "config.json").write_text(cfg.to_json_string())
        if resume:
            step = checkpoint_step(resume)
            _trim_logs(out, step)
            acc.print(f"resuming from {resume} (step {step})")
    acc.wait_for_everyone()
    train_or_finish(trainer, resume, log=acc.print)
    save_lens(trainer, out / "lens")  # a collective under ZeRO-3 and FSDP2
    acc.wait_for_everyone()
    final: dict[str, float] = {}
    if trainer.eval_dataset is not None:
        final = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    if acc.is_main_process:
        (out / "final_metrics.json").write_text(json.dumps(final, indent=2))

        title = f"held-out explanations after {trainer.state.global_step} supervised steps"
        end_of_run_report(
            cfg,
            final_lens(trainer, out / "lens", trainer.orig, trainer.processing_class),
            trainer.orig,
            trainer.eval_dataset,
            trainer.processing_class,
            trainer.layer,
            out,
            title,
            trainer=trainer,
        )
        log_lens_artifact(trainer, out / "lens", final)
        if cfg.plot:
            plot_curves(out / METRICS_FILE, out / "training_curves.png")
    return {"final": final, "trainer": trainer}
