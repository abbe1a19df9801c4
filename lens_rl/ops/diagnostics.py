"""Per-token scores and distribution diagnostics under the sampling policy: :func:`score_tokens`.

:func:`score_tokens` is the one entry point (the decoder's ``fwd_tokens``, the sequence
processor, the GRPO trainer and, through the processor, the entropy probe call it). It is a
function of raw logits ``(N, T, V)`` (the model's output, before temperature), the realised
tokens ``(N, T)`` and a :class:`SamplingPolicy`, and returns :class:`TokenScores` with the
kernel's names:

- ``logp``: log p(y) under the model's plain softmax (temperature 1, no truncation);
- ``logp_temp``: log p_T(y) under ``softmax(logits / T)`` without truncation (TRL's ratio);
- ``logq``: log q(y) under the sampling policy (temperature + truncation), -inf outside it;
- ``rb_entropy``: H(q) at each step, the Rao-Blackwellised entropy estimate;
- ``surprisal``: -log p(y) (the naive entropy estimate);
- ``diagnostics`` (on request): the step and sequence diagnostics of q (:class:`DiagnosticsPack`),
  from the same sweep over the vocabulary.

With ``fp64=True`` the softmax/entropy math runs in float64 and stays in float64 through
the sums. The vocabulary math is chunked over positions so memory stays bounded, and each chunk
is one call of the fused kernel :func:`lens_rl.ops.scoring.score_rows` (a few sweeps over the
vocabulary instead of a sort and materialised log-softmaxes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.ops.scoring import score_rows

_CHUNK = 256  # positions per chunk of vocabulary math


def _chunks(n: int, size: int = _CHUNK):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def _chunk_stats(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    dtype: torch.dtype,
    tokens: torch.Tensor | None = None,
    diagnostics: bool = False,
    eos_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """All per-position quantities of one chunk ``(N, t, V)``, each ``(N, t)``: the fused kernel
    :func:`~lens_rl.ops.scoring.score_rows` on the flattened rows."""
    shape = raw.shape[:-1]
    flat = raw.to(dtype).reshape(-1, raw.shape[-1])
    res = score_rows(flat, policy, None if tokens is None else tokens.reshape(-1), diagnostics, eos_token_id)
    return {k: v.reshape(shape) for k, v in res.items()}


def _chunked(
    logits, policy, dtype, tokens=None, diagnostics=False, eos_token_id=None
) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for sl in _chunks(logits.shape[1]):
        res = _chunk_stats(
            logits[:, sl], policy, dtype, None if tokens is None else tokens[:, sl], diagnostics, eos_token_id
        )
        for k, v in res.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v, dim=1) for k, v in parts.items()}


@dataclass
class TokenStepDiagnostics:
    """Per-step diagnostics under q, each ``(N, T)``."""

    rb_entropy: torch.Tensor
    head_mass: torch.Tensor
    tail_mass: torch.Tensor
    two_point_entropy: torch.Tensor
    top1_prob: torch.Tensor
    margin: torch.Tensor
    collision: torch.Tensor
    renyi2: torch.Tensor
    eff_support: torch.Tensor
    logit_mean: torch.Tensor
    logit_var: torch.Tensor
    eos_prob: torch.Tensor | None


@dataclass
class SequenceDiagnostics:
    """Per-sequence aggregates, each ``(N,)``."""

    length: torch.Tensor
    rb_entropy_sum: torch.Tensor
    rb_entropy_mean: torch.Tensor
    rb_entropy_max: torch.Tensor
    rb_entropy_min: torch.Tensor
    early_rb_entropy_mean: torch.Tensor
    late_rb_entropy_mean: torch.Tensor
    surprisal_sum: torch.Tensor
    surprisal_mean: torch.Tensor
    margin_mean: torch.Tensor
    margin_sum: torch.Tensor
    top1_mean: torch.Tensor
    collision_mean: torch.Tensor
    renyi2_mean: torch.Tensor
    eff_support_mean: torch.Tensor
    eos_prob_mean: torch.Tensor | None


@dataclass
class DiagnosticsPack:
    """Both levels for a batch of sequences."""

    step: TokenStepDiagnostics
    seq: SequenceDiagnostics

    @classmethod
    def cat(cls, packs: Sequence[DiagnosticsPack]) -> DiagnosticsPack:
        """The packs of consecutive row batches as one pack (rows concatenated in order)."""

        def cat_fields(objs, kind):
            vals = {}
            for f in fields(kind):
                xs = [getattr(o, f.name) for o in objs]
                vals[f.name] = None if xs[0] is None else torch.cat(xs)
            return kind(**vals)

        return cls(
            step=cat_fields([p.step for p in packs], TokenStepDiagnostics),
            seq=cat_fields([p.seq for p in packs], SequenceDiagnostics),
        )


@dataclass
class TokenScores:
    """Scores of realised tokens ``(N, T)`` under a sampling policy, each ``(N, T)`` (no mask
    applied; the graph to the logits is kept, forward mode too).

    Attributes:
        logp: log p(y) under the plain softmax (temperature 1, no truncation).
        logp_temp: log p_T(y) under ``softmax(logits / T)`` without truncation (TRL's ratio).
        logq: log q(y) under the sampling policy (-inf outside its support).
        rb_entropy: H(q) at each step (the Rao-Blackwellised entropy estimate).
        surprisal: -log p(y) (the naive entropy estimate).
        diagnostics: the step and sequence diagnostics over the mask (detached), when requested.
    """

    logp: torch.Tensor
    logp_temp: torch.Tensor
    logq: torch.Tensor
    rb_entropy: torch.Tensor
    surprisal: torch.Tensor
    diagnostics: DiagnosticsPack | None = None


def score_tokens(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    policy: SamplingPolicy,
    *,
    fp64: bool = False,
    diagnostics: bool = False,
    mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    early_window: int = 16,
) -> TokenScores:
    """log p, log p_T, log q, RB entropy, surprisal (and the diagnostics) of ``tokens`` in one pass.

    Args:
        logits: ``(N, T, V)`` raw logits; row ``t`` scores ``tokens[:, t]``.
        tokens: ``(N, T)`` realised tokens.
        policy: the sampling policy q.
        fp64: run the vocabulary math in float64 (the scores stay float64).
        diagnostics: also compute :class:`DiagnosticsPack` (from the same sweep; detached).
        mask: ``(N, T)`` scored tokens for the diagnostics and their sequence aggregates; None: all.
        eos_token_id: token whose q is reported as ``eos_prob`` in the diagnostics.
        early_window: steps counted as early in ``early_rb_entropy_mean``.
    """
    dtype = torch.float64 if fp64 else torch.float32
    st = _chunked(logits, policy, dtype, tokens, diagnostics, eos_token_id)
    st["surprisal"] = -st["logp"]
    pack = None
    if diagnostics:
        detached = {k: v.detach() for k, v in st.items()}
        pack = _diagnostics_pack(detached, mask, detached["surprisal"], early_window)
    return TokenScores(
        logp=st["logp"],
        logp_temp=st["logp_temp"],
        logq=st["logq"],
        rb_entropy=st["rb_entropy"],
        surprisal=st["surprisal"],
        diagnostics=pack,
    )


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * x.clamp(min=1e-300).log(), torch.zeros_like(x))


def _diagnostics_pack(
    st: dict[str, torch.Tensor], mask: torch.Tensor | None, surprisal: torch.Tensor, early_window: int
) -> DiagnosticsPack:
    """Diagnostics of q at every step from the kernel's per-step quantities ``st`` (each
    ``(N, T)``, detached). ``head_mass`` is the mass the truncation keeps under the tempered,
    untruncated distribution softmax(logits / T); ``tail_mass = 1 - head_mass``. ``margin`` is
    the gap between the two largest kept tempered logits (0 with a one-token support)."""
    dtype = st["rb_entropy"].dtype
    n, t = st["rb_entropy"].shape
    device = st["rb_entropy"].device
    mask = torch.ones(n, t, dtype=torch.bool, device=device) if mask is None else mask.bool()
    st.setdefault("eos", None)
    m = mask.to(dtype)
    head = st["head_mass"]
    step = TokenStepDiagnostics(
        rb_entropy=st["rb_entropy"] * m,
        head_mass=head * m,
        tail_mass=(1 - head) * m,
        two_point_entropy=-(_xlogx(head) + _xlogx(1 - head)) * m,
        top1_prob=st["top1_prob"] * m,
        margin=st["margin"] * m,
        collision=st["collision"] * m,
        renyi2=-st["collision"].log() * m,
        eff_support=st["rb_entropy"].exp() * m,
        logit_mean=st["logit_mean"] * m,
        logit_var=st["logit_var"] * m,
        eos_prob=st["eos"] * m if st.get("eos") is not None else None,
    )
    length = m.sum(1)
    denom = length.clamp(min=1)

    def mean_(x: torch.Tensor) -> torch.Tensor:
        return (x * m).sum(1) / denom

    pos = torch.arange(t, device=device)[None, :]
    early = m * (pos < early_window)
    late = m * (pos >= early_window)
    h = step.rb_entropy
    early_mean = (h * early).sum(1) / early.sum(1).clamp(min=1)
    late_mean = torch.where(late.sum(1) > 0, (h * late).sum(1) / late.sum(1).clamp(min=1), early_mean)
    sur = surprisal.to(dtype) * m
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    seq = SequenceDiagnostics(
        length=length,
        rb_entropy_sum=h.sum(1),
        rb_entropy_mean=h.sum(1) / denom,
        rb_entropy_max=torch.where(mask, h, -inf).amax(1).clamp(min=0),
        rb_entropy_min=torch.where(mask, h, inf).amin(1).nan_to_num(posinf=0.0),
        early_rb_entropy_mean=early_mean,
        late_rb_entropy_mean=late_mean,
        surprisal_sum=sur.sum(1),
        surprisal_mean=sur.sum(1) / denom,
        margin_mean=mean_(step.margin),
        margin_sum=step.margin.sum(1),
        top1_mean=mean_(step.top1_prob),
        collision_mean=mean_(step.collision),
        renyi2_mean=mean_(step.renyi2),
        eff_support_mean=mean_(step.eff_support),
        eos_prob_mean=mean_(step.eos_prob) if step.eos_prob is not None else None,
    )
    return DiagnosticsPack(step=step, seq=seq)
