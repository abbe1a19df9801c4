"""Configuration of the supervised lens stage (``scripts/sft_lens.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lens_rl.config import ConfigError, ValidatedConfig, sub_config
from lens_rl.models.decoder import DecoderConfig
from lens_rl.models.encoder import EncoderConfig
from lens_rl.training.schedules import parse_schedule


@dataclass
class SFTConfig(ValidatedConfig):
    """Supervised consistency-lens training.

    > Data: ``train_data``/``val_data`` are dump split folders (``.../layer_L/train``); or
    > ``on_the_fly`` names a dump YAML whose windows are used with activations computed live.
    > Losses: each weight is a schedule string (see ``lens_rl.training.schedules``).
    """

    # --- model and data
    model_name_or_path: str = field(default="", metadata={"help": "Local folder of the original model."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model folder."})
    train_data: str | None = field(default=None, metadata={"help": "Dump folder of the training split."})
    val_data: str | None = field(default=None, metadata={"help": "Dump folder of the validation split."})
    on_the_fly: str | None = field(
        default=None,
        metadata={"help": "Dump YAML; compute its activations during training instead of reading dumps."},
    )
    decoder: dict | str = field(
        default_factory=dict, metadata={"help": "DecoderConfig options (YAML mapping/JSON)."}
    )
    encoder: dict | str = field(
        default_factory=dict, metadata={"help": "EncoderConfig options (YAML mapping/JSON)."}
    )
    share_base: bool = field(
        default=True,
        metadata={"help": "Decoder/encoder reuse the orig model's frozen weights when not trained."},
    )
    t_text: int = field(default=8, metadata={"help": "Tokens per explanation."})

    # --- losses (weights are schedules)
    mse_weight: str = field(default="1.0", metadata={"help": "Weight of the normalised reconstruction MSE."})
    lm_weight: str = field(
        default="0.0", metadata={"help": "Weight (alpha schedule) of KL(P_orig || P_dec)."}
    )
    kl_weight: str = field(default="0.0", metadata={"help": "Weight of the functional KL at the next token."})
    entropy_weight: str = field(default="0.0", metadata={"help": "Weight of the decoder entropy bonus."})
    gumbel_tau: str = field(default="1.0", metadata={"help": "Gumbel-softmax temperature schedule."})
    lm_natural_prefix: str = field(
        default="<|endoftext|>short explanation of something:",
        metadata={"help": "Text the original model reads before the explanation for the LM KL."},
    )
    resample_ablation: bool = field(
        default=False, metadata={"help": "A_train = Â + stopgrad(A' - Â') (the A' residual trick)."}
    )

    # --- optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "Base learning rate."})
    lr_projection: float = field(default=1.0, metadata={"help": "LR multiplier of the projections."})
    lr_prompt: float = field(default=1.0, metadata={"help": "LR multiplier of the soft prompts."})
    lr_base: float = field(default=0.1, metadata={"help": "LR multiplier of trainable base weights."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (0 on 1-D tensors)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers.get_scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "LR warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    per_device_batch_size: int = field(default=16, metadata={"help": "Samples per process per micro-step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order, Gumbel noise and initialisation."})

    # --- evaluation, logging, checkpoints
    eval_every: int = field(
        default=50, metadata={"help": "Evaluate every N optimizer steps (0: only at the end)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Samples per evaluation batch."})
    num_explanations: int = field(
        default=8, metadata={"help": "Sample explanations shown and saved per eval."}
    )
    log_every: int = field(default=10, metadata={"help": "Log training metrics every N optimizer steps."})
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        default="none", metadata={"help": "Tracker (wandb runs offline unless WANDB_MODE says otherwise)."}
    )
    save_every: int = field(
        default=50, metadata={"help": "Checkpoint every N optimizer steps (0: only at the end)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last k checkpoints."})
    output_dir: str = field(default="outputs/sft", metadata={"help": "Run folder."})
    resume: bool = field(
        default=False, metadata={"help": "Continue from the latest checkpoint in output_dir."}
    )
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png at the end."})

    def validate(self) -> None:
        """Check sources, sizes, schedules and sub-configs; build the typed sub-configs."""
        if not self.model_name_or_path:
            raise ConfigError("SFTConfig.model_name_or_path is required (a local model folder).")
        if bool(self.train_data) == bool(self.on_the_fly):
            raise ConfigError("Give exactly one of train_data (a dump folder) or on_the_fly (a dump YAML).")
        for name in (
            "t_text",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("eval_every", "save_every", "warmup_steps", "num_explanations", "save_total_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.log_every < 1:
            raise ConfigError(f"SFTConfig.log_every must be >= 1, got {self.log_every}.")
        self.schedules = {}
        for name in ("mse_weight", "lm_weight", "kl_weight", "entropy_weight", "gumbel_tau"):
            try:
                self.schedules[name] = parse_schedule(getattr(self, name), f"SFTConfig.{name}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if self.schedules["gumbel_tau"].start <= 0 or self.schedules["gumbel_tau"].end <= 0:
            raise ConfigError(f"SFTConfig.gumbel_tau must stay > 0, got {self.gumbel_tau!r}.")
        if all(self.schedules[n].max_value <= 0 for n in ("mse_weight", "lm_weight", "kl_weight")):
            raise ConfigError("All of mse_weight, lm_weight and kl_weight are 0: nothing would be trained.")
        self.decoder_config = sub_config(self.decoder, DecoderConfig, "decoder")
        self.encoder_config = sub_config(self.encoder, EncoderConfig, "encoder")
        if (
            self.resample_ablation
            and self.schedules["mse_weight"].max_value <= 0
            and self.schedules["kl_weight"].max_value <= 0
        ):
            raise ConfigError(
                "resample_ablation only changes the MSE and functional-KL terms, and both are 0."
            )

    def to_dict(self) -> dict:
        """Plain fields only (no derived objects), for saving with the run."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
