"""Configuration of the entropy probe (``scripts/entropy_probe.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lens_rl.config import ConfigError, ValidatedConfig
from lens_rl.probe.estimators import BASELINES

# Fields a run sets (trl_checkpoint) unless given explicitly; their built-in defaults otherwise.
BUILTIN_DEFAULTS: dict[str, object] = {
    "policy": "lm",
    "num_generations": 4,
    "max_new_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "learning_rate": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "loss_type": "dapo",
    "scale_rewards": "group",
}
RUN_FIELDS: tuple[str, ...] = (*BUILTIN_DEFAULTS, "model_name_or_path", "lens_path", "activations")


@dataclass
class EntropyProbeConfig(ValidatedConfig):
    """One probe: sample E and U, compute v, predict deltaH, measure it over an eta sweep."""

    # ---- the policy
    policy: Literal["lm", "lens"] | None = field(
        default=None,
        metadata={
            "help": "lm: a causal LM with text prompts; lens: a lens decoder with activations "
            "(default: lens with trl_checkpoint, else lm)."
        },
    )
    model_name_or_path: str = field(
        default="", metadata={"help": "Local LM directory (lens: the base LM; default: the run's)."}
    )
    lens_path: str | None = field(
        default=None,
        metadata={
            "help": "Saved lens directory (policy=lens; default: the run's sft_lens or its fresh lens)."
        },
    )
    activations: str | None = field(
        default=None,
        metadata={
            "help": "Activation dump split directory: the prompt pool (policy=lens; default: the run's)."
        },
    )
    prompt_dataset: str = field(default="pydoc_openings", metadata={"help": "Registered prompt pool (lm)."})
    prompt_split: str = field(default="train", metadata={"help": "Split of the prompt pool."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "Text file, one prompt per line (overrides prompt_dataset)."}
    )
    pool_size: int | None = field(
        default=None, metadata={"help": "Use the first N pool entries (None: all)."}
    )
    reward: str = field(
        default="distinct_tokens",
        metadata={
            "help": "lm: distinct_tokens | length | 'module:function' (TRL reward signature). "
            "lens: always the reconstruction reward."
        },
    )

    # ---- batches and sampling policy (shared by sampler, log q, RB entropy and weights)
    batch_size_e: int = field(default=256, metadata={"help": "B_E: evaluation sequences (with replacement)."})
    batch_size_u: int = field(default=8, metadata={"help": "B_U: prompts in the update batch."})
    num_generations: int | None = field(
        default=None, metadata={"help": "G: responses per update prompt (4)."}
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Response length (16; lens: the explanation length t_text; also dr_grpo's "
            "max_completion_length)."
        },
    )
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (1.0)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus mass (1.0: off)."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p (0.0: off)."})
    gen_batch_size: int = 64
    tf_batch_size: int = 32

    # ---- the update (as training would take it)
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "lr of the step whose effect is probed (1e-4; with trl_checkpoint: the lr the run's "
            "scheduler gives the next step)."
        },
    )
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_epsilon: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Gradient clipping (1.0; 0: off, as transformers)."}
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"] | None = field(
        default=None,
        metadata={
            "help": "TRL loss_type (dapo; normalised by lens_rl.training.loss_norm); vespo is not supported."
        },
    )
    scale_rewards: Literal["group", "batch", "none"] | None = None
    optimizer_state: str | None = field(
        default=None,
        metadata={"help": "torch.save'd AdamW state_dict for the same parameter groups (None: fresh)."},
    )
    trl_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint-N folder of scripts/rl_lens.py, or its output folder (the latest "
            "checkpoint): the probe takes the run's settings (next step's lr from the scheduler, sampling "
            "policy, loss_type, G, t_text, base model, lens, data), its lens weights and AdamW state. "
            "Fields given explicitly override the run's and are reported as overrides."
        },
    )
    verify_update: bool = field(default=True, metadata={"help": "Check v against a real optimizer.step()."})

    # ---- estimators
    etas: list[float] | None = field(
        default=None, metadata={"help": "Step sizes to probe (None: 0.25, 0.5, 1, 2, 4 x learning_rate)."}
    )
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    cross_fit_folds: int = 2
    ridge: float = 1e-3
    jvp_method: Literal["jvp", "double_backward"] = "jvp"
    clip_log_weight: float | None = field(default=None, metadata={"help": "Clip |log w| (None: no clip)."})
    se_method: Literal["jackknife", "bootstrap"] = "jackknife"
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    entropy_fp64: bool = True
    resample_check: bool = field(
        default=True,
        metadata={"help": "Also re-sample E at theta + eta v with the same noise (paired, small models)."},
    )

    # ---- run
    seed: int = 0
    output_dir: str = "outputs/entropy_probe"
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace config.json / results.json / probe.png already in output_dir."},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def __post_init__(self) -> None:
        self.explicit = sorted(f for f in RUN_FIELDS if getattr(self, f) not in (None, ""))
        if self.trl_checkpoint is None:
            self.fill_defaults()
        super().__post_init__()

    def fill_defaults(self) -> None:
        """Set every field still unset (None) to its built-in default."""
        for name, value in BUILTIN_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def resolved(self) -> bool:
        """Whether every run-derived field has a value (after :meth:`fill_defaults`)."""
        return all(getattr(self, name) is not None for name in BUILTIN_DEFAULTS)

    def validate(self) -> None:  # noqa: D102
        if not self.resolved:  # trl_checkpoint: checked again once the run's settings are in
            if self.optimizer_state:
                raise ConfigError("Give trl_checkpoint (it holds optimizer.pt) or optimizer_state, not both.")
            return
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (a local model directory).")
        if self.policy == "lens" and (
            self.activations is None or (self.lens_path is None and not self.trl_checkpoint)
        ):
            raise ConfigError("policy=lens needs lens_path (a saved lens) and activations (a dump split).")
        if self.policy == "lm" and (self.lens_path or self.activations or self.trl_checkpoint):
            raise ConfigError("lens_path/activations/trl_checkpoint are for policy=lens; set policy: lens.")
        if self.trl_checkpoint and self.optimizer_state:
            raise ConfigError("Give trl_checkpoint (it holds optimizer.pt) or optimizer_state, not both.")
        for name in ("batch_size_e", "batch_size_u", "max_new_tokens", "gen_batch_size", "tf_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size_e < 2:
            raise ConfigError("batch_size_e must be >= 2 for standard errors.")
        if self.num_generations < 2:
            raise ConfigError("num_generations must be >= 2: GRPO advantages are relative to the group.")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown or not self.baselines:
            raise ConfigError(f"baselines must be a non-empty subset of {BASELINES}, got {self.baselines}.")
        if self.cross_fit_folds < 1:
            raise ConfigError("cross_fit_folds must be >= 1 (1 = fit in-sample, biased; 2+ = cross-fitted).")
        if not 0 < self.ci_level < 1:
            raise ConfigError(f"ci_level must be in (0, 1), got {self.ci_level}.")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be finite and > 0, got {self.learning_rate}.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError(f"pool_size must be >= 1 (None: the whole pool), got {self.pool_size}.")
        ranges = (  # field, low, high, low end included, high end included, what it is
            ("temperature", 0.0, math.inf, False, False, "sampling temperature"),
            ("top_p", 0.0, 1.0, False, True, "nucleus mass; 1.0: off"),
            ("min_p", 0.0, 1.0, True, False, "0.0: off"),
            ("adam_beta1", 0.0, 1.0, True, False, "AdamW"),
            ("adam_beta2", 0.0, 1.0, True, False, "AdamW"),
            ("adam_epsilon", 0.0, math.inf, False, False, "AdamW"),
            ("weight_decay", 0.0, math.inf, True, False, "AdamW"),
            ("ridge", 0.0, math.inf, True, False, "ridge penalty of the fitted baselines"),
        )
        for name, low, high, low_in, high_in, what in ranges:
            v = getattr(self, name)
            if not ((v >= low if low_in else v > low) and (v <= high if high_in else v < high)):
                shown = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise ConfigError(f"{name} must be in {shown} ({what}), got {v}.")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}.")
        if self.n_bootstrap < 2:
            raise ConfigError(f"n_bootstrap must be >= 2 (bootstrap resamples), got {self.n_bootstrap}.")
        if self.etas is not None and (not self.etas or any(e <= 0 for e in self.etas)):
            raise ConfigError(f"etas must be positive step sizes, got {self.etas}.")
        if self.clip_log_weight is not None and self.clip_log_weight <= 0:
            raise ConfigError("clip_log_weight must be > 0 (or None).")

    @property
    def eta_list(self) -> list[float]:
        """The eta sweep (absolute step sizes; ``eta = learning_rate`` is the real step)."""
        if self.etas is not None:
            return sorted(self.etas)
        return [m * self.learning_rate for m in (0.25, 0.5, 1.0, 2.0, 4.0)]
