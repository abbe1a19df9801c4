"""Rewards and GRPO advantages, shared by the GRPO trainer and the entropy probe."""

from __future__ import annotations

from typing import Literal

import torch
from trl.trainer.utils import nanstd

from lens_rl.metrics import reconstruct
from lens_rl.models.families import embed_tokens
from lens_rl.models.lens import ConsistencyLens


@torch.no_grad()
def reconstruction_reward(
    lens: ConsistencyLens,
    activations: torch.Tensor,
    completion_ids: torch.Tensor,
    current_token_ids: torch.Tensor,
    var_mean: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reward, Â)``: reward ``-nmse = -||Â - A||^2 / (d * mean train variance)`` per row
    (:func:`~lens_rl.metrics.reconstruct`, float32): 0 is perfect, -1 is the mean predictor.

    Args:
        activations: ``(N, d)`` the activations the explanations were generated from.
        completion_ids: ``(N, T)`` explanation tokens.
        current_token_ids: ``(N,)`` the token at the activation's position (encoder input).
        var_mean: mean per-dimension variance of the training activations.
    """
    emb = embed_tokens(lens.decoder.base, completion_ids)  # what the model embeds (Gemma: scaled)
    a_hat = lens.encoder(emb, current_token_ids=current_token_ids)
    return -reconstruct(a_hat, activations, train_var=var_mean, dtype=torch.float32).nmse, a_hat


def group_advantages(
    rewards: torch.Tensor, scale_rewards: Literal["group", "batch", "none"] = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's GRPO advantages for rewards ``(B, G)`` (NaN = unscorable): ``r - group mean``,
    divided by the group (or batch) standard deviation (Bessel-corrected, ``+ 1e-4``) unless
    ``scale_rewards='none'``; NaN advantages become 0. Returns ``(advantages, std)``, both
    ``(B, G)`` (``std`` is the group's, or the batch's, also for ``none``: for logging)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}.")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}.")
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    if scale_rewards == "batch":
        std = nanstd(rewards.flatten()).expand_as(rewards)
    else:
        std = nanstd(rewards, dim=1).unsqueeze(1).expand_as(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), std
