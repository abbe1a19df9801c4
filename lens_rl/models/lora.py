"""LoRA adapters (peft) on a lens decoder or encoder base, without copying the base's weights.

A LoRA config is the dict of ``peft.LoraConfig`` keyword arguments that TRL users pass as
``peft_config`` (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ...). It is
validated by building the ``LoraConfig`` (:func:`check_lora_config`), so a misspelt or
unsupported option is refused at parse time naming the field.

:func:`lora_base` returns a *structural* copy of the base: every module is new, every weight
and buffer is the base's own tensor (a ``deepcopy`` whose memo maps each parameter and buffer
to itself), and adapters are injected into the copy with ``peft.inject_adapter_in_model``. The
orig model (and a frozen encoder sharing it) keeps its plain modules and sees no adapter; the
memory added is the adapters'. The module tree keeps the model's class and layout (targets
become ``peft`` LoRA layers wrapping the original ``Linear`` as ``base_layer``), so the lens's
family lookups, block hooks and gradient checkpointing work unchanged.

:func:`merged_state_dict` gives the base in the model's own Hugging Face names with the
adapters merged (``W + scaling * B @ A``): what a vLLM engine loads.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lens_rl.config import ConfigError

ADAPTER = "default"
# LoraConfig options the lens refuses: they train or replace whole base modules (which are
# shared with the orig model) or change what a merged weight means.
_REFUSED = {
    "modules_to_save": "trains full copies of base modules; use trainable_* fields with lora unset",
    "use_dora": "DoRA's magnitude vector is not a plain merged delta",
    "target_parameters": "targets raw parameters (MoE experts), not supported by the lens",
    "trainable_token_indices": "edits the embedding table shared with the orig model",
}


def check_lora_config(cfg: Any, where: str) -> dict[str, Any] | None:
    """Validate a LoRA config dict (``None`` passes); returns a plain, JSON-able dict.

    Raises :class:`~lens_rl.config.ConfigError` naming ``where`` on an unknown or refused key.
    """
    if isinstance(cfg, str):  # from the command line: a JSON object ("" means unset)
        import json

        try:
            cfg = json.loads(cfg) if cfg.strip() else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} must be a JSON object of peft.LoraConfig options: {e}") from e
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):  # a LoraConfig object, as TRL users pass it
        cfg = {k: v for k, v in cfg.to_dict().items() if k in _lora_fields()}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a dict of peft.LoraConfig options, got {type(cfg).__name__}.")
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    unknown = sorted(set(cfg) - _lora_fields())
    if unknown:
        raise ConfigError(f"{where}: unknown peft.LoraConfig options {unknown}.")
    for key, why in _REFUSED.items():
        if cfg.get(key):
            raise ConfigError(f"{where}.{key} is not supported: {why}.")
    if cfg.get("peft_type", "LORA") not in ("LORA", "lora"):
        raise ConfigError(f"{where}.peft_type must be LORA, got {cfg['peft_type']!r}.")
    cfg.pop("peft_type", None)
    cfg.pop("task_type", None)  # the lens is not a peft task model
    try:
        _lora_config(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    return cfg


PEFT_CONFIG_HELP = (
    "peft.LoraConfig options (as TRL's peft_config): LoRA adapters on the decoder base and, when the "
    "encoder trains, the encoder base; the bases stay frozen and shared. decoder.lora / encoder.lora "
    "set one part only."
)


def apply_peft_config(peft_config: Any, decoder_config, encoder_config, encoder_trains: bool) -> dict | None:
    """Spread a training config's ``peft_config`` over the decoder (and, when ``encoder_trains``,
    the encoder) configs; returns the checked dict. Refused when a part sets its own ``lora``."""
    cfg = check_lora_config(peft_config, "peft_config")
    if cfg is None:
        return None
    own = [n for n, c in (("decoder", decoder_config), ("encoder", encoder_config)) if c.lora]
    if own:
        raise ConfigError(f"Give LoRA options either as peft_config or as {own[0]}.lora, not both.")
    decoder_config.lora = dict(cfg)
    decoder_config.validate()
    if encoder_trains:
        encoder_config.lora = dict(cfg)
        encoder_config.validate()
    return cfg


def _lora_fields() -> set[str]:
    import dataclasses

    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def _lora_config(cfg: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(**cfg)


def lora_base(base: PreTrainedModel, cfg: dict[str, Any], where: str) -> PreTrainedModel:
    """A structural copy of ``base`` sharing every weight, with LoRA adapters injected.

    Only the adapters are trainable; the shared weights keep ``requires_grad=False``. The input
    embeddings and the LM head may not be targets (the lens reads their weights directly).
    """
    from peft import inject_adapter_in_model

    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    copy_ = copy.deepcopy(base, memo=shared)
    try:
        copy_ = inject_adapter_in_model(_lora_config(cfg), copy_, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. target modules not found
        raise ConfigError(f"{where}: {e}") from e
    for name, mod in (
        ("input embeddings", copy_.get_input_embeddings()),
        ("LM head", copy_.get_output_embeddings()),
    ):
        if mod is not None and any("lora_" in n for n, _ in mod.named_parameters()):
            raise ConfigError(f"{where}.target_modules must not include the {name}.")
    if not lora_parameters(copy_):
        raise ConfigError(f"{where}: target_modules matched no module of {type(base).__name__}.")
    # peft froze every non-adapter parameter, including the base's own (shared) tensors:
    # give back the trainability the base had (the orig model's are frozen anyway).
    params = dict(base.named_parameters())
    for n in trainable:
        params[n].requires_grad_(True)
    return copy_


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter weights inside ``module`` (empty without adapters)."""
    return [p for n, p in module.named_parameters() if ".lora_" in n]


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` in the model's own names, LoRA deltas merged into the weights.

    Without adapters this is the plain state dict. With them, ``x.base_layer.weight`` becomes
    ``x.weight`` plus ``scaling * B @ A`` (peft's ``get_delta_weight``, which also handles
    ``fan_in_fan_out`` and rsLoRA scaling), and the adapter tensors are left out.
    """
    from peft.tuners.lora import LoraLayer

    sd = module.state_dict()
    layers = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            owner, _, leaf = key.partition(".base_layer.")
            if leaf == "weight" and owner in layers:
                layer = layers[owner]
                value = value + layer.get_delta_weight(ADAPTER).to(value.dtype)
            key = f"{owner}.{leaf}"
        out[key] = value
    return out
