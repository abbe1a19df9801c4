"""Per-token scores and distribution diagnostics under the sampling policy.

Everything here is a function of raw logits ``(..., V)`` (the model's output, before
temperature), the realised tokens and a :class:`SamplingPolicy`:

- ``logp``: log p(y) under the model's plain softmax (temperature 1, no truncation);
- ``logq``: log q(y) under the sampling policy (temperature + truncation), -inf outside it;
- ``rb_entropy``: H(q) at each step, the Rao-Blackwellised entropy estimate;
- ``surprisal``: -log p(y) (the naive entropy estimate).

With ``fp64=True`` the softmax/entropy math runs in float64 and stays in float64 through
the sums. The vocabulary math is chunked over positions so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_rl.ops.sampling import SamplingPolicy, nucleus_candidates, top_k_mask

_CHUNK = 256  # positions per chunk of vocabulary math


def _chunks(n: int, size: int = _CHUNK):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def _dense_stats(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    dtype: torch.dtype,
    tokens: torch.Tensor | None = None,
    diagnostics: bool = False,
    eos_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """All per-position quantities of rows ``(..., V)``, from ONE ``process_logits`` call.

    Written with log-sum-exps and gathers instead of materialised log-softmaxes: the vocabulary
    is traversed as few times as possible (this is the hot loop of teacher-forced scoring).
    """
    raw = raw.to(dtype)
    z = policy.process_logits(raw)  # tempered, -inf outside the support
    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
    q = (z - lse_z).exp()  # 0 outside the support
    z0 = z.masked_fill(q == 0, 0.0)
    qz = q * z0
    e_z = qz.sum(-1)
    out = {"rb_entropy": lse_z.squeeze(-1) - e_z}  # H(q) = logsumexp(z) - E_q[z]
    if tokens is not None:
        y = tokens.unsqueeze(-1)
        out["logp"] = (raw.gather(-1, y) - torch.logsumexp(raw, dim=-1, keepdim=True)).squeeze(-1)
        out["logq"] = (z.gather(-1, y) - lse_z).squeeze(-1)
    if diagnostics:
        if policy.truncates:  # mass of the support under softmax(raw / T)
            lse_full = torch.logsumexp(raw / policy.temperature, dim=-1, keepdim=True)
            out["head_mass"] = (lse_z - lse_full).exp().squeeze(-1).clamp(max=1.0)
        else:
            out["head_mass"] = torch.ones_like(e_z)
        top2 = z.topk(min(2, z.shape[-1]), dim=-1).values
        out["top1_prob"] = (top2[..., 0:1] - lse_z).exp().squeeze(-1)
        margin = top2[..., 0] - top2[..., 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[..., 0])
        out["margin"] = torch.where(torch.isfinite(margin), margin, torch.zeros_like(margin))
        out["collision"] = (q * q).sum(-1)
        out["logit_mean"] = e_z
        out["logit_var"] = ((qz * z0).sum(-1) - e_z * e_z).clamp(min=0)
        if eos_token_id is not None:
            out["eos"] = q[..., eos_token_id]
    return out


_SPARSE_K = 32  # nucleus candidates of the sparse fast path


def _sparse_stats(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    tokens: torch.Tensor | None,
    diagnostics: bool,
    eos_token_id: int | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fast path for nucleus policies: rows ``(M, V)`` whose support lies in their 32 largest
    tempered logits are computed from those 32 values (q is 0 elsewhere). Returns the stats of
    those rows and the boolean mask of rows it decided; the caller computes the rest densely.
    Same rule as :meth:`SamplingPolicy.process_logits` (candidate path, tie-inclusive boundary).
    """
    zt = raw / policy.temperature
    zk = top_k_mask(zt, policy.top_k)
    lse_k = torch.logsumexp(zk, dim=-1, keepdim=True)
    vals, idx, thr, done = nucleus_candidates(zk, policy.top_p, _SPARSE_K, lse_k)
    k = vals.shape[-1]
    vals, idx, thr, zt_d, raw_d = vals[done], idx[done], thr[done], zt[done], raw[done]
    kept = vals >= thr  # tie-inclusive, as process_logits
    kv = vals.masked_fill(~kept, float("-inf"))
    lse_z = torch.logsumexp(kv, dim=-1, keepdim=True)
    q = (kv - lse_z).exp()
    v0 = vals.masked_fill(~kept, 0.0)
    qz = q * v0
    e_z = qz.sum(-1)
    out = {"rb_entropy": lse_z.squeeze(-1) - e_z}
    if tokens is not None:
        y = tokens[done].unsqueeze(-1)
        z_y = zt_d.gather(-1, y)
        out["logp"] = (raw_d.gather(-1, y) - torch.logsumexp(raw_d, dim=-1, keepdim=True)).squeeze(-1)
        in_support = (z_y >= thr) & (z_y > float("-inf"))
        if policy.top_k > 0:
            in_support &= zk[done].gather(-1, y) > float("-inf")
        out["logq"] = torch.where(in_support, z_y - lse_z, torch.full_like(z_y, float("-inf"))).squeeze(-1)
    if diagnostics:
        lse_full = torch.logsumexp(zt_d, dim=-1, keepdim=True) if policy.top_k > 0 else lse_k[done]
        out["head_mass"] = (lse_z - lse_full).exp().squeeze(-1).clamp(max=1.0)
        out["top1_prob"] = q[:, 0]
        margin = vals[:, 0] - vals[:, 1] if k > 1 else torch.zeros_like(vals[:, 0])
        out["margin"] = torch.where(
            kept[:, 1] if k > 1 else torch.zeros_like(kept[:, 0]), margin, torch.zeros_like(margin)
        )
        out["collision"] = (q * q).sum(-1)
        out["logit_mean"] = e_z
        out["logit_var"] = ((qz * v0).sum(-1) - e_z * e_z).clamp(min=0)
        if eos_token_id is not None:
            out["eos"] = (q * (idx == eos_token_id)).sum(-1)
    return out, done


