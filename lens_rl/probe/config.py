"""Configuration of the entropy probe (``scripts/entropy_probe.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lens_rl.config import ConfigError, ValidatedConfig
from lens_rl.probe.estimators import BASELINES


@dataclass
class EntropyProbeConfig(ValidatedConfig):
    """One probe: sample E and U, compute v, predict deltaH, measure it over an eta sweep."""

    # ---- the policy
    policy: Literal["lm", "lens"] = field(
        default="lm",
        metadata={"help": "lm: a causal LM with text prompts; lens: a lens decoder with activations."},
    )
    model_name_or_path: str = field(default="", metadata={"help": "Local LM directory (lens: the base LM)."})
    lens_path: str | None = field(default=None, metadata={"help": "Saved lens directory (policy=lens)."})
    activations: str | None = field(
        default=None, metadata={"help": "Activation dump split directory: the prompt pool (policy=lens)."}
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
    num_generations: int = field(default=4, metadata={"help": "G: responses per update prompt."})
    max_new_tokens: int = field(default=16, metadata={"help": "Response length (lens: explanation length)."})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    gen_batch_size: int = 64
    tf_batch_size: int = 32

    # ---- the update (as training would take it)
    learning_rate: float = field(default=1e-4, metadata={"help": "lr of the step whose effect is probed."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"] = field(
        default="dapo",
        metadata={
            "help": "TRL loss_type (normalised by lens_rl.training.loss_norm); vespo is not supported."
        },
    )
    scale_rewards: Literal["group", "batch", "none"] = "group"
    optimizer_state: str | None = field(
        default=None,
        metadata={"help": "torch.save'd AdamW state_dict for the same parameter groups (None: fresh)."},
    )
    trl_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "policy=lens: a checkpoint-N folder of scripts/rl_lens.py; its lens weights and AdamW "
            "state (optimizer.pt) replace lens_path's weights and the fresh optimizer."
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
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def validate(self) -> None:  # noqa: D102
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (a local model directory).")
        if self.policy == "lens" and (self.lens_path is None or self.activations is None):
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
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate must be > 0.")
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
