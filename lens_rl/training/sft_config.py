"""Configuration of the supervised lens stage (``scripts/sft_lens.py``).

:class:`LensSFTConfig` is a ``transformers.TrainingArguments`` with the lens fields added, so
the stage speaks the Hugging Face dialect: ``per_device_train_batch_size``,
``gradient_accumulation_steps``, ``max_steps``, ``learning_rate``, ``lr_scheduler_type``,
``warmup_steps``, ``logging_steps``, ``eval_strategy``/``eval_steps``, ``save_steps``,
``save_total_limit``, ``resume_from_checkpoint``, ``report_to``, ``seed``, ``optim``,
``deepspeed`` (ZeRO-1/2/3; FSDP is refused) ... keep their meaning. A few defaults differ from
``TrainingArguments`` (see the fields below, e.g. ``learning_rate`` 1e-3: the projections
train from scratch); fields whose meaning cannot hold for a lens (the token-level evaluation
loop, hub uploads, ...) are refused in ``__post_init__`` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

from lens_rl.config import ConfigError, validate_types
from lens_rl.training.refusals import refuse_missing_deepspeed
from lens_rl.training.schedules import parse_schedule
from lens_rl.training.stage_args import LensStageArguments


@dataclass
class LensSFTConfig(TrainingArguments, LensStageArguments):
    """Supervised consistency-lens training (a ``TrainingArguments`` with lens fields; the fields
    both stages share are :class:`~lens_rl.training.stage_args.LensStageArguments`').

    > Data: ``train_data``/``val_data`` are dump split folders (``.../layer_L/train``); or
    > ``on_the_fly`` names a dump YAML whose windows are used with activations computed live.
    > Losses: each weight is a schedule string over optimizer steps (``lens_rl.training.schedules``).
    """

    # --- model and data (model_name_or_path, train_data, val_data: LensStageArguments)
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model folder."})
    on_the_fly: str | None = field(
        default=None,
        metadata={"help": "Dump YAML; compute its activations during training instead of reading dumps."},
    )
    share_base: bool = field(
        default=True,
        metadata={"help": "Decoder/encoder reuse the orig model's frozen weights when not trained."},
    )
    init_lens: str | None = field(
        default=None,
        metadata={
            "help": "Warm start (continued supervised training): a saved lens folder whose weights, "
            "decoder/encoder configs and activation statistics the run starts from; the optimizer and "
            "the schedule start fresh. Default: a fresh lens (decoder/encoder options)."
        },
    )

    # --- losses (weights are schedules)
    mse_weight: str = field(default="1.0", metadata={"help": "Weight of the normalised reconstruction MSE."})
    lm_weight: str = field(
        default="0.0", metadata={"help": "Weight (alpha schedule) of KL(P_orig || P_dec)."}
    )
    kl_weight: str = field(default="0.0", metadata={"help": "Weight of the functional KL at the next token."})
    entropy_weight: str = field(default="0.0", metadata={"help": "Weight of the decoder entropy bonus."})
    gumbel_tau: str = field(default="1.0", metadata={"help": "Gumbel-softmax temperature schedule."})
    resample_ablation: bool = field(
        default=False, metadata={"help": "A_train = Â + stopgrad(A' - Â') (the A' residual trick)."}
    )

    # --- per-group learning-rate multipliers (AdamW groups by module ownership)
    lr_projection: float = field(default=1.0, metadata={"help": "LR multiplier of the projections."})
    lr_prompt: float = field(default=1.0, metadata={"help": "LR multiplier of the soft prompts."})
    lr_base: float = field(default=0.1, metadata={"help": "LR multiplier of trainable base weights."})

    # --- outputs
    num_completions_to_print: int = field(
        default=8,
        metadata={
            "help": "Sample explanations printed and saved per evaluation (TRL's GRPOConfig name, "
            "shared with the RL stage)."
        },
    )
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png at the end."})

    # --- TrainingArguments fields whose default differs for a lens
    output_dir: str | None = field(default="outputs/sft", metadata={"help": "Run folder."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Base learning rate (projections train from scratch)."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (0 on 1-D tensors)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Activations per process per micro-step."}
    )
    per_device_eval_batch_size: int = field(
        default=64, metadata={"help": "Activations per process per evaluation batch."}
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps (-1: use num_train_epochs)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_strategy: str = field(
        default="steps", metadata={"help": "'steps', 'epoch' or 'no' (the final evaluation always runs)."}
    )
    eval_steps: float | None = field(default=50, metadata={"help": "Evaluate every N optimizer steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the last k checkpoints."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, Gumbel noise and initialisation."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: lens batches are fixed records."}
    )
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last incomplete batch of an epoch."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Every trainable lens parameter receives a gradient, so DDP need not search."},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; default: on with a CUDA GPU that supports it."}
    )

    def __post_init__(self) -> None:
        import torch

        own = {f.name for f in dataclasses.fields(LensSFTConfig)} - {
            f.name for f in dataclasses.fields(TrainingArguments)
        }
        validate_types(self, only=own)
        if isinstance(self.resume_from_checkpoint, bool):
            self.resume_from_checkpoint = "true" if self.resume_from_checkpoint else None
        if self.bf16 is None and torch.cuda.is_available():
            self.bf16 = bool(torch.cuda.is_bf16_supported())
        self.check_stage_before_parent()
        refuse_missing_deepspeed(self)
        super().__post_init__()
        self._validate_lens()

    def _validate_lens(self) -> None:
        """Check sources, sizes, schedules and sub-configs; build the typed sub-configs."""
        self.check_stage_after_parent()
        if bool(self.train_data) == bool(self.on_the_fly):
            raise ConfigError("Give exactly one of train_data (a dump folder) or on_the_fly (a dump YAML).")
        if self.val_data and self.on_the_fly:
            raise ConfigError("val_data is for dumps; with on_the_fly the YAML's val split is used.")
        if self.max_steps == 0:
            raise ConfigError("LensSFTConfig.max_steps must be >= 1 (or -1 to use num_train_epochs).")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LensSFTConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_completions_to_print < 0:
            raise ConfigError(
                f"LensSFTConfig.num_completions_to_print must be >= 0, got {self.num_completions_to_print}."
            )
        for name in ("lr_projection", "lr_prompt", "lr_base"):
            if getattr(self, name) < 0:
                raise ConfigError(f"LensSFTConfig.{name} must be >= 0, got {getattr(self, name)}.")
        strategy = getattr(self.eval_strategy, "value", self.eval_strategy)  # an enum after __post_init__
        if strategy != "no" and not (self.val_data or self.on_the_fly):
            raise ConfigError(
                f"eval_strategy={strategy!r} needs a validation split: give val_data, "
                "or set eval_strategy=no."
            )
        self.schedules = {}
        for name in ("mse_weight", "lm_weight", "kl_weight", "entropy_weight", "gumbel_tau"):
            try:
                self.schedules[name] = parse_schedule(getattr(self, name), f"LensSFTConfig.{name}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if self.schedules["gumbel_tau"].start <= 0 or self.schedules["gumbel_tau"].end <= 0:
            raise ConfigError(f"LensSFTConfig.gumbel_tau must stay > 0, got {self.gumbel_tau!r}.")
        if all(self.schedules[n].max_value <= 0 for n in ("mse_weight", "lm_weight", "kl_weight")):
            raise ConfigError("All of mse_weight, lm_weight and kl_weight are 0: nothing would be trained.")
        self.refuse_fresh_lens_options("init_lens")
        self.build_lens_configs(encoder_trains=True)
        if (
            self.resample_ablation
            and self.schedules["mse_weight"].max_value <= 0
            and self.schedules["kl_weight"].max_value <= 0
        ):
            raise ConfigError(
                "resample_ablation only changes the MSE and functional-KL terms, and both are 0."
            )
