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
# 2: absolute base/tokenizer paths, prompt, package version (1: no format_version field).
SIDECAR_VERSION = 2


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
        lens = cls(decoder, encoder, meta)
        # Plain attributes (not submodules: they must stay out of the state dict).
        lens.__dict__["_base_model"] = base
        lens.__dict__["tokenizer"] = tokenizer
        return lens

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
        """Write ``lens_config.json`` (the sidecar: configs, :meth:`sidecar_meta`) and
        ``lens.safetensors`` (trainable and lens-only tensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        for alias in self._tied_aliases():
            sd.pop(alias, None)
        save_file(sd, str(path / LENS_WEIGHTS))
        cfg = {
            "format_version": SIDECAR_VERSION,
            "decoder": self.decoder.config.to_dict(),
            "encoder": self.encoder.config.to_dict(),
            "shared_decoder_base": self.decoder.base is self.encoder.base
            or not any(p.requires_grad for p in self.decoder.base.parameters()),
            "meta": self.sidecar_meta(),
        }
        (path / LENS_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))

    def sidecar_meta(self) -> dict[str, Any]:
        """``meta`` completed with what loading and reading the lens need: absolute paths of the
        base and tokenizer folders (resolved against the working directory of the save), the
        decoder prompt and the package version. Fields a caller recorded are kept as they are."""
        from lens_rl import __version__

        meta = dict(self.meta)
        for given, resolved in (
            ("model_name_or_path", "base_resolved_path"),
            ("tokenizer_name_or_path", "tokenizer_resolved_path"),
        ):
            where = meta.get(given)
            if where and not meta.get(resolved) and Path(where).expanduser().is_dir():
                meta[resolved] = str(Path(where).expanduser().resolve())
        meta.setdefault("prompt", self.decoder.config.prompt)
        meta["lens_rl_version"] = __version__
        return meta

    @property
    def base_model(self) -> PreTrainedModel | None:
        """The frozen base model the lens was built or loaded on (what the orig model wraps)."""
        return self.__dict__.get("_base_model")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: PreTrainedModel | str | Path | None = None,
        tokenizer=None,
        dtype=None,
    ) -> ConsistencyLens:
        """Rebuild a saved lens, from any working directory.

        Args:
            path: the lens folder (``lens_config.json`` + ``lens.safetensors``).
            base: the base model, or its folder. Default: the folder recorded at save time (its
                absolute path; a lens saved by an older version records only the path as given,
                tried relative to the working directory). A recorded folder that is missing is an
                error naming it (no Hub fallback); pass ``base=`` then. A lens trained on a Hub id
                loads that id at its recorded revision.
            tokenizer: default: the recorded tokenizer folder, else the base folder.
            dtype: of the base when it is loaded here (default: the lens's ``model_dtype``).

        Raises:
            ConfigError: the base is not the model the lens was trained on (fingerprints differ).
            FileNotFoundError: the lens folder or the recorded base folder is missing.
        """
        path = Path(path).expanduser()
        if not (path / LENS_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path} is not a saved lens: it holds no {LENS_CONFIG} (a lens folder holds "
                f"{LENS_CONFIG} and {LENS_WEIGHTS}, e.g. <output_dir>/lens of a training run)."
            )
        cfg = json.loads((path / LENS_CONFIG).read_text())
        meta = cfg.get("meta", {})
        base_dir: str | None = None
        if base is None or isinstance(base, str | Path):
            base_dir = str(base) if base is not None else recorded_base(path, meta)
            if dtype is None:
                dtype = getattr(torch, meta.get("model_dtype", "float32"))
            hub = base is None and not Path(base_dir).is_dir() and meta.get("base_revision")
            base = load_causal_lm(
                base_dir, dtype=dtype, **({"revision": meta["base_revision"]} if hub else {})
            )
        recorded = meta.get("base_fingerprint")
        if recorded is not None and base_fingerprint(base) != recorded:
            from lens_rl.config import ConfigError

            given = (
                base_dir or getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", "?")
            )
            raise ConfigError(
                f"{path} was trained on the base {meta.get('base_resolved_path') or meta.get('model_name_or_path')!r} "
                f"(fingerprint {recorded}); the base given is {given!r} (fingerprint "
                f"{base_fingerprint(base)}), a different model. Load the lens with its own base."
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(_recorded_tokenizer(meta, base_dir, base))
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

    def explain(self, texts: str | list[str], *, positions: Any = "all", k: int = 8, **kwargs: Any):
        """Explain the activations of ``texts``: best-of-``k`` explanations per position with
        reconstruction error and functional KL (see :func:`lens_rl.explanations.explain`)."""
        from lens_rl.explanations import explain

        return explain(self, texts, positions=positions, k=k, **kwargs)


def _missing_base_error(lens_dir: Path, where: str, given: str | None) -> FileNotFoundError:
    as_given = f" (given as {given!r})" if given and given != where else ""
    return FileNotFoundError(
        f"The lens {lens_dir} was trained on the base model folder {where}{as_given}, which does not "
        f"exist here. Pass the base model folder: ConsistencyLens.from_pretrained({str(lens_dir)!r}, "
        "base=MODEL_DIR), or --model_name_or_path MODEL_DIR on the command line."
    )


def recorded_base(lens_dir: Path, meta: dict[str, Any]) -> str:
    """The base model folder a lens records: its absolute path (newer lenses) or the path as
    given (older ones, relative to the working directory); a Hub id only when the lens was
    trained on one. A recorded local folder that is missing is an error, never a Hub download."""
    given = meta.get("model_name_or_path")
    resolved = meta.get("base_resolved_path")
    if resolved:
        if Path(resolved).is_dir():
            return resolved
        raise _missing_base_error(lens_dir, resolved, given)
    if not given:
        raise ValueError(f"{lens_dir}/{LENS_CONFIG} records no model_name_or_path; pass base=MODEL_DIR.")
    if Path(given).expanduser().is_dir():
        return str(Path(given).expanduser())
    looks_local = given.startswith((".", "/", "~")) or given.count("/") > 1 or "\\" in given
    if looks_local or "base_fingerprint" in meta:  # a lens that records a fingerprint records folders
        raise _missing_base_error(lens_dir, given, None)
    return given  # a Hub id (resolved by transformers' own cache / offline rules)


def _recorded_tokenizer(meta: dict[str, Any], base_dir: str | None, base: PreTrainedModel) -> str:
    """The tokenizer folder: the recorded one if it is here, else the base's folder."""
    for key in ("tokenizer_resolved_path", "tokenizer_name_or_path"):
        where = meta.get(key)
        if where and Path(where).expanduser().is_dir():
            return str(Path(where).expanduser())
    for where in (base_dir, getattr(base, "name_or_path", None)):
        if where and Path(where).expanduser().is_dir():
            return str(Path(where).expanduser())
    return meta.get("tokenizer_name_or_path") or base_dir or base.name_or_path


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
