"""Importance weights between a sampler and a scorer, and the statistics to watch.

Log-ratios are taken between any two per-token log-prob tensors ``(N, T)`` (the sampler's
returned log-probs, log q recomputed by teacher forcing, log p), with a mask of scored tokens.
Token-level ratios use ``exp(Δ_t)``; sequence-level ones ``exp(Σ_t Δ_t)``. ``truncate``
clamps the ratio to ``[clip_min, clip_max]``; ``mask`` zeroes ratios outside the bounds
(TRL's four modes). Tokens where either side is -inf (outside a truncated support) are
reported by :func:`mismatch_stats` and get weight 0.
"""

from __future__ import annotations

from typing import Literal

import torch

ISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def token_log_ratio(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``num - den`` on scored tokens, 0 elsewhere; -inf/NaN (support mismatch) become -inf."""
    diff = num.double() - den.double()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("-inf")), diff)
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def sequence_log_ratio(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence ``Σ_t (num - den)`` over scored tokens, ``(N,)``."""
    return token_log_ratio(num, den, mask).sum(-1)


def importance_weights(
    log_ratio: torch.Tensor,
    mode: ISMode = "token_truncate",
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights from per-token log-ratios ``(N, T)``; sequence modes broadcast one weight per row."""
    if mode.startswith("sequence"):
        lr = (log_ratio * mask if mask is not None else log_ratio).sum(-1, keepdim=True)
        lr = lr.expand_as(log_ratio)
    else:
        lr = log_ratio
    w = lr.exp()
    lo = clip_min if clip_min is not None else 0.0
    hi = clip_max if clip_max is not None else float("inf")
    if mode.endswith("truncate"):
        w = w.clamp(min=lo, max=hi)
        if clip_min is not None:  # a -inf log-ratio (support mismatch) is not rescued by clip_min
            w = torch.where(torch.isneginf(lr), torch.zeros_like(w), w)
    else:
        w = torch.where((w >= lo) & (w <= hi), w, torch.zeros_like(w))
    if mask is not None:
        w = w * mask
    return w


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """``(Σ w)^2 / Σ w^2`` for log-weights ``(N,)``, computed stably (equals N for equal weights)."""
    lw = log_w.double()
    lw = lw - lw[torch.isfinite(lw)].max() if torch.isfinite(lw).any() else lw
    w = lw.exp()
    return w.sum() ** 2 / (w * w).sum().clamp(min=1e-300)


def mismatch_stats(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    unclipped: torch.Tensor | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Summary of token log-ratios on scored tokens; with ``weights`` (after clipping) and
    ``unclipped`` (the same mode without bounds), also the mean weight and the clipped fraction."""
    m = mask.bool()
    vals = log_ratio[m]
    finite = vals[torch.isfinite(vals)]
    seq = (log_ratio * m).sum(-1)
    out = {
        "tokens": float(m.sum()),
        "outside_support": float((~torch.isfinite(vals)).sum()),
        "log_ratio_mean": float(finite.mean()) if finite.numel() else 0.0,
        "log_ratio_abs_mean": float(finite.abs().mean()) if finite.numel() else 0.0,
        "log_ratio_abs_max": float(finite.abs().max()) if finite.numel() else 0.0,
        "ratio_mean": float(finite.exp().mean()) if finite.numel() else 0.0,
        "seq_log_ratio_mean": float(seq[torch.isfinite(seq)].mean()) if torch.isfinite(seq).any() else 0.0,
        "seq_ess_fraction": float(effective_sample_size(seq) / max(seq.numel(), 1)),
    }
    if weights is not None:
        w = weights[m]
        out["weight_mean"] = float(w.mean()) if w.numel() else 0.0
        if unclipped is not None and w.numel():
            out["clipped_or_masked_fraction"] = float((w != unclipped[m]).double().mean())
    return {prefix + k: v for k, v in out.items()}
