"""Model families: where a causal LM keeps its blocks, its token embeddings and its LM head.

The lens feeds a decoder-only LM ``inputs_embeds`` and reads its residual stream, so for every
family it must know three things, all found generically:

- the decoder blocks: the shallowest ``nn.ModuleList`` inside ``model.base_model`` whose length
  is the config's layer count (``transformer.h``, ``model.layers``, ``gpt_neox.layers``, ...);
- the token embedding: ``model.get_input_embeddings()``, called as a module, because some
  families scale inside it (Gemma 2/3 multiply by ``sqrt(hidden_size)`` in
  ``Gemma*TextScaledWordEmbedding``, exposed as its ``embed_scale`` buffer). A generated token
  must enter the model as exactly what that module returns for its id;
- the LM head: ``model.get_output_embeddings()`` followed by the config's
  ``final_logit_softcapping`` when set (Gemma 2/3), i.e. the logits the model itself returns.

:func:`lens_rl.models.family_check.check_lens_family` verifies these on the model itself (a few-token probe forward) when
a decoder or encoder is built, so a family that scales or transforms something elsewhere is
refused with its model type and the mismatch, not run silently wrong. Real exceptions that a
probe cannot see live in :data:`REFUSED_FAMILIES` (and :data:`BLOCK_PATH_OVERRIDES`, for a family
whose first matching ``ModuleList`` is not its blocks; none so far).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lens_rl.config import ConfigError, InputError
from lens_rl.models.loading import local_folder

# Families the alignment tests run on (tiny configs in lens_rl.testing.tiny_models). Others that
# pass the generic lookup and the build-time probes are accepted with a warning.
TESTED_FAMILIES: frozenset[str] = frozenset(
    {"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt_neox"}
)

# model_type -> why the lens cannot work on it (the probes would not catch it on every checkpoint).
REFUSED_FAMILIES: dict[str, str] = {
    "gemma3n_text": (
        "Gemma 3n adds per-layer token embeddings (embed_tokens_per_layer) looked up from the token "
        "ids inside the model; text fed as inputs_embeds (the lens's generated tokens) cannot carry them"
    ),
    "gemma3n": "the Gemma 3n text model adds per-layer token embeddings looked up from token ids (see gemma3n_text)",
}

# model_type -> dotted path of the blocks, where the generic search would pick the wrong list.
BLOCK_PATH_OVERRIDES: dict[str, str] = {}


class UnsupportedArchitectureError(InputError):
    """The model family cannot be used by the lens (the message names the model type and why)."""


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type`` (None when the module has no HF config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _num_layers_from_config(config: Any) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


_BLOCK_PATHS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def block_path(model: nn.Module) -> str:
    """Dotted path (from the ``*ForCausalLM``) of the ``nn.ModuleList`` of decoder blocks.

    Raises:
        UnsupportedArchitectureError: refused family, encoder-decoder model, or no list found.
    """
    if model in _BLOCK_PATHS:
        return _BLOCK_PATHS[model]
    mt = model_type_of(model)
    config = getattr(model, "config", None)
    if mt in REFUSED_FAMILIES:
        raise UnsupportedArchitectureError(f"Model type {mt!r} is not supported: {REFUSED_FAMILIES[mt]}.")
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no HF config; expected a *ForCausalLM."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"Model type {mt!r} is an encoder-decoder model; the lens needs a decoder-only causal LM."
        )
    if mt in BLOCK_PATH_OVERRIDES:
        path = BLOCK_PATH_OVERRIDES[mt]
    else:
        n = _num_layers_from_config(config)
        base = getattr(model, "base_model", model)
        inside = {id(m) for m in base.modules()}
        found = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and id(mod) in inside and n is not None and len(mod) == n
        ]
        if not found:
            raise UnsupportedArchitectureError(
                f"Model type {mt!r}: no nn.ModuleList of {n} blocks (config layer count) inside "
                f"{type(base).__name__}; add its block path to lens_rl.models.families.BLOCK_PATH_OVERRIDES "
                "if it is a decoder-only LM."
            )
        path = min(found, key=lambda nm: nm[0].count("."))[0]  # the shallowest (first on ties)
    _BLOCK_PATHS[model] = path
    return path


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``transformer.h``, ``model.layers``, ``gpt_neox.layers``, ...)."""
    mod: Any = model
    for part in block_path(model).split("."):
        mod = getattr(mod, part)
    return mod


