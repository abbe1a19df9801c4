"""Estimators of the entropy change and their standard errors.

Notation: an evaluation batch E of N sequences ``y_i`` drawn from the sampling policy q_theta
(prompts with replacement from a pool, one response each), per-step RB entropies ``H_ij`` (the
entropy of q at step j given the prefix), ``T_i`` scored tokens, sample weights ``w_i``
(1 for samples; exact probabilities when a test enumerates every sequence). Two targets:

- per-sequence: ``H = E[sum_j H_j]`` (the sequence entropy);
- per-token:    ``H = E[sum_j H_j] / E[T]``.

**First-order prediction** ``dH/d eta`` along v (:func:`predict_delta_h`). With
``s_j = d log q(y_j | y_<j) / d eta``:
``dE[f] = E[sum_j dH_j + sum_j (R_j - b_j) s_j]`` where ``R_j = sum_{k>j} (H_k - c)``
is the entropy-to-go (``c = 0`` per-sequence; ``c = H_bar`` per-token, which accounts for the
change in ``E[T]``) and ``b_j`` is any baseline that depends on the prefix only. Baselines:
``none``; ``position`` (mean of R_j at step j); ``regression`` (ridge on per-step features of
the step-j distribution). Fits are cross-fitted over ``folds`` random folds: sequence i's
baseline is fitted on the other folds, so it is independent of y_i and adds no bias.

**Ground truth** ``H(theta + eta v) - H(theta)`` by self-normalised importance sampling over E
(:func:`snis_delta_h`), with sequence weights ``q_new(y) / q_old(y)`` computed from per-token
differences of log q in float64 under the SAME sampling policy that drew E.

**Standard errors** (:func:`replicates`): every statistic is a function of per-sequence sums,
evaluated under replicate inclusion weights: delete-one jackknife (default) or bootstrap counts.
The SE is that of the statistic itself (the original probe reported SEs too small by N).
Differences (truth - prediction) are evaluated on the same replicates: paired intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import torch

Baseline = Literal["none", "position", "regression"]
Normalize = Literal["per_token", "per_sequence"]
BASELINES: tuple[str, ...] = ("none", "position", "regression")
FEATURE_NAMES: tuple[str, ...] = (
    "rb_entropy",
    "top1_prob",
    "margin",
    "head_mass",
    "two_point_entropy",
    "logit_var",
    "position",
)


# ---------------------------------------------------------------------------- replicates and CIs
def replicates(
    n: int,
    stat: Callable[[torch.Tensor], torch.Tensor],
    method: Literal["jackknife", "bootstrap"] = "jackknife",
    n_bootstrap: int = 1000,
    generator: torch.Generator | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Evaluate ``stat(c)`` for replicate inclusion weights ``c`` of shape ``(r, n)``.

    Jackknife: row i leaves sequence i out (``c = 1 - e_i``). Bootstrap: multinomial counts.
    ``stat`` maps ``(r, n)`` weights to ``(r,)`` values (all our statistics are ratios of
    weighted sums, so this is vectorised). Returns all replicate values.
    """
    if n < 2:
        raise ValueError("Standard errors need at least 2 sequences.")
    out = []
    if method == "jackknife":
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            c = torch.ones(e - s, n, dtype=torch.float64)
            c[torch.arange(e - s), torch.arange(s, e)] = 0.0
            out.append(stat(c))
    elif method == "bootstrap":
        gen = generator or torch.Generator().manual_seed(0)
        for s in range(0, n_bootstrap, chunk):
            r = min(chunk, n_bootstrap - s)
            idx = torch.randint(0, n, (r, n), generator=gen)
            c = torch.zeros(r, n, dtype=torch.float64).scatter_add_(
                1, idx, torch.ones(r, n, dtype=torch.float64)
            )
            out.append(stat(c))
    else:
        raise ValueError(f"method must be jackknife or bootstrap, not {method!r}.")
    return torch.cat(out)


def standard_error(values: torch.Tensor, method: Literal["jackknife", "bootstrap"]) -> float:
    """SE from replicate values: jackknife ``sqrt((n-1)/n sum (t_i - t_bar)^2)``, bootstrap std."""
    v = values.double()
    if method == "jackknife":
        n = v.numel()
        return float(((n - 1) / n * (v - v.mean()).pow(2).sum()).sqrt())
    return float(v.std(unbiased=True))


