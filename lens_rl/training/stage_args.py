"""The lens fields and checks both training configs share (a base of ``LensSFTConfig`` and
``LensGRPOConfig``, after their ``TrainingArguments``/``GRPOConfig``).

:class:`LensStageArguments` declares the original model, the dump splits, the fresh-lens
sub-configs (``decoder``/``encoder``/``peft_config``), the explanation length, the prefix the
original LM reads before an explanation, and the fields renamed away (refused naming the new
name, :data:`~lens_rl.training.refusals.RENAMED`). Its checks run in two halves around the
upstream ``__post_init__``: :meth:`check_stage_before_parent` (refused fields, the best metric,
the trackers, the CPU/bf16 block, sharded parameters) and :meth:`check_stage_after_parent`
(model loading, guards, explanations, the required model folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lens_rl.config import ConfigError, report_to_list, sub_config
from lens_rl.models.decoder import DecoderConfig
from lens_rl.models.encoder import EncoderConfig
from lens_rl.models.loading import ModelLoadingArguments
from lens_rl.models.lora import PEFT_CONFIG_HELP, apply_peft_config
from lens_rl.training.explain_args import ExplainArguments
from lens_rl.training.guards import RunGuardArguments
from lens_rl.training.refusals import (
    RENAMED,
    TRAINING_ARGS_REFUSED,
    refuse_fields,
    refuse_renamed,
    refuse_sharded_parameters,
    resolve_best_metric,
)

_RENAMED_HELP = "Renamed to {new}; refused (set {new})."


@dataclass
class LensStageArguments(ModelLoadingArguments, RunGuardArguments, ExplainArguments):
    """Lens fields of both training stages (see the module docstring)."""

    # --- model and data
    model_name_or_path: str = field(default="", metadata={"help": "Local folder of the original model."})
    train_data: str | None = field(default=None, metadata={"help": "Dump folder of the training split."})
    val_data: str | None = field(default=None, metadata={"help": "Dump folder of the validation split."})

    # --- a fresh lens
    decoder: dict | str = field(
        default_factory=dict, metadata={"help": "DecoderConfig options of a fresh lens (YAML mapping/JSON)."}
    )
    encoder: dict | str = field(
        default_factory=dict, metadata={"help": "EncoderConfig options of a fresh lens (YAML mapping/JSON)."}
    )
    peft_config: dict | str | None = field(default=None, metadata={"help": PEFT_CONFIG_HELP})

    # --- sharding
    lens_fsdp2: bool = field(
        default=False,
        metadata={
            "help": "Shard the lens with torch's FSDP2 (fully_shard per transformer block, the lens as "
            "root; lens_rl.models.sharding.fully_shard_lens) over all processes, CPU (gloo) or GPU: "
            "needs 2+ processes and trainable bases; the original model stays a replica. docs/sharding.md."
        },
    )

    # --- explanations
    t_text: int = field(default=8, metadata={"help": "Tokens per explanation (fixed length)."})
    lm_prefix: str = field(
        default="<|endoftext|>short explanation of something:",
        metadata={
            "help": "Text the frozen original LM reads before an explanation when it scores it as "
            "language: the LM KL (supervised lm_weight, the evaluations' lm_kl) and GRPO's beta-KL "
            "reference."
        },
    )

    # --- renamed fields: declared only to refuse them naming the new field
    lm_natural_prefix: str | None = field(
        default=None, metadata={"help": _RENAMED_HELP.format(new=RENAMED["lm_natural_prefix"])}
    )
    ref_kl_prefix: str | None = field(
        default=None, metadata={"help": _RENAMED_HELP.format(new=RENAMED["ref_kl_prefix"])}
    )
    num_explanations: int | None = field(
        default=None, metadata={"help": _RENAMED_HELP.format(new=RENAMED["num_explanations"])}
    )

    def check_stage_before_parent(self, refused: tuple[dict[str, tuple[object, str]], ...] = ()) -> None:
        """Checks and defaults that must run before the upstream ``__post_init__``: renamed and
        refused fields (``TRAINING_ARGS_REFUSED`` and ``refused``), ``t_text``, the best metric,
        ``report_to``, sharded parameters, and the device: without CUDA the lens trains in fp32
        (``bf16`` unset means off; bf16/fp16 are refused) on the CPU (``use_cpu``)."""
        import torch

        refuse_renamed(self)
        for table in (TRAINING_ARGS_REFUSED, *refused):
            refuse_fields(self, table)
        resolve_best_metric(self)
        self.report_to = report_to_list(self.report_to)
        if self.t_text < 1:
            raise ConfigError(f"{type(self).__name__}.t_text must be >= 1, got {self.t_text}.")
        refuse_sharded_parameters(self)
        if not torch.cuda.is_available():
            if self.bf16 is None:
                self.bf16 = False
            if self.bf16 or self.fp16:
                raise ConfigError(
                    "bf16/fp16 autocast of the lens needs a GPU here; on CPU the lens trains in fp32 "
                    "(set bf16=false, fp16=false)."
                )
            # Without this, N processes started by `accelerate launch` on a CPU machine would each
            # run alone (DistributedType.NO) instead of as one gloo group.
            self.use_cpu = True

    def check_stage_after_parent(self) -> None:
        """Checks that run after the upstream ``__post_init__``: the model-loading kernel, the
        required model folder, the run guards and the end-of-run explanations."""
        self.check_model_loading()
        if not self.model_name_or_path:
            raise ConfigError(f"{type(self).__name__}.model_name_or_path is required (a local model folder).")
        self.check_run_guards()
        self.check_explain()

    def refuse_fresh_lens_options(self, lens_field: str) -> None:
        """A stage that starts from a saved lens (``lens_field``: ``sft_lens`` or ``init_lens``)
        takes that lens's own decoder/encoder configs; ``decoder``/``encoder`` options (and a
        ``share_base`` other than the default) would be ignored, so they are refused naming them."""
        path = getattr(self, lens_field, None)
        if not path:
            return
        given = [name for name in ("decoder", "encoder") if getattr(self, name)]
        if getattr(self, "share_base", True) is not True:
            given.append("share_base")
        if given:
            raise ConfigError(
                f"{type(self).__name__}.{lens_field}={path!r} brings the lens's own decoder and encoder "
                f"configs; {', '.join(f'{n}={getattr(self, n)!r}' for n in given)} would be ignored. "
                f"Remove {' / '.join(given)} (or start from a fresh lens without {lens_field})."
            )

    def build_lens_configs(self, encoder_trains: bool) -> None:
        """Set ``decoder_config``/``encoder_config`` from ``decoder``/``encoder`` and apply
        ``peft_config`` to them (LoRA on the encoder only when ``encoder_trains``)."""
        self.decoder_config = sub_config(self.decoder, DecoderConfig, "decoder")
        self.encoder_config = sub_config(self.encoder, EncoderConfig, "encoder")
        self.peft_config = apply_peft_config(
            self.peft_config, self.decoder_config, self.encoder_config, encoder_trains
        )
