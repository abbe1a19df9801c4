"""Per-token scores and distribution diagnostics under the sampling policy.

Everything here is a function of raw logits ``(..., V)`` (the model's output, before
temperature), the realised tokens and a :class:`SamplingPolicy`:

- ``logp``: log p(y) under the model's plain softmax (temperature 1, no truncation);
- ``logp_temp``: log p_T(y) under ``softmax(logits / T)`` without truncation (TRL's ratio);
- ``logq``: log q(y) under the sampling policy (temperature + truncation), -inf outside it;
- ``rb_entropy``: H(q) at each step, the Rao-Blackwellised entropy estimate;
- ``surprisal``: -log p(y) (the naive entropy estimate).

With ``fp64=True`` the softmax/entropy math runs in float64 and stays in float64 through
the sums. The vocabulary math is chunked over positions so memory stays bounded, and each chunk
is one call of the fused kernel :func:`lens_rl.ops.scoring.score_rows` (a few sweeps over the
vocabulary instead of a sort and materialised log-softmaxes).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def token_scores(
    logits: torch.Tensor, tokens: torch.Tensor, policy: SamplingPolicy, fp64: bool = False
) -> dict[str, torch.Tensor]:
    """``logp``, ``logp_temp``, ``logq``, ``rb_entropy``, ``surprisal``: each ``tokens.shape``;
    keeps the graph (forward-mode too).

    Args:
        logits: ``(N, T, V)`` raw logits; row ``t`` scores ``tokens[:, t]``.
        tokens: ``(N, T)`` realised tokens.
    """
    res = _chunked(logits, policy, torch.float64 if fp64 else torch.float32, tokens)
    res["surprisal"] = -res["logp"]
    return res


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


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * x.clamp(min=1e-300).log(), torch.zeros_like(x))


class DistributionDiagnostics:
    """Diagnostics of the sampling distribution q (tempered, truncated) at every step.

    ``head_mass`` is the mass the truncation keeps under the tempered, untruncated
    distribution softmax(logits / T); ``tail_mass = 1 - head_mass``. ``margin`` is the gap
    between the two largest kept tempered logits (0 with a one-token support).
    """

    def __init__(
        self, policy: SamplingPolicy, eos_token_id: int | None = None, early_window: int = 16
    ) -> None:
        self.policy = policy
        self.eos_token_id = eos_token_id
        self.early_window = early_window

    @torch.no_grad()
    def compute_from_logits(
        self,
        logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        surprisal: torch.Tensor | None = None,
        fp64: bool = True,
    ) -> DiagnosticsPack:
        """Diagnostics for ``logits`` ``(N, T, V)``; ``mask`` ``(N, T)`` marks scored steps."""
        dtype = torch.float64 if fp64 else torch.float32
        st = _chunked(logits, self.policy, dtype, diagnostics=True, eos_token_id=self.eos_token_id)
        return self._pack(st, mask, surprisal)

    def score_and_diagnose(
        self, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None, fp64: bool = False
    ) -> tuple[dict[str, torch.Tensor], DiagnosticsPack]:
        """:func:`token_scores` and :meth:`compute_from_logits` in one pass over the vocabulary.

        Returns ``({"logp", "logp_temp", "logq", "rb_entropy", "surprisal"}, pack)``; the scores
        keep the graph, the pack is detached.
        """
        dtype = torch.float64 if fp64 else torch.float32
        st = _chunked(logits, self.policy, dtype, tokens, diagnostics=True, eos_token_id=self.eos_token_id)
        st["surprisal"] = -st["logp"]
        scores = {k: st[k] for k in ("logp", "logp_temp", "logq", "rb_entropy", "surprisal")}
        detached = {k: v.detach() for k, v in st.items()}
        return scores, self._pack(detached, mask, detached["surprisal"])

    def _pack(self, st: dict[str, torch.Tensor], mask, surprisal) -> DiagnosticsPack:
        dtype = st["rb_entropy"].dtype
        n, t = st["rb_entropy"].shape
        device = st["rb_entropy"].device
        mask = torch.ones(n, t, dtype=torch.bool, device=device) if mask is None else mask.bool()
        st.setdefault("eos", None)
        zero = torch.zeros_like(st["rb_entropy"])
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
        early = m * (pos < self.early_window)
        late = m * (pos >= self.early_window)
        h = step.rb_entropy
        early_mean = (h * early).sum(1) / early.sum(1).clamp(min=1)
        late_mean = torch.where(late.sum(1) > 0, (h * late).sum(1) / late.sum(1).clamp(min=1), early_mean)
        sur = surprisal.to(dtype) * m if surprisal is not None else zero
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


@dataclass
class PolicyScores:
    """What one scoring pass yields for ``(N, T)`` tokens (each ``(N, T)``; no mask applied).

    Attributes:
        logq: log q(y) under the sampling policy (-inf outside its support).
        logp_temp: log p_T(y) under ``softmax(logits / T)`` without truncation (TRL's ratio).
        logp: log p(y) under the plain softmax (temperature 1).
        rb_entropy: H(q) at each step.
        diagnostics: the step and sequence diagnostics over ``mask``.
    """

    logq: torch.Tensor
    logp_temp: torch.Tensor
    logp: torch.Tensor
    rb_entropy: torch.Tensor
    diagnostics: DiagnosticsPack


def score_policy(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor | None,
    policy: SamplingPolicy,
    eos_token_id: int | None = None,
    fp64: bool = False,
) -> PolicyScores:
    """log q, log p_T, log p, RB entropy and the diagnostics of ``token_ids`` in one pass.

    Args:
        logits: ``(N, T, V)`` raw logits; row ``t`` scores ``token_ids[:, t]``.
        token_ids: ``(N, T)`` realised tokens.
        mask: ``(N, T)`` scored tokens (diagnostics and sequence aggregates), or None for all.
        policy: the sampling policy.
        eos_token_id: token whose q is reported as ``eos_prob``.
        fp64: run the vocabulary math in float64.
    """
    scores, pack = DistributionDiagnostics(policy, eos_token_id).score_and_diagnose(
        logits, token_ids, mask, fp64
    )
    return PolicyScores(
        logq=scores["logq"],
        logp_temp=scores["logp_temp"],
        logp=scores["logp"],
        rb_entropy=scores["rb_entropy"],
        diagnostics=pack,
    )
