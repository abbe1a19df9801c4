"""The one hook mechanism used to read and write the residual stream (and block checkpointing).

The decoder's multi-layer patching, the orig model's activation replacement and the
encoder's read-out all go through :func:`hooked`: forward (pre-)hooks registered on the HF
decoder blocks inside a context manager that always removes them, even when the forward
raises. Values are replaced out of place (``torch.where``), so autograd sees a clean graph.

Block lookup is generic (:func:`lens_rl.models.families.get_blocks`: the ``nn.ModuleList`` of
``config.num_hidden_layers`` blocks inside ``model.base_model``), not a hand-copied layer loop, so
every family works the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lens_rl.config import ConfigError
from lens_rl.models.families import UnsupportedArchitectureError, get_blocks

__all__ = [
    "LayerIndexError",
    "StopForward",
    "UnsupportedArchitectureError",
    "get_blocks",
    "hooked",
    "num_layers",
    "replace_rows",
    "resolve_layer",
    "run_until",
]


class LayerIndexError(ConfigError, IndexError):
    """A block index outside the model (a config error, and an IndexError for callers that catch those)."""


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(get_blocks(model))


def resolve_layer(layer: int, n_layers: int, what: str = "layer", source: str = "") -> int:
    """Return block index ``layer`` as a non-negative index, refusing values out of range.

    Negative values count from the end (``-1`` is the last block). A value outside
    ``[-n_layers, n_layers)`` is an error, never wrapped silently (``layer=4`` on a 4-block
    model would otherwise become block 0).
    """
    if not -n_layers <= layer < n_layers:
        raise LayerIndexError(
            f"{what}={layer}{f' (in {source})' if source else ''} is out of range for a model with {n_layers} blocks "
            f"(valid: {-n_layers} .. {n_layers - 1}; negative values count from the end)."
        )
    return layer % n_layers


def replace_rows(hidden: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return ``hidden`` with ``hidden[b, positions[b]] = values[b]``, out of place.

    Args:
        hidden: ``(B, S, d)``.
        positions: ``(B,)`` long, each in ``[0, S)``.
        values: ``(B, d)``.
    """
    seq = hidden.shape[1]
    if positions.numel() and int(positions.max()) >= seq:
        raise IndexError(f"position {int(positions.max())} is outside a sequence of length {seq}.")
    mask = torch.arange(seq, device=hidden.device)[None, :] == positions.to(hidden.device)[:, None]  # (B, S)
    return torch.where(mask[..., None], values.to(hidden.dtype)[:, None, :], hidden)


def _first_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    return (new,) + tuple(output[1:])


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (after the last block needed)."""


@contextmanager
def hooked(
    model: nn.Module,
    *,
    input_edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    output_edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    capture: dict[int, list[torch.Tensor]] | None = None,
    stop_after: int | None = None,
) -> Iterator[None]:
    """Edit or read block inputs/outputs of ``model`` for the duration of the ``with`` body.

    Args:
        input_edits: block index -> function mapping the block's input hidden states
            ``(B, S, d)`` to new ones (the decoder's slot patching).
        output_edits: block index -> function mapping the block's output hidden states
            (the residual stream after the block) to new ones (the orig model's replacement).
        capture: block index -> list that receives the block's output hidden states (after
            any output edit).
        stop_after: raise :class:`StopForward` after this block's output is captured, to skip
            the remaining blocks; the caller catches it (see :func:`run_until`).

    All hooks are removed on exit, including when the forward raises.
    """
    blocks = get_blocks(model)
    n = len(blocks)
    for idx in [*(input_edits or {}), *(output_edits or {}), *(capture or {})]:
        if not 0 <= idx < n:
            raise IndexError(f"block index {idx} out of range for a model with {n} blocks.")
    with ExitStack() as stack:
        for idx, fn in (input_edits or {}).items():

            def pre_hook(mod, args, kwargs, fn=fn):
                if args:
                    return (fn(args[0]),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = fn(kwargs["hidden_states"])
                return args, kwargs

            stack.callback(blocks[idx].register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        post_idx = (
            set(output_edits or {}) | set(capture or {}) | ({stop_after} if stop_after is not None else set())
        )
        for idx in post_idx:

            def post_hook(mod, args, output, idx=idx):
                new = None
                if output_edits and idx in output_edits:
                    new = output_edits[idx](_first_tensor(output))
                if capture is not None and idx in capture:
                    capture[idx].append(new if new is not None else _first_tensor(output))
                if stop_after == idx:
                    raise StopForward
                return _with_first(output, new) if new is not None else None

            stack.callback(blocks[idx].register_forward_hook(post_hook).remove)
        yield


def run_until(model: nn.Module, layer: int, **forward_kwargs: Any) -> torch.Tensor:
    """Run ``model`` only up to block ``layer`` and return that block's output ``(B, S, d)``.

    ``layer`` may be negative (``-1`` is the last block). Blocks after it are skipped, and
    so are the final norm and the LM head.
    """
    layer = resolve_layer(layer, num_layers(model))
    store: dict[int, list[torch.Tensor]] = {layer: []}
    with hooked(model, capture=store, stop_after=layer):
        try:
            model(**forward_kwargs)
        except StopForward:
            pass
    return store[layer][0]


@contextmanager
def checkpointed_blocks(
    model: nn.Module, every_n_layers: int = 1, checkpoint_kwargs: dict[str, Any] | None = None
) -> Iterator[None]:
    """Run the decoder blocks of ``model`` under ``torch.utils.checkpoint`` inside the ``with``
    body (activations recomputed in the backward instead of stored).

    HF's own gradient checkpointing only acts on modules in train mode, and the lens keeps its
    bases in eval mode (no dropout), so the lens wraps the blocks' ``forward`` itself. Forward
    (pre-)hooks (slot patching, capture) still run once, outside the recomputed region. Only for
    passes without a KV cache (HF's checkpointed layers refuse one). Every ``every_n_layers``-th
    block is checkpointed; ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
    (non-reentrant: the blocks take keyword arguments).
    """
    from torch.utils.checkpoint import checkpoint

    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    blocks = [b for i, b in enumerate(get_blocks(model)) if i % every_n_layers == 0]
    for block in blocks:

        def forward(*args, _fwd=block.forward, **kw):
            return checkpoint(_fwd, *args, **kwargs, **kw)

        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
