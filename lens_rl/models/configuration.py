"""The configurations of a lens: its two halves (:class:`DecoderConfig`, :class:`EncoderConfig`)
and what it records about itself (:class:`LensConfig`: its base, layer, explanation length and
activation statistics), all saved in the lens sidecar ``lens_config.json`` and checked when
read, every refusal (:class:`LensFileError`) naming the file and the field. They sit below the
modules that use them so that configs, the sidecar reader and the stages can import them
without the models."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lens_rl.config import ConfigError, InputError, ValidatedConfig
from lens_rl.models.loading import DTYPES
from lens_rl.models.lora import check_lora_config

EMBED_MARKER = "<embed>"


@dataclass
class DecoderConfig(ValidatedConfig):
    """Options of the lens decoder (saved beside its weights as ``decoder_config.json``)."""

    prompt: str = field(
        default="<|endoftext|>short explanation of <embed>:",
        metadata={"help": "Prompt text with one `<embed>` slot; both sides become soft-prompt embeddings."},
    )
    patch_all_layers: bool | int = field(
        default=False,
        metadata={
            "help": "False: A enters at the input slot only. True: also replace the slot at the input "
            "of every block. N: of the first N blocks."
        },
    )
    per_layer_projections: bool = field(
        default=False, metadata={"help": "One projection per patched block (needs patch_all_layers)."}
    )
    trainable_base: bool = field(default=False, metadata={"help": "Train the transformer blocks and norms."})
    trainable_embeddings: bool = field(
        default=False, metadata={"help": "Train the input (and position) embeddings."}
    )
    trainable_output_head: bool = field(
        default=False, metadata={"help": "Train the LM head (untied models)."}
    )
    trainable_projection: bool = field(default=True, metadata={"help": "Train the projection(s) of A."})
    trainable_prompt: bool = field(default=True, metadata={"help": "Train the soft-prompt embeddings."})
    use_dropout: bool = field(default=False, metadata={"help": "Keep the base's dropout on in train mode."})
    lora: dict | None = field(
        default=None,
        metadata={
            "help": "peft.LoraConfig options (r, lora_alpha, target_modules, ...): train LoRA adapters on "
            "the base, which stays frozen and shared (see lens_rl.models.lora)."
        },
    )

    def validate(self) -> None:
        """Reject prompts without exactly one slot and impossible patching combinations."""
        self.lora = check_lora_config(self.lora, "decoder.lora")
        refuse_lora_with_full_training(self.lora, self, "decoder", _FULL_TRAINING)
        if self.prompt.count(EMBED_MARKER) != 1:
            raise ConfigError(
                f"DecoderConfig.prompt must contain exactly one {EMBED_MARKER!r} slot, got {self.prompt!r}."
            )
        if not isinstance(self.patch_all_layers, bool) and self.patch_all_layers < 1:
            raise ConfigError(
                f"DecoderConfig.patch_all_layers must be False, True or a positive layer count, "
                f"got {self.patch_all_layers}."
            )
        if self.per_layer_projections and self.patch_all_layers is False:
            raise ConfigError("DecoderConfig.per_layer_projections=True needs patch_all_layers (True or N).")


_FULL_TRAINING = ("trainable_base", "trainable_embeddings", "trainable_output_head")


def refuse_lora_with_full_training(lora: dict | None, cfg, part: str, names: tuple[str, ...]) -> None:
    """LoRA adapters sit on a base whose weights are shared (frozen); training full base weights
    as well would change the orig model's."""
    on = [n for n in names if getattr(cfg, n)]
    if lora and on:
        raise ConfigError(
            f"{part}.lora trains adapters on the shared frozen base; it cannot be combined with {on}. "
            "Use one or the other."
        )


TEXT_MARKER = "<text>"


@dataclass
class EncoderConfig(ValidatedConfig):
    """Options of the lens encoder (saved beside its weights as ``encoder_config.json``)."""

    prompt: str = field(
        default="",
        metadata={"help": "Soft prompt around the text, split at one `<text>` marker; empty: no prompt."},
    )
    output_layer: int = field(
        default=-1,
        metadata={"help": "Block whose output is read at the last position (negative from the end)."},
    )
    add_current_token: bool = field(
        default=False,
        metadata={"help": "Append the embedding of the token at A's position (needs current_token_ids)."},
    )
    trainable_base: bool = field(default=False, metadata={"help": "Train the encoder's base LM."})
    trainable_projection: bool = field(default=True, metadata={"help": "Train the output projection."})
    trainable_prompt: bool = field(default=True, metadata={"help": "Train the soft-prompt embeddings."})
    lora: dict | None = field(
        default=None,
        metadata={
            "help": "peft.LoraConfig options: train LoRA adapters on the base, which stays frozen and "
            "shared (see lens_rl.models.lora)."
        },
    )

    def validate(self) -> None:
        """A non-empty prompt must contain the marker exactly once; LoRA excludes a trainable base."""
        self.lora = check_lora_config(self.lora, "encoder.lora")
        refuse_lora_with_full_training(self.lora, self, "encoder", ("trainable_base",))
        if self.prompt and self.prompt.count(TEXT_MARKER) != 1:
            raise ConfigError(
                f"EncoderConfig.prompt must be empty or contain exactly one {TEXT_MARKER!r}, got {self.prompt!r}."
            )


