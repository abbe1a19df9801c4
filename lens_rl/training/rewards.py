"""Rewards for the lens policy, shared by the GRPO trainer and the entropy probe."""

from __future__ import annotations

import torch

from lens_rl.models.lens import ConsistencyLens


@torch.no_grad()
def reconstruction_reward(
    lens: ConsistencyLens,
    activations: torch.Tensor,
    completion_ids: torch.Tensor,
    current_token_ids: torch.Tensor,
    var_mean: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reward, Â)``: reward ``-||Â - A||^2 / (d * mean train variance)`` per row: 0 is perfect, -1 is the mean predictor.

    Args:
        activations: ``(N, d)`` the activations the explanations were generated from.
        completion_ids: ``(N, T)`` explanation tokens.
        current_token_ids: ``(N,)`` the token at the activation's position (encoder input).
        var_mean: mean per-dimension variance of the training activations.
    """
    emb = lens.decoder.base.get_input_embeddings().weight[completion_ids]
    a_hat = lens.encoder(emb, current_token_ids=current_token_ids)
    return -(a_hat - activations).pow(2).mean(-1) / var_mean, a_hat