# ----------------------------------------------------------------------------- embeddings and head
def embedding_scale(model: nn.Module) -> torch.Tensor | None:
    """The factor the token-embedding module multiplies its rows by (Gemma: ``sqrt(hidden_size)``),
    as the module applies it (cast to the weight dtype); None for a plain lookup."""
    emb = model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        return None
    return torch.as_tensor(scale, device=emb.weight.device).to(emb.weight.dtype)


def embed_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the model's own embedding module returns for token ids ``ids`` (scaled where it scales)."""
    return model.get_input_embeddings()(ids)


def embed_soft(model: nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """``weights (..., V) @ W_E``, times the module's scale: the embedding of a soft token, linear in
    ``weights``, equal to :func:`embed_tokens` for a one-hot row (the straight-through path)."""
    w_e = model.get_input_embeddings().weight
    out = weights.to(w_e.dtype) @ w_e
    scale = embedding_scale(model)
    return out if scale is None else out * scale


def final_logit_softcap(model: nn.Module) -> float | None:
    """``config.final_logit_softcapping`` (Gemma 2/3) or None."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model itself returns for final hidden states ``hidden``, as fp32.

    The head and the soft-capping ``cap * tanh(logits / cap)`` run in the model's dtype, in the
    same order as the HF ``*ForCausalLM.forward``, so the values are the model's own.
    """
    logits = model.get_output_embeddings()(hidden)
    cap = final_logit_softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


# ----------------------------------------------------------------------------- loading
def attn_implementation_for(config: Any) -> str | None:
    """``"eager"`` when the config sets attention soft-capping (Gemma 2), which HF's default sdpa
    attention silently ignores; else None (the HF default)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` for a local folder, keeping attention soft-capping:
    without an explicit ``attn_implementation``, a config with ``attn_logit_softcapping`` loads
    with eager attention (the model as trained, and as vLLM runs it).

    Raises:
        FileNotFoundError: ``path`` is not a local folder (no Hub download is tried).
    """
    local_folder(path)
    if "attn_implementation" not in kwargs:
        impl = attn_implementation_for(AutoConfig.from_pretrained(path))
        if impl is not None:
            kwargs["attn_implementation"] = impl
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


# ----------------------------------------------------------------------------- rotary embeddings
def rope_length_limit(config: Any) -> tuple[str, int] | None:
    """``(rope_type, limit)``: the longest pass (in positions) whose rotary frequencies do not
    depend on its length or on earlier passes, for the RoPE types HF recomputes per pass; None
    for the others. The smallest limit over layer types.

    - ``longrope``: ``original_max_position_embeddings`` (longer passes switch every position to
      the long factors);
    - ``dynamic``: ``max_position_embeddings - 1``. Longer passes grow the frequencies, and HF
      resets them only for passes *shorter* than ``max_position_embeddings``: a pass of exactly
      that length after a longer one (say, the orig model on a long context, with a shared
      base) would still use the grown ones.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    entries = [params] if ("rope_type" in params or "type" in params) else list(params.values())
    worst: tuple[str, int] | None = None
    for p in entries:
        if not isinstance(p, dict):
            continue
        rope_type = str(p.get("rope_type", p.get("type", "default")))
        if "dynamic" in rope_type:  # HF's dynamic_frequency_update (see above)
            limit = int(config.max_position_embeddings) - 1
        elif rope_type == "longrope":
            limit = int(
                p.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None)
                or config.max_position_embeddings
            )
        else:
            continue
        if worst is None or limit < worst[1]:
            worst = (rope_type, limit)
    return worst


def length_dependent_rope_error(
    model_type: str | None, rope_type: str, limit: int, needed: int
) -> ConfigError:
    """The error for a decoder pass longer than a length-dependent RoPE's limit."""
    return ConfigError(
        f"Model type {model_type!r} uses rope_type={rope_type!r}: HF recomputes its rotary frequencies "
        f"from the length of each forward pass beyond {limit} positions. Past that point a KV-cached "
        "step (cached keys rotated with the earlier frequencies), a full recompute and teacher-forced "
        "fwd_tokens score the same tokens differently (log q would not be the log-prob of the sampled "
        f"token), so the lens refuses it. This pass needs {needed} positions (prompt with its slot + "
        f"max_length - 1); the limit is {limit}."
    )
