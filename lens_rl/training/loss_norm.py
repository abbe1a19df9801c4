"""TRL 1.16's aggregation of a GRPO per-token loss into the scalar that is back-propagated.

The entropy probe's copy of the loss the lens GRPO trainer back-propagates (the trainer runs
TRL's own ``_compute_loss``; ``tests/test_loss_norm.py`` checks the two agree). It reproduces the
``loss_type`` branches at the end of ``trl.trainer.grpo_trainer.GRPOTrainer._compute_loss``
(TRL 1.16.0, ``grpo_trainer.py`` lines 3152-3182), with the trainer's state passed explicitly:

=========================  ===========================================================  ===========
loss_type                  policy loss (``policy_loss``)                                 / normaliser
=========================  ===========================================================  ===========
grpo, sapo                 mean over sequences of (sum_t l m / max(sum_t m, 1))          grad_accum
bnpo                       sum l m / max(sum m, 1)                                       grad_accum
dr_grpo                    sum l m / (B * max_completion_length)                         grad_accum
dapo, cispo, vespo         sum l m / (max(num_items_in_batch, 1) / num_processes         (included)
                           * grad_accum / steps_per_generation)
luspo                      mean over sequences of sum_t l m                              grad_accum
=========================  ===========================================================  ===========

``grad_accum`` is ``current_gradient_accumulation_steps`` in training and 1 in evaluation;
for dapo/cispo/vespo the evaluation normaliser is ``num_items_in_batch / num_processes``.
``num_items_in_batch`` is the number of loss tokens of the whole generation batch summed over
all processes (TRL: ``accelerator.gather(loss_mask.sum()).sum()``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


class AggregatedLoss(NamedTuple):
    """``loss``: the scalar to back-propagate; ``policy_loss``: TRL's logged ``policy_loss``
    (before the gradient-accumulation division, detached)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
) -> AggregatedLoss:
    """Aggregate ``per_token_loss`` over ``mask`` as TRL 1.16 does for ``loss_type``.

    Args:
        per_token_loss: ``(B, T)`` per-token loss of this micro-batch (``(B, 1)`` broadcasts,
            as TRL's sequence-level luspo loss does).
        mask: ``(B, T)`` loss tokens (completion mask, times the tool mask where there is one).
        loss_type: one of :data:`LOSS_TYPES`.
        max_completion_length: the ``dr_grpo`` constant (the lens trainer and the probe pass
            ``t_text``, the fixed explanation length).
        num_items_in_batch: loss tokens of the generation batch over all processes; required
            for dapo, cispo and vespo, ignored otherwise.
        num_processes: ``accelerator.num_processes``.
        gradient_accumulation_steps: ``current_gradient_accumulation_steps``.
        steps_per_generation: ``args.steps_per_generation``.
        training: False reproduces TRL's evaluation branch (no accumulation scaling).

    Returns:
        :class:`AggregatedLoss` ``(loss, policy_loss)``.
    """
    m = mask.to(per_token_loss.dtype)
    lm = per_token_loss * m
    accum = gradient_accumulation_steps if training else 1.0
    if loss_type in ("grpo", "sapo"):
        policy = (lm.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        policy = lm.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 for dr_grpo, got {max_completion_length}.")
        policy = lm.sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(
                f"loss_type={loss_type!r} needs num_items_in_batch (generation-batch loss tokens)."
            )
        items = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
        normalizer = items.clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = lm.sum() / normalizer
        return AggregatedLoss(loss, loss.detach())
    elif loss_type == "luspo":
        policy = lm.sum(-1).mean()
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; TRL 1.16 has {LOSS_TYPES}.")
    return AggregatedLoss(policy / accum, policy.detach())
