"""A consistency lens: decoder + encoder, saved and loaded as one unit.

Frozen base weights are not saved (they come from the model folder recorded in
``lens_config.json``); trainable base weights, projections and prompts are. ``forward`` runs a
caller-supplied function on the lens so that a DDP/DeepSpeed wrapper sees the whole loss
computation pass through its forward (needed for gradient synchronisation).

A lens folder is untrusted input: loading checks the sidecar's fields, that the weights are
readable and finite, and the recorded layer and activation statistics against the base, and
every refusal (:class:`LensFileError`) names the file and the field or tensor.
:func:`base_fingerprint` identifies the base's weights whatever dtype they are loaded in.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoTokenizer, PreTrainedModel

from lens_rl.config import ConfigError
from lens_rl.models.configuration import LensConfig, LensFileError
from lens_rl.models.decoder import Decoder, DecoderConfig
from lens_rl.models.encoder import Encoder, EncoderConfig
from lens_rl.models.families import get_blocks, load_causal_lm
from lens_rl.models.fingerprint import base_fingerprint, base_fingerprints
from lens_rl.models.loading import DTYPES
from lens_rl.version import __version__

LENS_CONFIG = "lens_config.json"
LENS_WEIGHTS = "lens.safetensors"
# 2: absolute base/tokenizer paths, prompt, package version (1: no format_version field).
SIDECAR_VERSION = 2


_STATS = ("train_mean", "train_var")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sub_config(cfg: dict[str, Any], part: str, cls: type, file: Path) -> Any:
    """``cls(**cfg[part])``, every problem named with the file and the field."""
    value = cfg.get(part)
    if not isinstance(value, dict):
        raise LensFileError(
            f"{file}: field {part!r} must be an object of {cls.__name__} options, got "
            f"{type(value).__name__} {value!r:.80}."
        )
    unknown = sorted(set(value) - set(cls.__dataclass_fields__))
    if unknown:
        raise LensFileError(
            f"{file}: field {part!r} has unknown option(s) {unknown} (known: "
            f"{sorted(cls.__dataclass_fields__)}); was it written by another lens_rl version or edited?"
        )
    try:
        return cls(**value)
    except (ConfigError, TypeError, ValueError) as e:
        raise LensFileError(f"{file}: field {part!r}: {e}") from e


def read_sidecar(path: str | Path) -> tuple[dict[str, Any], DecoderConfig, EncoderConfig, LensConfig]:
    """Read and check a lens folder's ``lens_config.json``: ``(the JSON, decoder config, encoder
    config, lens config)``, its ``meta`` object typed and checked as a :class:`LensConfig`
    (:meth:`LensConfig.from_dict`). The activation statistics are checked against the base by
    :func:`activation_stats`.

    Raises:
        FileNotFoundError: no ``lens_config.json`` there.
        LensFileError: unreadable JSON or a field of the wrong type, naming the file and field.
    """
    path = Path(path).expanduser()
    file = path / LENS_CONFIG
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved lens: it holds no {LENS_CONFIG} (a lens folder holds "
            f"{LENS_CONFIG} and {LENS_WEIGHTS}, e.g. <output_dir>/lens of a training run)."
        )
    try:
        cfg = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LensFileError(f"{file} is not valid JSON ({e}): the file is truncated or corrupt.") from e
    if not isinstance(cfg, dict):
        raise LensFileError(f"{file} must hold a JSON object, got {type(cfg).__name__}.")
    version = cfg.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise LensFileError(f"{file}: field 'format_version' must be a positive integer, got {version!r}.")
    if version > SIDECAR_VERSION:
        raise LensFileError(
            f"{file}: format_version {version} was written by a newer lens_rl (this one reads up to "
            f"{SIDECAR_VERSION}); upgrade lens_rl to load it."
        )
    lens_config = LensConfig.from_dict(cfg.get("meta"), str(file))
    return (
        cfg,
        _sub_config(cfg, "decoder", DecoderConfig, file),
        _sub_config(cfg, "encoder", EncoderConfig, file),
        lens_config,
    )


def read_lens_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``lens.safetensors``, every one finite.

    Raises:
        FileNotFoundError: the file is missing.
        LensFileError: the file is truncated or corrupt, or a tensor holds NaN/inf (naming it).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a lens folder holds {LENS_CONFIG} and {LENS_WEIGHTS}.")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise LensFileError(
            f"{file} cannot be read: it is truncated or corrupt ({e}). Save the lens again, or use "
            "another copy (e.g. <output_dir>/checkpoint-N of its training run)."
        ) from e
    bad = {
        k: int((~torch.isfinite(v)).sum())
        for k, v in tensors.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    }
    if bad:
        listed = ", ".join(f"{k} ({n} of {tensors[k].numel()} values)" for k, n in sorted(bad.items())[:5])
        raise LensFileError(
            f"{file}: tensor(s) hold NaN/inf values: {listed}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ". The lens is broken (training diverged before it was saved, or the file is corrupt); "
            "use an earlier checkpoint of its run."
        )
    return tensors


def activation_stats(
    lens_config: LensConfig, d_model: int, where: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The checked activation statistics a lens records: ``(train_mean, train_var)`` as float64
    vectors of ``d_model`` values, or None when it records neither.

    The scores divide by ``mean(train_var)`` (NMSE) and by ``||A - train_mean||²`` (FVE), so
    both must be finite, the variances >= 0 and their mean > 0.

    Args:
        lens_config: what the lens records.
        d_model: the base's hidden size.
        where: how errors name the source (the sidecar file).

    Raises:
        LensFileError: one recorded without the other, or a value that cannot be right.
    """
    recorded = {name: getattr(lens_config, name) for name in _STATS}
    if all(v is None for v in recorded.values()):
        return None
    out = []
    for name, value in recorded.items():
        if value is None:
            other = next(n for n in _STATS if n != name)
            raise LensFileError(f"{where}: field 'meta.{other}' is recorded but 'meta.{name}' is not.")
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise LensFileError(f"{where}: field 'meta.{name}' must be a list of numbers ({e}).") from e
        if isinstance(value, list) and any(isinstance(x, bool) for x in value):
            raise LensFileError(f"{where}: field 'meta.{name}' must be a list of numbers, it holds booleans.")
        if t.dim() != 1 or t.numel() != d_model:
            raise LensFileError(
                f"{where}: field 'meta.{name}' has shape {tuple(t.shape)}; the base's hidden size is "
                f"{d_model}, so it must hold {d_model} values (statistics of another model or a corrupt file)."
            )
        if not bool(torch.isfinite(t).all()):
            raise LensFileError(
                f"{where}: field 'meta.{name}' holds {int((~torch.isfinite(t)).sum())} NaN/inf value(s)."
            )
        out.append(t)
    mean, var = out
    if bool((var < 0).any()) or float(var.mean()) <= 0:
        raise LensFileError(
            f"{where}: field 'meta.train_var' must be variances (>= 0, with a positive mean); it holds "
            f"{int((var < 0).sum())} negative value(s) and has mean {float(var.mean()):g}."
        )
    return mean, var


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
        lens_config: what the lens records about itself (:class:`LensConfig`: base, layer,
            ``t_text``, activation statistics), saved with the weights.
    """

    decoder: Decoder
    encoder: Encoder

    def __init__(
        self, decoder: Decoder, encoder: Encoder, lens_config: LensConfig | dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.lens_config = LensConfig.from_dict(copy.deepcopy(lens_config), "lens_config")

    @classmethod
    def build(
        cls,
        base: PreTrainedModel,
        tokenizer,
        decoder_config: DecoderConfig,
        encoder_config: EncoderConfig,
        share_base: bool = True,
        lens_config: LensConfig | dict[str, Any] | None = None,
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
        lens = cls(decoder, encoder, lens_config)
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
        # Frozen base weights, tied aliases and empty tensors are never saved: not missing.
        return _IncompatibleKeys(missing, list(result.unexpected_keys))

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

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``lens_config.json`` (the sidecar: configs, :meth:`sidecar_config`) and
        ``lens.safetensors`` (trainable and lens-only tensors). ``state_dict``: the tensors to write
        instead of this lens's own, under the same names (a sharded engine's gathered copy, whose
        keys must be exactly :meth:`state_dict`'s)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            own = set(self.state_dict()) - self._tied_aliases()
            if set(state_dict) != own:
                raise ValueError(
                    f"save_pretrained(state_dict=...): keys differ from the lens's own (missing "
                    f"{sorted(own - set(state_dict))[:3]}, unexpected {sorted(set(state_dict) - own)[:3]})."
                )
        sd = {
            k: v.detach().cpu().contiguous().clone()
            for k, v in (self.state_dict() if state_dict is None else state_dict).items()
        }
        for alias in self._tied_aliases():
            sd.pop(alias, None)
        save_file(sd, str(path / LENS_WEIGHTS))
        cfg = {
            "format_version": SIDECAR_VERSION,
            "decoder": self.decoder.config.to_dict(),
            "encoder": self.encoder.config.to_dict(),
            "shared_decoder_base": self.decoder.base is self.encoder.base
            or not any(p.requires_grad for p in self.decoder.base.parameters()),
            "meta": self.sidecar_config().to_dict(),
        }
        (path / LENS_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))

    def sidecar_config(self) -> LensConfig:
        """:attr:`lens_config` completed with what loading and reading the lens need: absolute
        paths of the base and tokenizer folders (resolved against the working directory of the
        save), the decoder prompt and the package version. Recorded fields are kept as they are."""
        lc = copy.deepcopy(self.lens_config)
        for given, resolved in (
            ("model_name_or_path", "base_resolved_path"),
            ("tokenizer_name_or_path", "tokenizer_resolved_path"),
        ):
            where = getattr(lc, given)
            if where and not getattr(lc, resolved) and Path(where).expanduser().is_dir():
                setattr(lc, resolved, str(Path(where).expanduser().resolve()))
        lc.prompt = lc.prompt or self.decoder.config.prompt
        lc.lens_rl_version = __version__
        return lc

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
                tried relative to the working directory). A base folder that is missing is an
                error naming it (lens_rl makes no Hub downloads); pass ``base=`` then.
            tokenizer: default: the recorded tokenizer folder, else the base folder.
            dtype: of the base when it is loaded here (default: the lens's ``model_dtype``).

        Every file is checked before it is used: the sidecar's fields (:func:`read_sidecar`),
        the weights (readable, every tensor finite: :func:`read_lens_weights`), the recorded
        layer against the base's blocks and the activation statistics against its hidden size
        (:func:`activation_stats`).

        Raises:
            ConfigError: the base is not the model the lens was trained on (fingerprints differ).
            FileNotFoundError: the lens folder, one of its files or the base folder is missing.
            LensFileError: a lens file is corrupt or holds a value that cannot be right (named).
        """
        path = Path(path).expanduser()
        _, decoder_config, encoder_config, lc = read_sidecar(path)
        weights = read_lens_weights(path / LENS_WEIGHTS)  # before the (slow) base load
        base_dir: str | None = None
        if base is None or isinstance(base, str | Path):
            base_dir = str(base) if base is not None else recorded_base(path, lc)
            if dtype is None:
                dtype = DTYPES[lc.model_dtype or "float32"]
            base = load_causal_lm(base_dir, dtype=dtype)
        recorded = lc.base_fingerprint
        if recorded is not None and recorded not in (mine := base_fingerprints(base)):
            given = (
                base_dir or getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", "?")
            )
            raise ConfigError(
                f"{path} was trained on the base {lc.base_resolved_path or lc.model_name_or_path!r} "
                f"(fingerprint {recorded}); the base given is {given!r} (fingerprint "
                f"{mine[0]}), a different model. Load the lens with its own base."
            )
        sidecar = path / LENS_CONFIG
        n_blocks = len(get_blocks(base))
        if lc.layer is not None and lc.layer >= n_blocks:
            raise LensFileError(
                f"{sidecar}: field 'meta.layer' is {lc.layer}, but the base has {n_blocks} blocks "
                f"(0..{n_blocks - 1}); the lens belongs to another base."
            )
        activation_stats(lc, base.get_input_embeddings().weight.shape[-1], str(sidecar))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(_recorded_tokenizer(path, lc, base_dir, base))
        lens = cls.build(base, tokenizer, decoder_config, encoder_config, share_base=True, lens_config=lc)
        try:
            lens.load_state_dict(weights)
        except RuntimeError as e:
            raise LensFileError(
                f"{path / LENS_WEIGHTS} does not fit the lens {sidecar} describes: {e}"
            ) from e
        lens.__dict__["source_dir"] = path  # a plain attribute: where errors say the lens came from
        return lens