class LensFileError(InputError):
    """A lens file (``lens_config.json``, ``lens.safetensors``) is unreadable or holds a value
    that cannot be right; the message names the file and the field or tensor."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_STRINGS = (
    "model_name_or_path",
    "base_resolved_path",
    "base_revision",
    "base_fingerprint",
    "tokenizer_name_or_path",
    "tokenizer_resolved_path",
    "prompt",
    "lens_rl_version",
    "model_dtype",
)
_INTS = {"layer": 0, "t_text": 1}  # field -> smallest valid value
_LISTS = ("train_mean", "train_var")


@dataclass
class LensConfig:
    """What a lens records about itself (the sidecar's ``meta`` object), typed.

    Attributes:
        model_name_or_path: the base model folder as given when the lens was trained.
        base_resolved_path: its absolute path (what loading looks for first).
        base_revision: the Hub revision of the base, when its config knew one (recorded only).
        base_fingerprint: :func:`~lens_rl.models.fingerprint.base_fingerprint` of the base.
        tokenizer_name_or_path / tokenizer_resolved_path: the tokenizer folder, as given / absolute.
        model_dtype: the dtype the base was trained in (float32, bfloat16, float16).
        layer: the block whose output ``A`` is (>= 0).
        t_text: explanation length in tokens (>= 1).
        prompt: the decoder prompt (also in the decoder config).
        lens_rl_version: the version that saved the lens.
        train_mean / train_var: per-feature mean and variance of ``A`` over the training split
            (what FVE and NMSE normalise by; checked against the base by
            :func:`~lens_rl.models.lens.activation_stats`).
        extra: fields a caller recorded that lens_rl does not read; saved back as they are.
    """

    model_name_or_path: str | None = None
    base_resolved_path: str | None = None
    base_revision: str | None = None
    base_fingerprint: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_resolved_path: str | None = None
    model_dtype: str | None = None
    layer: int | None = None
    t_text: int | None = None
    prompt: str | None = None
    lens_rl_version: str | None = None
    train_mean: list[float] | None = None
    train_var: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, meta: Any, where: str = "the lens config") -> LensConfig:
        """Check and type a sidecar's ``meta`` object; unknown fields go to ``extra``.

        Raises:
            LensFileError: naming ``where`` and the field (``meta.<name>``).
        """
        if meta is None:
            meta = {}
        if isinstance(meta, LensConfig):
            return meta
        if not isinstance(meta, dict):
            raise LensFileError(
                f"{where}: field 'meta' must be an object, got {type(meta).__name__} {meta!r:.80}."
            )
        for name in _STRINGS:
            if meta.get(name) is not None and not isinstance(meta[name], str):
                raise LensFileError(
                    f"{where}: field 'meta.{name}' must be a string, got {type(meta[name]).__name__} "
                    f"{meta[name]!r:.80}."
                )
        for name, low in _INTS.items():
            value = meta.get(name)
            if value is not None and not (_is_int(value) and value >= low):
                raise LensFileError(
                    f"{where}: field 'meta.{name}' must be an integer >= {low}, got {type(value).__name__} "
                    f"{value!r:.80}."
                )
        if meta.get("model_dtype") is not None and meta["model_dtype"] not in DTYPES:
            raise LensFileError(
                f"{where}: field 'meta.model_dtype' must be one of {sorted(DTYPES)}, got {meta['model_dtype']!r}."
            )
        for name in _LISTS:
            if meta.get(name) is not None and not isinstance(meta[name], list):
                raise LensFileError(
                    f"{where}: field 'meta.{name}' must be a list of numbers, got {type(meta[name]).__name__}."
                )
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in meta.items() if k in known},
            extra={k: v for k, v in meta.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's ``meta`` object: the recorded fields (None left out) and ``extra``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in out.items() if v is not None} | dict(self.extra)
