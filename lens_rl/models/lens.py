"""A consistency lens: decoder + encoder, saved and loaded as one unit.

Frozen base weights are not saved (they come from the model folder recorded in
``lens_config.json``); trainable base weights, projections and prompts are. ``forward`` runs a
caller-supplied function on the lens so that a DDP/DeepSpeed wrapper sees the whole loss
computation pass through its forward (needed for gradient synchronisation).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from lens_rl.models.decoder import Decoder, DecoderConfig
from lens_rl.models.encoder import Encoder, EncoderConfig
from lens_rl.models.families import load_causal_lm

LENS_CONFIG = "lens_config.json"
LENS_WEIGHTS = "lens.safetensors"


def base_fingerprint(model: PreTrainedModel) -> str:
    """A cheap, dtype-independent fingerprint of a model's weights: sha256 over every parameter's
    name, shape and up to 4,096 evenly strided values rounded to bf16 (the same for the model
    loaded in fp32 or bf16, different for another checkpoint of the same shape)."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel()), device=flat.device).long()
            sample = flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
            h.update(f"{name}:{tuple(p.shape)};".encode())
            h.update(sample)
    return h.hexdigest()[:20]


def base_record(model: PreTrainedModel, model_name_or_path: str) -> dict[str, Any]:
    """What a lens records about its base: the path as given and resolved, the hub revision when
    the config knows it, and :func:`base_fingerprint`."""
    resolved = Path(model_name_or_path).expanduser()
    return {
        "model_name_or_path": model_name_or_path,
        "base_resolved_path": str(resolved.resolve()) if resolved.exists() else None,
        "base_revision": getattr(model.config, "_commit_hash", None),
        "base_fingerprint": base_fingerprint(model),
    }