def _missing_base_error(lens_dir: Path, where: str, given: str | None) -> FileNotFoundError:
    as_given = f" (given as {given!r})" if given and given != where else ""
    return FileNotFoundError(
        f"The lens {lens_dir} was trained on the base model folder {where}{as_given}, which does not "
        f"exist here. Pass the base model folder: ConsistencyLens.from_pretrained({str(lens_dir)!r}, "
        "base=MODEL_DIR), or --model_name_or_path MODEL_DIR on the command line."
    )


def recorded_base(lens_dir: Path, lens_config: LensConfig) -> str:
    """The base model folder a lens records: its absolute path (newer lenses) or the path as
    given (older ones, relative to the working directory). One that is not a folder here is an
    error naming it, never a Hub download."""
    given = lens_config.model_name_or_path
    resolved = lens_config.base_resolved_path
    if resolved:
        if Path(resolved).is_dir():
            return resolved
        raise _missing_base_error(lens_dir, resolved, given)
    if not given:
        raise ValueError(f"{lens_dir}/{LENS_CONFIG} records no model_name_or_path; pass base=MODEL_DIR.")
    if Path(given).expanduser().is_dir():
        return str(Path(given).expanduser())
    raise _missing_base_error(lens_dir, given, None)


def _recorded_tokenizer(
    lens_dir: Path, lens_config: LensConfig, base_dir: str | None, base: PreTrainedModel
) -> str:
    """The tokenizer folder: the recorded one if it is here, else the base's folder."""
    for key in ("tokenizer_resolved_path", "tokenizer_name_or_path"):
        where = getattr(lens_config, key)
        if where and Path(where).expanduser().is_dir():
            return str(Path(where).expanduser())
    for where in (base_dir, getattr(base, "name_or_path", None)):
        if where and Path(where).expanduser().is_dir():
            return str(Path(where).expanduser())
    tried = [
        w for w in (lens_config.tokenizer_resolved_path, lens_config.tokenizer_name_or_path, base_dir) if w
    ]
    raise FileNotFoundError(
        f"No tokenizer folder for the lens {lens_dir}: {tried or 'none recorded'} "
        f"{'is' if len(tried) == 1 else 'are'} not a folder here (lens_rl makes no Hub downloads). "
        "Pass tokenizer=AutoTokenizer.from_pretrained(TOKENIZER_DIR)."
    )


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
        result = self.lens.load_state_dict(inner, strict=True, assign=assign)
        # Empty (an exact load): transformers' Trainer warns about every key listed here.
        return _IncompatibleKeys([f"lens.{k}" for k in result.missing_keys], list(result.unexpected_keys))
