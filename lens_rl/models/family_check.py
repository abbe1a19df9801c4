"""The build-time probe of a model family: :func:`check_lens_family` verifies, on the model
itself, the blocks, embedding and head that :mod:`lens_rl.models.families` looks up (a few-token
forward), so a family that scales or transforms something elsewhere is refused with its model
type and the mismatch, not run silently wrong. It sits above both :mod:`~lens_rl.models.families`
(the lookups) and :mod:`~lens_rl.models.hooks` (it stops a probe forward early)."""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from lens_rl.models.families import (
    TESTED_FAMILIES,
    UnsupportedArchitectureError,
    block_path,
    embedding_scale,
    final_logit_softcap,
    get_blocks,
    lm_logits,
    model_type_of,
    rope_length_limit,
)
from lens_rl.models.hooks import StopForward


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
