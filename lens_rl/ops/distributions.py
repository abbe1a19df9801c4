"""KL divergence and entropy of categorical distributions given by logits (pure functions).

KL(P || Q) takes P as the reference (the original model) and Q as the trained distribution;
both are computed in fp32 from logits via ``log_softmax`` (no probability clamping). Used by the
supervised losses, the evaluation and the functional KL (:func:`lens_rl.metrics.functional_kl`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, ``(...,)``, from logits ``(..., V)``."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row, ``(...,)``."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)
