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

:func:`check_lens_family` verifies these on the model itself (a few-token probe forward) when
a decoder or encoder is built, so a family that scales or transforms something elsewhere is
refused with its model type and the mismatch, not run silently wrong. Real exceptions that a
probe cannot see live in :data:`REFUSED_FAMILIES` (and :data:`BLOCK_PATH_OVERRIDES`, for a family
whose first matching ``ModuleList`` is not its blocks; none so far).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lens_rl.config import ConfigError
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


class UnsupportedArchitectureError(ValueError):
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


# ----------------------------------------------------------------------------- build-time probe
@dataclass(frozen=True)
class FamilyInfo:
    """What the lens needs to know about a model family (see the module docstring)."""

    model_type: str | None
    block_path: str
    n_layers: int
    embed_scale: float | None
    final_logit_softcap: float | None
    rope_limit: tuple[str, int] | None


_CHECKED: weakref.WeakKeyDictionary[nn.Module, FamilyInfo] = weakref.WeakKeyDictionary()


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to rounding of the model's dtype: 1e-5 (fp32) or 8 ulps of bf16/fp16, relative to
    the largest magnitude. Coarse enough for a bf16 model's rounding, far below what a real
    transform (an embedding multiplier, a logit scale) changes."""
    rel = max(1e-5, 8 * torch.finfo(dtype).eps) if dtype in (torch.bfloat16, torch.float16) else 1e-5
    tol = rel * max(1.0, float(a.abs().max()))
    return a.shape == b.shape and bool(((a.float() - b.float()).abs() <= tol).all())


def _block0_input(model: nn.Module, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The hidden states entering block 0 for ``inputs_embeds`` (the rest of the pass is skipped)."""
    from lens_rl.models.surgery import StopForward  # surgery imports this module

    seen: list[torch.Tensor] = []

    def pre_hook(mod, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    handle = get_blocks(model)[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model.base_model(inputs_embeds=inputs_embeds, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


def check_lens_family(model: nn.Module) -> FamilyInfo:
    """Find the blocks, embedding and head of ``model`` and verify them with a 4-token probe.

    Checks, on the model itself (no gradient, eval mode, restored afterwards):

    1. the embedding module returns ``weight[ids]`` times its ``embed_scale`` (if any), so the
       straight-through path (``soft @ W_E * scale``) is the same map;
    2. ``base_model(inputs_embeds=embedding(ids))`` equals ``base_model(input_ids=ids)``: the model
       does nothing with token ids beyond that lookup;
    3. the residual stream entering block 0 is ``inputs_embeds`` plus a term that does not depend on
       them (zero, or GPT-2's learned positions): the model does not rescale ``inputs_embeds``, so
       ``proj(A)`` reaches block 0 as it is;
    4. ``lm_logits(base_model(...))`` equals the model's own ``logits`` (head + soft-capping).

    Raises:
        UnsupportedArchitectureError: naming the model type and the failed check.
    """
    if model in _CHECKED:
        return _CHECKED[model]
    mt = model_type_of(model)
    path = block_path(model)
    n_layers = len(get_blocks(model))
    emb = model.get_input_embeddings()
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
        raise UnsupportedArchitectureError(f"Model type {mt!r}: get_input_embeddings() is not a token table.")
    if model.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(
            f"Model type {mt!r}: get_output_embeddings() is None (no LM head)."
        )
    scale = embedding_scale(model)
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            vocab = emb.weight.shape[0]
            ids = (torch.arange(2, 6, device=emb.weight.device) % vocab)[None]
            looked_up = emb.weight[ids] if scale is None else emb.weight[ids] * scale
            x = emb(ids)
            if not torch.equal(x, looked_up):
                raise UnsupportedArchitectureError(
                    f"Model type {mt!r}: its embedding module {type(emb).__name__} does not return "
                    "weight[ids] (times an `embed_scale` attribute); the straight-through token "
                    "embedding could not reproduce it."
                )
            from_ids = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            from_embeds = model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
            if not _close(from_ids, from_embeds, emb.weight.dtype):
                raise UnsupportedArchitectureError(
                    f"Model type {mt!r}: base_model(inputs_embeds=get_input_embeddings()(ids)) differs from "
                    "base_model(input_ids=ids) (max |diff| "
                    f"{(from_ids.float() - from_embeds.float()).abs().max().item():.3g}): the model uses the "
                    "token ids beyond the embedding table, so text fed as embeddings is not what it reads."
                )
            x2 = 2 * x + 1
            offset, offset2 = _block0_input(model, x) - x, _block0_input(model, x2) - x2
            if not _close(offset, offset2, emb.weight.dtype):
                raise UnsupportedArchitectureError(
                    f"Model type {mt!r}: the residual stream entering block 0 is not inputs_embeds plus a "
                    "fixed (position) term: the model transforms inputs_embeds (e.g. an embedding "
                    "multiplier), so proj(A) and the token embeddings would not enter the blocks as given."
                )
            logits = model(inputs_embeds=x, use_cache=False).logits.float()
            ours = lm_logits(model, from_embeds)
            if not _close(logits, ours, emb.weight.dtype):
                raise UnsupportedArchitectureError(
                    f"Model type {mt!r}: get_output_embeddings() (plus final_logit_softcapping) does not "
                    f"reproduce the model's logits (max |diff| {(logits - ours).abs().max().item():.3g}); "
                    "its head applies another transform (e.g. a logit scale)."
                )
    finally:
        model.train(was_training)
    cfg = model.config
    attn_cap = getattr(cfg, "attn_logit_softcapping", None)
    attn_impl = getattr(cfg, "_attn_implementation", None)
    if attn_cap and attn_impl == "sdpa":
        warnings.warn(
            f"Model type {mt!r} has attn_logit_softcapping={attn_cap}, which HF's sdpa attention ignores: "
            "the lens will run the model without attention soft-capping (vLLM applies it). Load the "
            "model with attn_implementation='eager' (lens_rl.models.families.load_causal_lm does) to keep it.",
            stacklevel=3,
        )
    if mt not in TESTED_FAMILIES:
        warnings.warn(
            f"Model type {mt!r} is not among the families the lens alignment tests cover "
            f"({sorted(TESTED_FAMILIES)}); its blocks ({path}), embedding and head passed the build-time "
            "probe. Run `pytest -m alignment` on a tiny config of it before trusting it.",
            stacklevel=3,
        )
    info = FamilyInfo(
        model_type=mt,
        block_path=path,
        n_layers=n_layers,
        embed_scale=None if scale is None else float(scale),
        final_logit_softcap=final_logit_softcap(model),
        rope_limit=rope_length_limit(cfg),
    )
    _CHECKED[model] = info
    return info