@dataclass
class Estimate:
    """A point estimate with its standard error and normal confidence interval."""

    value: float
    se: float
    level: float

    @property
    def ci(self) -> tuple[float, float]:
        """``value -+ z se``."""
        z = NormalDist().inv_cdf(0.5 + self.level / 2)
        return (self.value - z * self.se, self.value + z * self.se)

    def covers(self, x: float) -> bool:
        """Whether ``x`` lies in the interval."""
        lo, hi = self.ci
        return lo <= x <= hi

    def as_dict(self) -> dict[str, float | list[float]]:
        """JSON-ready."""
        return {"value": self.value, "se": self.se, "ci": list(self.ci), "level": self.level}


def estimate(
    stat: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    method: Literal["jackknife", "bootstrap"] = "jackknife",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Estimate:
    """``stat`` on all sequences, with the SE of its replicates."""
    full = float(stat(torch.ones(1, n, dtype=torch.float64))[0])
    reps = replicates(n, stat, method, n_bootstrap, torch.Generator().manual_seed(seed))
    return Estimate(full, standard_error(reps, method), level)


# ---------------------------------------------------------------------------- per-sequence inputs
@dataclass
class SequenceTerms:
    """Per-sequence sums the estimators combine (all float64, ``(N,)``)."""

    h: torch.Tensor  # sum_j H_j at theta
    length: torch.Tensor  # T_i
    weight: torch.Tensor  # sample weight w_i
    a: torch.Tensor | None = None  # sum_j dH_j + sum_j (R_j - b_j) s_j   (R without centring)
    e: torch.Tensor | None = None  # sum_j C_j s_j   (C_j = tokens after j), for the per-token centring


def _to_go(x: torch.Tensor) -> torch.Tensor:
    """``sum_{k > j} x_k`` along the last dim."""
    return x.flip(-1).cumsum(-1).flip(-1) - x


def _fit_baseline(
    kind: str,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    features: torch.Tensor | None,
    fold: torch.Tensor,
    folds: int,
    ridge: float,
) -> torch.Tensor:
    """Baseline ``b (N, T)`` for ``target (N, T)``, each sequence's fitted on the other folds
    (on all sequences when ``folds == 1``)."""
    if kind == "none":
        return torch.zeros_like(target)
    m = mask.to(target.dtype) * weight[:, None]
    out = torch.zeros_like(target)
    for f in range(folds):
        train = (fold != f) if folds > 1 else torch.ones_like(fold, dtype=torch.bool)
        apply = fold == f
        mt = m * train[:, None].to(m.dtype)
        if kind == "position":
            mean = (target * mt).sum(0) / mt.sum(0).clamp(min=1e-300)
            out[apply] = mean.expand_as(target)[apply]
        elif kind == "regression":
            if features is None:
                raise ValueError("The regression baseline needs per-step features.")
            x = torch.cat([torch.ones_like(features[..., :1]), features], -1)  # (N, T, F + 1)
            xf, yf, wf = x.reshape(-1, x.shape[-1]), target.reshape(-1), mt.reshape(-1)
            xtwx = (xf * wf[:, None]).T @ xf
            scale = xtwx.diagonal().mean().clamp(min=1e-300)
            eye = torch.eye(xtwx.shape[0], dtype=xtwx.dtype)
            beta = torch.linalg.solve(xtwx + ridge * scale * eye, (xf * wf[:, None]).T @ yf)
            out[apply] = (x @ beta)[apply]
        else:
            raise ValueError(f"Unknown baseline {kind!r}; choose from {BASELINES}.")
    return out * mask.to(target.dtype)


def prediction_terms(
    rb: torch.Tensor,
    d_rb: torch.Tensor,
    d_logq: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    baseline: str = "none",
    normalize: Normalize = "per_token",
    folds: int = 2,
    ridge: float = 1e-3,
    generator: torch.Generator | None = None,
) -> SequenceTerms:
    """Per-sequence pieces of the first-order estimator (module docstring), ``(N, T)`` inputs.

    For ``per_token`` the baseline is fitted to the centred entropy-to-go
    ``R_j - H_bar C_j`` with ``H_bar`` from the same batch; the prediction recomputes ``H_bar``
    on each replicate through ``e``.
    """
    rb, d_rb, d_logq = rb.double(), d_rb.double(), d_logq.double()
    mf = mask.to(torch.float64)
    n = rb.shape[0]
    w = torch.ones(n, dtype=torch.float64) if weight is None else weight.double()
    h = (rb * mf).sum(-1)
    length = mf.sum(-1)
    r_go = _to_go(rb * mf)
    c_go = _to_go(mf)
    h_bar = float((w * h).sum() / (w * length).sum()) if normalize == "per_token" else 0.0
    target = (r_go - h_bar * c_go) * mf
    fold = (
        torch.randperm(n, generator=generator or torch.Generator().manual_seed(0)) % folds
        if folds > 1
        else torch.zeros(n, dtype=torch.long)
    )
    b = _fit_baseline(baseline, target, mask, w, features, fold, folds, ridge)
    s = d_logq * mf
    a = (d_rb * mf).sum(-1) + ((r_go - b) * s).sum(-1)
    e = (c_go * s).sum(-1)
    return SequenceTerms(h=h, length=length, weight=w, a=a, e=e)


def prediction_stat(terms: SequenceTerms, normalize: Normalize) -> Callable[[torch.Tensor], torch.Tensor]:
    """``c -> dH/d eta`` on replicate weights ``c (r, N)``."""
    w = terms.weight

    def stat(c: torch.Tensor) -> torch.Tensor:
        cw = c * w
        if normalize == "per_sequence":
            return (cw @ terms.a) / cw.sum(-1)
        h_bar = (cw @ terms.h) / (cw @ terms.length)
        return (cw @ terms.a - h_bar * (cw @ terms.e)) / (cw @ terms.length)

    return stat


# ---------------------------------------------------------------------------- SNIS ground truth
@dataclass
class SNISTerms:
    """Per-sequence inputs of the SNIS estimate at one eta (float64 ``(N,)``)."""

    log_weight: torch.Tensor  # sum_j (log q_new - log q_old), clipped if asked
    h_new: torch.Tensor
    h_old: torch.Tensor
    length: torch.Tensor
    weight: torch.Tensor  # sample weight
    clipped: torch.Tensor  # bool
    outside_support: torch.Tensor  # bool: a sampled token left the new policy's nucleus (q_new = 0)


def snis_terms(
    logq_old: torch.Tensor,
    logq_new: torch.Tensor,
    rb_old: torch.Tensor,
    rb_new: torch.Tensor,
    mask: torch.Tensor,
    clip_log_weight: float | None = None,
    weight: torch.Tensor | None = None,
) -> SNISTerms:
    """Sequence log-weights from per-token float64 differences (then summed), RB sums."""
    mf = mask.to(torch.float64)
    diff = torch.where(mask, logq_new.double() - logq_old.double(), torch.zeros_like(mf))
    lw = diff.sum(-1)
    outside = torch.isneginf(lw)
    clipped = torch.zeros_like(lw, dtype=torch.bool)
    if clip_log_weight is not None:
        clipped = lw.abs() > clip_log_weight
        lw = lw.clamp(-clip_log_weight, clip_log_weight)
    n = lw.shape[0]
    return SNISTerms(
        log_weight=lw,
        h_new=(rb_new.double() * mf).sum(-1),
        h_old=(rb_old.double() * mf).sum(-1),
        length=mf.sum(-1),
        weight=torch.ones(n, dtype=torch.float64) if weight is None else weight.double(),
        clipped=clipped,
        outside_support=outside,
    )


def snis_stat(terms: SNISTerms, normalize: Normalize) -> Callable[[torch.Tensor], torch.Tensor]:
    """``c -> H_new - H_old`` on replicate weights ``c (r, N)``."""
    iw = torch.exp(terms.log_weight - terms.log_weight.max())

    def stat(c: torch.Tensor) -> torch.Tensor:
        cw = c * terms.weight
        ciw = cw * iw
        if normalize == "per_sequence":
            return (ciw @ terms.h_new) / ciw.sum(-1) - (cw @ terms.h_old) / cw.sum(-1)
        return (ciw @ terms.h_new) / (ciw @ terms.length) - (cw @ terms.h_old) / (cw @ terms.length)

    return stat


def weight_diagnostics(terms: SNISTerms) -> dict[str, float]:
    """ESS ``(sum w)^2 / sum w^2`` (and as a fraction of N), clip fraction, max finite
    ``|log w|``, and the fraction of E whose sampled tokens left the new nucleus (a top-p/top-k
    support change: tokens that ENTER the nucleus are never sampled, so SNIS is then biased)."""
    iw = torch.exp(terms.log_weight - terms.log_weight.max()) * terms.weight
    ess = float(iw.sum() ** 2 / iw.pow(2).sum())
    n = terms.log_weight.numel()
    return {
        "ess": ess,
        "ess_fraction": ess / n,
        "clip_fraction": float(terms.clipped.double().mean()),
        "max_abs_log_weight": float(terms.log_weight[torch.isfinite(terms.log_weight)].abs().max())
        if torch.isfinite(terms.log_weight).any()
        else float("inf"),
        "outside_support_fraction": float(terms.outside_support.double().mean()),
    }


def base_entropy_stat(
    h: torch.Tensor, length: torch.Tensor, weight: torch.Tensor, normalize: Normalize
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``c -> H(theta)`` (per-token or per-sequence) on replicate weights."""

    def stat(c: torch.Tensor) -> torch.Tensor:
        cw = c * weight.double()
        den = cw @ length.double() if normalize == "per_token" else cw.sum(-1)
        return (cw @ h.double()) / den

    return stat


# ---------------------------------------------------------------------------- covariance baseline
@dataclass
class CovarianceTerms:
    """Per-sequence sums of the covariance baseline (float64 ``(N,)``): ``sum_t log q``,
    ``sum_t A``, ``sum_t A log q`` and ``T`` over the scored tokens of each update sequence."""

    logq: torch.Tensor
    adv: torch.Tensor
    adv_logq: torch.Tensor
    length: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor  # sequences summed into each row (1; G when rows are GRPO groups)

    def by_group(self, group_size: int) -> CovarianceTerms:
        """Rows summed over consecutive groups of ``group_size`` (GRPO groups share advantages,
        so replicates leave out whole groups)."""

        def g(x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, group_size).sum(-1)

        if not torch.equal(self.weight, torch.ones_like(self.weight)):
            raise ValueError("by_group is for unweighted samples.")
        return CovarianceTerms(
            g(self.logq),
            g(self.adv),
            g(self.adv_logq),
            g(self.length),
            torch.ones(self.logq.numel() // group_size, dtype=torch.float64),
            g(self.count),
        )


def covariance_terms(
    token_logq: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> CovarianceTerms:
    """Inputs of :func:`covariance_stat` from ``(N, T)`` log q, mask and ``(N,)`` or ``(N, T)``
    advantages (``weight``: sequence weights, e.g. exact probabilities in an enumeration)."""
    mf = mask.to(torch.float64)
    lq = torch.where(mask.bool(), token_logq.detach().double(), torch.zeros_like(mf))
    a = advantages.detach().double()
    a = (a[:, None] if a.dim() == 1 else a).expand_as(mf) * mf
    n = mf.shape[0]
    return CovarianceTerms(
        logq=lq.sum(-1),
        adv=a.sum(-1),
        adv_logq=(a * lq).sum(-1),
        length=mf.sum(-1),
        weight=torch.ones(n, dtype=torch.float64) if weight is None else weight.double(),
        count=torch.ones(n, dtype=torch.float64),
    )


def covariance_stat(terms: CovarianceTerms, normalize: Normalize) -> Callable[[torch.Tensor], torch.Tensor]:
    """``c -> -Cov(log q, A)``: the entropy-change-per-unit-eta of Cui et al. 2025 (arXiv
    2505.22617, and verl's Clip-Cov/KL-Cov covariance), on replicate weights ``c (r, N)``.

    ``Cov`` is the token-level covariance over every scored token of the update batch:
    ``mean_tok(log q A) - mean_tok(log q) mean_tok(A)``. For a tabular softmax policy whose
    logits take the natural-policy-gradient step ``z(s, a) += eta A(s, a)``,
    ``dH(s)/d eta = -Cov_{a ~ pi(.|s)}(log pi(a|s), A(s, a))`` exactly; the paper applies it to
    LLMs with ``eta`` the learning rate and the covariance over sampled tokens, which is what
    this returns (per token: the mean per-token entropy change; per sequence: that times the
    mean number of tokens per sequence). It does not look at v: its scale is the natural-PG
    logit step, not the optimizer's parameter step.
    """

    def stat(c: torch.Tensor) -> torch.Tensor:
        cw = c * terms.weight
        tokens = cw @ terms.length
        cov = (cw @ terms.adv_logq) / tokens - (cw @ terms.logq) * (cw @ terms.adv) / tokens**2
        if normalize == "per_sequence":
            return -cov * tokens / (cw @ terms.count)
        return -cov

    return stat
