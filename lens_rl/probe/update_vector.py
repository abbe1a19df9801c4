"""The update direction v of one real optimizer step, as a pure function of its inputs.

The entropy probe asks how ONE training update changes the policy's entropy, so v must be the
step the trainer would take, per unit of learning rate: ``theta_new = theta + lr * v``. The
research on the original probe found three ways to get this wrong (a gradient B times too
large, weight decay read from the wrong place, a crash on unpacking); here:

- the loss is the GRPO policy-gradient loss with TRL 1.16's normalisation for each
  ``loss_type`` (:func:`pg_loss`) on the trainer's group advantages
  (:func:`lens_rl.training.rewards.group_advantages`);
- the optimizer is built as transformers' ``Trainer.create_optimizer`` builds it (AdamW, one
  group with weight decay and one without, by ``Trainer.get_decay_parameter_names``);
- gradients are clipped with the real ``torch.nn.utils.clip_grad_norm_``;
- :func:`adamw_direction` reads betas, eps, weight decay and lr from ``param_groups`` and the
  moments and step count from ``optimizer.state`` and reproduces ``torch.optim.AdamW``;
- :func:`verify_against_step` runs the real ``optimizer.step()`` on a snapshot and reports
  how far ``(new - old) / lr`` is from v (then restores parameters and optimizer state).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from lens_rl.training.loss_norm import aggregate_loss

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
PROBE_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
ScaleRewards = Literal["group", "batch", "none"]


def pg_loss(
    token_logq: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    loss_type: LossType,
    max_completion_length: int,
) -> torch.Tensor:
    """The on-policy GRPO loss whose gradient is the training gradient.

    At the first step after sampling the ratio ``r = exp(log q - log q_old)`` is 1, so
    clipping is inactive and every supported ``loss_type``'s per-token loss has gradient
    ``-A grad log q`` (grpo/bnpo/dr_grpo/dapo/luspo: ``-min(r A, clip(r) A)``; cispo:
    ``-min(r, eps_high).detach() A log q`` with ``eps_high >= 1``; sapo:
    ``-4 sigmoid(tau (r - 1)) / tau A``, slope 1 at ``r = 1``). The per-token surrogate
    ``-A r`` (value ``-A``, TRL's value for all but sapo) is aggregated by the trainer's own
    :func:`lens_rl.training.loss_norm.aggregate_loss` for one process, one accumulation step
    and ``steps_per_generation = 1`` (the probe's update is one full batch). vespo (a
    sequence-level gamma weight) is not supported.

    Args:
        token_logq: ``(N, T)`` teacher-forced log q with gradient.
        mask: ``(N, T)`` scored tokens.
        advantages: ``(N,)``.
        max_completion_length: dr_grpo's constant (the lens: ``t_text``).
    """

    if loss_type not in PROBE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PROBE_LOSS_TYPES}; got {loss_type!r}.")
    m = mask.to(token_logq.dtype)
    ratio = torch.exp(torch.where(mask.bool(), token_logq - token_logq.detach(), 0.0))
    per_token = -advantages.to(token_logq.dtype)[:, None] * ratio
    return aggregate_loss(
        per_token,
        m,
        loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=m.sum(),
    ).loss


def build_optimizer(
    module: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters, grouped as ``transformers.Trainer`` does
    (biases and norm weights without weight decay), so the probe steps like the trainer."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, module))  # self is unused there
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("The policy has no trainable parameters; nothing to update.")
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)  # empty groups kept, as Trainer


def adamw_direction(optimizer: torch.optim.Optimizer) -> dict[nn.Parameter, torch.Tensor]:
    """The next ``AdamW`` step per unit of the reference lr (``optimizer.defaults['lr']``).

    Reproduces ``torch.optim.AdamW`` (non-amsgrad): ``p <- p (1 - lr wd)`` then
    ``p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` with ``m, v`` the updated moments
    and ``bc_i = 1 - beta_i^(step + 1)``. Parameters without a gradient do not move (as in
    torch). Groups with their own lr are scaled by ``group_lr / reference_lr``.

    Returns:
        ``{param: v}`` with ``theta_new = theta + reference_lr * v``.
    """
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"adamw_direction reproduces torch.optim.AdamW, got {type(optimizer).__name__}.")
    lr_ref = float(optimizer.defaults["lr"])
    out: dict[nn.Parameter, torch.Tensor] = {}
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("amsgrad and maximize are not supported by the probe's update vector.")
        beta1, beta2 = group["betas"]
        eps, wd, lr = group["eps"], group["weight_decay"], float(group["lr"])
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.detach()
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1 if "step" in state else 1.0
            m = state["exp_avg"] * beta1 + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
            v2 = (
                state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
                if "exp_avg_sq" in state
                else (1 - beta2) * g * g
            )
            bc1 = 1 - beta1**step
            denom = v2.sqrt() / math.sqrt(1 - beta2**step) + eps
            direction = -(m / bc1) / denom - wd * p.detach()
            out[p] = direction * (lr / lr_ref)
    return out


def verify_against_step(
    optimizer: torch.optim.Optimizer, direction: dict[nn.Parameter, torch.Tensor]
) -> dict[str, float]:
    """Run the real ``optimizer.step()``, compare ``(new - old) / lr`` with ``direction``, then
    restore the parameters and the optimizer state exactly.

    Returns ``max_abs_err``, ``max_rel_err`` (relative to ``max |v|``), ``max_abs_v`` and
    ``rounding_scale = max |theta| * eps(dtype) / lr``: ``new - old`` is computed in the
    parameters' dtype, so errors of a few ``rounding_scale`` are float rounding, not a mismatch.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    lr_ref = float(optimizer.defaults["lr"])
    optimizer.step()
    max_err, max_v, scale = 0.0, 0.0, 0.0
    with torch.no_grad():
        for p, old in zip(params, before, strict=True):
            if old.numel() == 0:
                continue
            scale = max(scale, float(old.abs().max()) * torch.finfo(old.dtype).eps / lr_ref)
            moved = (p.detach().double() - old.double()) / lr_ref
            expect = direction[p].double() if p in direction else torch.zeros_like(moved)
            max_err = max(max_err, float((moved - expect).abs().max()))
            max_v = max(max_v, float(expect.abs().max()))
            p.copy_(old)
    optimizer.load_state_dict(saved)
    return {
        "max_abs_err": max_err,
        "max_rel_err": max_err / max(max_v, 1e-30),
        "max_abs_v": max_v,
        "rounding_scale": scale,
    }


def named_direction(
    module: nn.Module, direction: dict[nn.Parameter, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{parameter name in module: v}`` for the parameters that move."""
    return {n: direction[p].detach() for n, p in module.named_parameters() if p in direction}