def _chunk_stats(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    dtype: torch.dtype,
    tokens: torch.Tensor | None = None,
    diagnostics: bool = False,
    eos_token_id: int | None = None,
    sparse: bool = True,
) -> dict[str, torch.Tensor]:
    """All per-position quantities of one chunk ``(N, t, V)``: the sparse nucleus fast path
    where it applies (nucleus policies without min-p), the dense computation elsewhere."""
    raw = raw.to(dtype)
    shape = raw.shape[:-1]
    flat = raw.reshape(-1, raw.shape[-1])
    y = None if tokens is None else tokens.reshape(-1)
    if not (sparse and policy.top_p < 1.0 and policy.min_p == 0.0):
        res = _dense_stats(flat, policy, dtype, y, diagnostics, eos_token_id)
        return {k: v.reshape(shape) for k, v in res.items()}
    fast, done = _sparse_stats(flat, policy, y, diagnostics, eos_token_id)
    if bool(done.all()):
        return {k: v.reshape(shape) for k, v in fast.items()}
    rest = _dense_stats(
        flat[~done], policy, dtype, None if y is None else y[~done], diagnostics, eos_token_id
    )
    out = {}
    for k, v in fast.items():
        merged = torch.empty(flat.shape[0], dtype=v.dtype, device=v.device)
        merged[done] = v
        merged[~done] = rest[k]
        out[k] = merged.reshape(shape)
    return out


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
    """``logp``, ``logq``, ``rb_entropy``, ``surprisal``: each ``tokens.shape``; keeps the graph.

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
        """:func:`token_scores` and :meth:`compute_from_logits` in one pass over the vocabulary."""
        dtype = torch.float64 if fp64 else torch.float32
        st = _chunked(logits, self.policy, dtype, tokens, diagnostics=True, eos_token_id=self.eos_token_id)
        st["surprisal"] = -st["logp"]
        scores = {k: st[k] for k in ("logp", "logq", "rb_entropy", "surprisal")}
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
