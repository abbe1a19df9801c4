"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a lens: each base's transformer blocks are
their own units, the rest of the lens (embeddings, LM head, final norm, projections, soft
prompts) is the root unit.

Why this works without touching the lens code: both trainers run every computation that reads
weights as ``LensModule.forward(fn, ...)`` (:class:`~lens_rl.models.lens.LensModule`), so the
root unit's pre-forward hook has gathered the embedding table, the LM head and the projections
before the generators, ``fwd_tokens`` or the encoder read them, and each block gathers its own
weights when it is called. Measured on CPU with gloo, 2 processes (``tests/test_fsdp2.py``):
the gradients of the SFT loss (through the differentiable KV-cached generator) and of the GRPO
scorer equal the unsharded ones to float32 rounding, on tied and untied bases.

What this module does not do (yet): wire FSDP2 into the Trainer through accelerate's plugin
(``accelerate launch --use_fsdp`` is refused by the stages; on a CPU-only machine accelerate
would run DDP instead). Computations outside ``LensModule.forward`` (the evaluation, the HF and
vLLM rollouts) must go through it too before that can land. The frozen original model is not
sharded here: it stays a full replica on every rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from lens_rl.models.lens import LensModule


def transformer_blocks(base: nn.Module) -> list[nn.Module]:
    """The base's repeated blocks: modules whose class is named in ``base._no_split_modules``
    (the units accelerate's FSDP auto-wrap picks), in module order."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(base).__name__}: no transformer blocks found (its _no_split_modules is {sorted(names)})."
        )
    return blocks


def lens_blocks(module: LensModule) -> list[nn.Module]:
    """The transformer blocks of the lens's decoder and encoder bases (a base shared by both,
    once): FSDP2's per-block units; everything else is the root."""
    lens = module.lens
    bases = {id(b): b for b in (lens.decoder.base, lens.encoder.base)}
    return [block for base in bases.values() for block in transformer_blocks(base)]


def fully_shard_lens(module: LensModule, mesh: DeviceMesh, reshard_after_forward: bool = True) -> LensModule:
    """Apply FSDP2 to a lens in place and return it: ``fully_shard`` on every transformer block of
    the decoder and encoder bases (a base shared by both, once), then on ``module`` as the root.

    Call the lens only as ``module(fn, *args)`` afterwards (the trainers do): reading a weight
    outside that call sees a local shard. Empty tensors (an empty soft prompt) are left out of
    the sharding (``ignored_params``): FSDP2 cannot reduce-scatter them."""
    if not isinstance(module, LensModule):
        raise TypeError(f"fully_shard_lens takes a LensModule, not {type(module).__name__}.")
    for block in lens_blocks(module):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    empty = {p for p in module.parameters() if p.numel() == 0}
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=empty or None)
    return module


def root_parameters(module: LensModule) -> list[nn.Parameter]:
    """The lens's parameters outside every transformer block (embeddings, LM head, final norm,
    projections, prompts), each once: FSDP2's root unit, and what ZeRO-3 must hold gathered for a
    whole ``module(fn, ...)`` call (:func:`register_zero3_root_parameters`)."""
    in_blocks = {id(p) for block in lens_blocks(module) for p in block.parameters()}
    return [p for p in module.parameters() if id(p) not in in_blocks]


def detach_empty_parameters(module: nn.Module) -> list[str]:
    """Turn every empty parameter of ``module`` (an empty soft prompt) into a plain tensor
    attribute in place and return their names: DeepSpeed ZeRO-3 cannot partition an empty tensor
    (its all-gather concatenates no pieces), as FSDP2 cannot reduce-scatter one. An empty
    tensor neither trains nor is saved (:meth:`ConsistencyLens.state_dict` drops it)."""
    names = []
    for prefix, m in module.named_modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.numel() == 0:
                del m._parameters[name]
                setattr(m, name, p.detach())
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def register_zero3_root_parameters(module: LensModule) -> int:
    """Register :func:`root_parameters` as DeepSpeed ZeRO-3 *external parameters* of ``module``
    (``deepspeed.zero.register_external_parameter``) and return how many: ZeRO-3 then gathers
    them when ``module(fn, ...)`` starts and keeps them until it returns, in the forward and
    the backward, so the generators, ``fwd_tokens`` and the encoder may read the embedding
    table, the LM head and the projections directly, as FSDP2's root unit allows. The blocks'
    weights are gathered by ZeRO-3's own hooks, block by block, as they are called.

    Call it before the DeepSpeed engine is built (the trainers do, in ``__init__``)."""
    import deepspeed  # optional dependency (EXTRAS=deepspeed): imported only under ZeRO-3

    params = root_parameters(module)
    for p in params:
        deepspeed.zero.register_external_parameter(module, p)
    return len(params)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded module, on CPU, on rank 0; other ranks get
    an empty dict (a collective: call it on every rank). ``LensModule``'s own state-dict rules
    apply (frozen base weights excluded, keys prefixed ``lens.``)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
