"""Rewards and GRPO advantages, shared by the GRPO trainer and the entropy probe."""

from __future__ import annotations

import math
from typing import Literal

import torch
from trl.trainer.utils import nanstd

from lens_rl.metrics import reconstruct
from lens_rl.models.families import embed_tokens
from lens_rl.models.lens import ConsistencyLens

RewardType = Literal["nmse", "direction", "log_nmse"]
REWARD_TYPES: tuple[str, ...] = ("nmse", "direction", "log_nmse")
LOG_FLOOR = 1e-8  # log_nmse: nmse below this counts as this (a perfect row stays finite)


def reward_from_reconstruction(
    a_hat: torch.Tensor,
    activations: torch.Tensor,
    var_mean: float,
    train_mean: torch.Tensor | None = None,
    reward_type: RewardType = "nmse",
) -> torch.Tensor:
    """The reconstruction reward per row, float32, from :func:`~lens_rl.metrics.reconstruct`:

    - ``nmse``: ``-||Â - A||² / (d * mean train variance)``; 0 is perfect, -1 the mean predictor;
    - ``direction``: ``-||u(Â - μ) - u(A - μ)||² = -2 (1 - cos)`` (NLA's L2-normalised reward,
      on deviations from the training mean μ); 0 is perfect, -2 orthogonal. Needs ``train_mean``;
    - ``log_nmse``: ``-log(max(nmse, 1e-8))``; the same order of rows as ``nmse``, but equal
      *relative* improvements earn equal rewards at every level of error.
    """
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"reward_type must be one of {REWARD_TYPES}, not {reward_type!r}.")
    if reward_type == "direction" and train_mean is None:
        raise ValueError("reward_type='direction' needs train_mean (the training activations' mean).")
    rec = reconstruct(a_hat, activations, train_mean=train_mean, train_var=var_mean, dtype=torch.float32)
    if reward_type == "direction":
        return -rec.direction_error
    if reward_type == "log_nmse":
        return -torch.log(rec.nmse.clamp(min=LOG_FLOOR))
    return -rec.nmse


@torch.no_grad()
def reconstruction_reward(
    lens: ConsistencyLens,
    activations: torch.Tensor,
    completion_ids: torch.Tensor,
    current_token_ids: torch.Tensor,
    var_mean: float,
    train_mean: torch.Tensor | None = None,
    reward_type: RewardType = "nmse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reward, Â)``: the encoder reads the explanations and :func:`reward_from_reconstruction`
    scores its reconstruction (default ``-nmse``).

    Args:
        activations: ``(N, d)`` the activations the explanations were generated from.
        completion_ids: ``(N, T)`` explanation tokens.
        current_token_ids: ``(N,)`` the token at the activation's position (encoder input).
        var_mean: mean per-dimension variance of the training activations.
        train_mean: ``(d,)`` mean of the training activations (``direction`` needs it).
        reward_type: ``nmse``, ``direction`` or ``log_nmse``.
    """
    emb = embed_tokens(lens.decoder.base, completion_ids)  # what the model embeds (Gemma: scaled)
    a_hat = lens.encoder(emb, current_token_ids=current_token_ids)
    return reward_from_reconstruction(a_hat, activations, var_mean, train_mean, reward_type), a_hat


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


def best_of_group(rewards: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` rewards -> ``(B, G)`` float mask with a 1 at each group's highest reward (the
    first on ties; NaN counts as -inf; an all-NaN group keeps none)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}.")
    r = torch.nan_to_num(rewards.float(), nan=-math.inf)
    best = torch.zeros_like(r)
    best.scatter_(1, r.argmax(dim=1, keepdim=True), 1.0)
    return best * torch.isfinite(r).any(dim=1, keepdim=True)


def zero_std_groups(std: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` bool: the rows of groups whose rewards all agree (the group's std is 0 up to
    ``torch.isclose``'s default tolerance, or has fewer than two scorable rewards): their
    advantages are 0, so they carry no policy gradient."""
    scorable = (~torch.isnan(rewards)).sum(dim=1, keepdim=True)
    flat = torch.isclose(torch.nan_to_num(std, nan=0.0), torch.zeros_like(std))
    return (flat | (scorable < 2)).expand_as(rewards)
