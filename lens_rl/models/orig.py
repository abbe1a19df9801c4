"""The frozen original LM: read the residual stream after block L and write it back.

``A`` in this toolkit is always the residual-stream activation *after* block ``L`` (the
block's output), at one token position per row. Capturing uses :func:`hooks.run_until`
(blocks after ``L`` are skipped); replacing uses an output hook on block ``L`` that swaps the
row's position out of place, so patching the captured value back reproduces the clean logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lens_rl.models.families import load_causal_lm
from lens_rl.models.hooks import hooked, num_layers, replace_rows, resolve_layer, run_until


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: ``cumsum(mask) - 1`` (0 on pads), as HF ``generate`` uses.

    With left padding this makes a padded row see the same positions as the unpadded text.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


class OrigWrapper(nn.Module):
    """A frozen HF causal LM with activation capture and replacement at block ``L``.

    Attributes:
        model: the wrapped ``*ForCausalLM``, in eval mode with ``requires_grad=False``.
    """

    model: PreTrainedModel

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        num_layers(model)  # fails early with a clear message on unsupported architectures
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> OrigWrapper:
        """Load a local checkpoint folder (no hub access) and wrap it; ``kwargs`` go to
        ``from_pretrained`` (e.g. ``attn_implementation``)."""
        return cls(load_causal_lm(path, dtype=dtype, **kwargs))

    def train(self, mode: bool = True) -> OrigWrapper:
        """The original model stays in eval mode (it is frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return num_layers(self.model)

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "use_cache": False,
        }

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Clean logits ``(B, S, V)``, with the same padding-aware positions as the patched pass."""
        return self.model(**self._inputs(input_ids, attention_mask)).logits

    @torch.no_grad()
    def capture(
        self,
        input_ids: torch.Tensor,
        layer: int,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Activations after block ``layer`` at one position per row.

        Args:
            input_ids: ``(B, S)``, left or right padded.
            layer: block index (negative counts from the end).
            positions: ``(B,)`` index into the padded sequence of each row.
            attention_mask: ``(B, S)``; ``None`` means no padding.

        Returns:
            ``(B, d)`` activations.
        """
        hidden = run_until(self.model, layer, **self._inputs(input_ids, attention_mask))  # (B, S, d)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]

    def forward_with_replacement(
        self,
        input_ids: torch.Tensor,
        layer: int,
        positions: torch.Tensor,
        new_activation: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, S, V)`` of a forward pass with block ``layer``'s output replaced.

        Row ``b``'s residual stream after block ``layer`` at ``positions[b]`` becomes
        ``new_activation[b]``. Gradients flow into ``new_activation`` (the model is frozen).
        """
        layer = resolve_layer(layer, self.n_layers)
        pos = positions.to(input_ids.device)

        def edit(h: torch.Tensor) -> torch.Tensor:
            return replace_rows(h, pos, new_activation)

        with hooked(self.model, output_edits={layer: edit}):
            return self.model(**self._inputs(input_ids, attention_mask)).logits

    def next_token_logits_with_replacement(
        self,
        input_ids: torch.Tensor,
        layer: int,
        positions: torch.Tensor,
        new_activation: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, V)`` at ``positions`` (predicting the next token) with the replacement."""
        logits = self.forward_with_replacement(input_ids, layer, positions, new_activation, attention_mask)
        return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]
