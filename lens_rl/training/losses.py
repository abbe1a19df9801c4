"""Loss functions of the supervised lens stage (pure functions of tensors).

All KL terms are KL(P || Q) with P the reference (the original model) and Q the trained
distribution, computed in fp32 from logits via ``log_softmax`` (no probability clamping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, ``(...,)``, from logits ``(..., V)``."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def normalized_mse(a_hat: torch.Tensor, a: torch.Tensor, feature_var: torch.Tensor) -> torch.Tensor:
    """``mean((Â - A)^2) / mean(var)``: 1.0 for the mean-activation predictor, 0 for perfect.

    ``feature_var`` is the per-feature variance of A over the training split (fixed, so the
    value does not depend on the batch size).
    """
    return (a_hat.float() - a.float()).pow(2).mean() / feature_var.float().mean()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row, ``(...,)``."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)