class ConsistencyLens(nn.Module):
    """Decoder and encoder of one lens, plus the metadata needed to rebuild them.

    Attributes:
        decoder: activation -> text.
        encoder: text -> activation.
        meta: model path, layer, activation statistics and other facts saved with the weights.
    """

    decoder: Decoder
    encoder: Encoder

    def __init__(self, decoder: Decoder, encoder: Encoder, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.meta = dict(meta or {})

    @classmethod
    def build(
        cls,
        base: PreTrainedModel,
        tokenizer,
        decoder_config: DecoderConfig,
        encoder_config: EncoderConfig,
        share_base: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> ConsistencyLens:
        """Build a fresh lens on ``base`` (shared frozen weights where nothing in them trains)."""
        dec_share = share_base and not (
            decoder_config.trainable_base
            or decoder_config.trainable_embeddings
            or decoder_config.trainable_output_head
            or decoder_config.use_dropout
        )
        enc_share = share_base and not encoder_config.trainable_base
        decoder = Decoder.from_base(base, tokenizer, decoder_config, share_weights=dec_share)
        encoder = Encoder.from_base(base, tokenizer, encoder_config, share_weights=enc_share)
        return cls(decoder, encoder, meta)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(self, *args, **kwargs)``: the loss computation, inside the wrapper's forward."""
        return fn(self, *args, **kwargs)

    def add_lora(self, decoder: dict | None = None, encoder: dict | None = None) -> None:
        """Add LoRA adapters (peft.LoraConfig options) to the decoder and/or encoder base of a built
        or loaded lens; they are saved and reloaded with it (the options go into its config)."""
        if decoder is not None:
            self.decoder.enable_lora(decoder)
        if encoder is not None:
            self.encoder.enable_lora(encoder)

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Checkpoint the blocks of the decoder's cache-free passes (``fwd_tokens``,
        ``generate_soft``) and of the encoder (the ``transformers`` signature, so ``Trainer`` and
        TRL's ``gradient_checkpointing`` fields drive it). The KV-cached generator is not
        checkpointed: its cache is the activation memory it keeps by design."""
        from lens_rl.config import ConfigError

        if offload:
            raise ConfigError("gradient_checkpointing_kwargs offload=True is not supported by the lens.")
        if every_n_layers < 1:
            raise ConfigError(f"gradient_checkpointing every_n_layers must be >= 1, got {every_n_layers}.")
        spec = {
            "every_n_layers": every_n_layers,
            "checkpoint_kwargs": dict(gradient_checkpointing_kwargs or {}),
        }
        if spec["checkpoint_kwargs"].get("use_reentrant"):
            raise ConfigError(
                "gradient_checkpointing_kwargs use_reentrant=True cannot pass the blocks' keyword "
                "arguments; leave it unset (non-reentrant)."
            )
        self.decoder.checkpointing = spec
        self.encoder.checkpointing = spec

    def gradient_checkpointing_disable(self) -> None:
        """Store activations again."""
        self.decoder.checkpointing = self.encoder.checkpointing = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether block checkpointing is on."""
        return self.decoder.checkpointing is not None

    # ------------------------------------------------------------------ state
    def _frozen_base_keys(self) -> set[str]:
        keys = set()
        for prefix, module in (("decoder.base.", self.decoder.base), ("encoder.base.", self.encoder.base)):
            for name, p in module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    keys.add(prefix + name)
            for name, _ in module.named_buffers(remove_duplicate=False):
                keys.add(prefix + name)
        return keys

    def state_dict(self, *args, **kwargs):  # noqa: D102 - see module docstring
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        frozen = {prefix + k for k in self._frozen_base_keys()}
        # Empty tensors (an empty soft prompt) are dropped: savers see them as shared storage.
        return type(sd)((k, v) for k, v in sd.items() if k not in frozen and v.numel() > 0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = self._frozen_base_keys()
        tied = self._tied_aliases()
        empty = {k for k, p in self.named_parameters(remove_duplicate=False) if p.numel() == 0}
        missing = [k for k in result.missing_keys if k not in frozen and k not in tied and k not in empty]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Lens state mismatch: missing {missing}, unexpected {result.unexpected_keys}. "
                "Was it saved with another decoder/encoder config?"
            )
        return result

    def _tied_aliases(self) -> set[str]:
        """Names of parameters that alias another one (tied embeddings); savers keep one name."""
        seen: dict[int, str] = {}
        aliases = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                aliases.add(name)
            else:
                seen[id(p)] = name
        return aliases

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``lens_config.json`` and ``lens.safetensors`` (trainable and lens-only tensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        for alias in self._tied_aliases():
            sd.pop(alias, None)
        save_file(sd, str(path / LENS_WEIGHTS))
        cfg = {
            "decoder": self.decoder.config.to_dict(),
            "encoder": self.encoder.config.to_dict(),
            "shared_decoder_base": self.decoder.base is self.encoder.base
            or not any(p.requires_grad for p in self.decoder.base.parameters()),
            "meta": self.meta,
        }
        (path / LENS_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, base: PreTrainedModel | None = None, tokenizer=None, dtype=None
    ) -> ConsistencyLens:
        """Rebuild a saved lens; ``base`` defaults to the model folder recorded at save time, loaded
        in ``dtype`` (default: the ``model_dtype`` the lens was trained in, else fp32)."""
        path = Path(path)
        cfg = json.loads((path / LENS_CONFIG).read_text())
        meta = cfg.get("meta", {})
        model_path = meta.get("model_name_or_path")
        if base is None:
            if not model_path:
                raise ValueError(f"{path}/{LENS_CONFIG} records no model_name_or_path; pass base=.")
            if dtype is None:
                dtype = getattr(torch, meta.get("model_dtype", "float32"))
            base = load_causal_lm(model_path, dtype=dtype)
        recorded = meta.get("base_fingerprint")
        if recorded is not None and base_fingerprint(base) != recorded:
            from lens_rl.config import ConfigError

            given = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", "?")
            raise ConfigError(
                f"{path} was trained on the base {meta.get('base_resolved_path') or model_path!r} "
                f"(fingerprint {recorded}); the base given is {given!r} (fingerprint "
                f"{base_fingerprint(base)}), a different model. Load the lens with its own base."
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(meta.get("tokenizer_name_or_path") or model_path)
        lens = cls.build(
            base,
            tokenizer,
            DecoderConfig(**cfg["decoder"]),
            EncoderConfig(**cfg["encoder"]),
            share_base=True,
            meta=meta,
        )
        lens.load_state_dict(load_file(str(path / LENS_WEIGHTS)))
        return lens


class LensModule(nn.Module):
    """The lens as a ``transformers.Trainer`` / TRL model: what both training stages hand over.

    ``forward(fn, *args)`` runs ``fn(lens, *args)`` so that a DDP/DeepSpeed wrapper sees the
    whole loss computation pass through its forward. The state dict is the lens's own (frozen
    base weights excluded, one name per tied tensor, keys prefixed ``lens.``), and loading it
    is always strict: a checkpoint that misses a trainable tensor, or holds one this lens does
    not have, is an error naming the keys, never a silent partial load (Trainer asks for
    ``strict=False``). ``config``/``generation_config`` are copies of the decoder base's, which
    the trainers read (and write to).
    """

    _keys_to_ignore_on_save = None  # read by transformers' Trainer when saving a checkpoint
    accepts_loss_kwargs = False  # the Trainer scales the loss by the accumulation steps itself

    def __init__(self, lens: ConsistencyLens) -> None:
        super().__init__()
        self.lens = lens
        # Copies: the trainers write to them (use_cache, special-token alignment), and the real
        # base config may be the frozen original model's own.
        self.config = copy.deepcopy(lens.decoder.base.config)
        self.generation_config = copy.deepcopy(lens.decoder.base.generation_config)

    def add_model_tags(self, tags: Any) -> None:
        """TRL tags hub models; nothing to do for a lens."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """See :meth:`ConsistencyLens.gradient_checkpointing_enable`."""
        self.lens.gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """See :meth:`ConsistencyLens.gradient_checkpointing_disable`."""
        self.lens.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the lens checkpoints its blocks."""
        return self.lens.is_gradient_checkpointing

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(lens, *args, **kwargs)`` inside the (possibly DDP-wrapped) forward."""
        return fn(self.lens, *args, **kwargs)

    def state_dict(self, *args, **kwargs):  # noqa: D102 - see the class docstring
        sd = self.lens.state_dict()
        for alias in self.lens._tied_aliases():
            sd.pop(alias, None)
        return {f"lens.{k}": v for k, v in sd.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        inner = {k.removeprefix("lens."): v for k, v in state_dict.items()}
        return self.lens.load_state_dict(inner, strict=True, assign=assign)
