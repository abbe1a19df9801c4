"""The fused scoring kernel: log p, log q, RB entropy and the step diagnostics of rows of logits.

For rows of raw logits ``(n, V)``, realised tokens ``(n,)`` and a :class:`SamplingPolicy`, one
call yields (each ``(n,)``):

- ``logp``: log p(y) under the plain softmax (temperature 1, no truncation);
- ``logp_temp``: log p_T(y) under ``softmax(logits / T)`` without truncation (the importance
  ratio TRL computes);
- ``logq``: log q(y) under the policy (temperature, min-p, top-k, top-p), -inf outside it;
- ``rb_entropy``: H(q);
- with ``diagnostics``: ``head_mass``, ``top1_prob``, ``margin``, ``collision``, ``logit_mean``,
  ``logit_var`` and ``eos`` (q of the EOS token).

The support of q is an upper set of the tempered logits ``z = logits / T``: ``{z >= thr}``. The
kernel finds ``thr`` without sorting the vocabulary, then reads everything off a few sums:

1. one sweep over the row (max, then in the same loop the sums ``Σ e^u``, ``Σ e^u u``,
   ``Σ e^u u²``, ``Σ e^{2u}`` with ``u = z - max z``, the log-sum-exp at temperature 1, the
   count of the top logit, the runner-up and the smallest logit). Without truncation this is all there is.
2. min-p and top-k give a first threshold ``t0`` (``max z + log min_p``; the k-th logit via
   ``topk``, ties kept). The nucleus is decided on the ``32`` largest logits where it lies in
   them (peaked rows). Elsewhere (flat rows) a bracket search narrows ``thr`` with a few
   sweeps that each measure the mass above ``16`` thresholds at once, then decides it exactly
   on the ``64`` largest logits inside the bracket. Rows even that cannot decide (large exact
   ties at the boundary) fall back to the full sort of :func:`~lens_rl.ops.sampling._nucleus_threshold_full`.
3. the support sums: from the candidates where the support lies in them, else one masked sweep.

The rules are :meth:`SamplingPolicy.process_logits`'s (tie-inclusive at every boundary; a token
is kept by the nucleus iff the mass ranked above it is < top_p, the top token always). Results
equal the dense computation (``log_softmax(process_logits(logits))`` and its sums) to rounding:
tested at 1e-12 in float64 (``tests/test_scoring_kernel.py``).

The sweeps are compiled with ``torch.compile`` when it pays (large rows, no gradient needed; see
:func:`set_compile`), so each is one loop over the row instead of a chain of materialised
tensors; the same functions run eagerly otherwise (and keep the autograd graph, forward mode
included: the thresholds are discrete decisions and carry no gradient).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from statistics import NormalDist

import torch

from lens_rl.ops.sampling import SamplingPolicy, _nucleus_threshold_full, nucleus_edge_tol

log = logging.getLogger(__name__)

_CAND = 32  # largest logits that decide peaked rows
_SPLITS = 16  # thresholds measured per bracket sweep
_ROUNDS = 4  # uniform bracket sweeps at most (the bracket shrinks 17x per sweep)
_FINISH = 64  # largest logits inside the bracket that decide flat rows
_SORT_VOCAB = 4096  # up to this vocabulary size, undecided rows are sorted (measured faster, eager)
# first-sweep thresholds, in units of q's spread around the guessed threshold (the last is max z)
_GUESS_OFFSETS = (-3.0, -2.0, -1.2, -0.7, -0.4, -0.2, -0.1, -0.03, 0.03, 0.1, 0.2, 0.4, 0.7, 1.2, 2.0, 0.0)
_COMPILE_MIN_ELEMENTS = 1 << 21  # rows x V below which compiling does not pay
_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- compilation
_COMPILE_MODE = os.environ.get("LENS_RL_COMPILE_SCORING", "auto")
_compiled: dict[str, Callable] = {}
_compile_seconds: dict[str, float] = {}
_compile_failed = False
_timings: dict[str, float] | None = None  # seconds per sweep while profile_sweeps() is active


@contextmanager
def profile_sweeps():
    """Collect wall seconds per sweep (``full``, ``bracket``, ``support``, ``candidates``, ...)
    into the yielded dict while active (benchmarks; adds a perf_counter per sweep)."""
    global _timings
    _timings = {}
    try:
        yield _timings
    finally:
        _timings = None


@contextmanager
def _timed(name: str):
    if _timings is None:
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        _timings[name] = _timings.get(name, 0.0) + time.perf_counter() - t0


def set_compile(mode: str) -> None:
    """``"auto"`` (compile sweeps over >= 2M logits when no gradient is needed), ``"always"`` or
    ``"never"``. Also read from the environment variable ``LENS_RL_COMPILE_SCORING``."""
    global _COMPILE_MODE
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"compile mode must be auto, always or never, not {mode!r}.")
    _COMPILE_MODE = mode


def compile_seconds() -> dict[str, float]:
    """Wall seconds spent in the first (compiling) call of each compiled sweep, by name."""
    return dict(_compile_seconds)


_compile_this_call = False  # the decision of the running score_rows call, for all its sweeps


def _use_compile(raw: torch.Tensor) -> bool:
    if _COMPILE_MODE == "never" or _compile_failed:
        return False
    if raw.requires_grad and torch.is_grad_enabled():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(raw):  # inside torch.func transforms
        return False
    return _COMPILE_MODE == "always" or raw.numel() >= _COMPILE_MIN_ELEMENTS


def _run(name: str, fn: Callable, raw: torch.Tensor, *args, eager: Callable | None = None):
    """``fn(raw, *args)``, through its compiled version when :func:`_use_compile` says so (else
    ``eager`` when given: the same quantity written for eager execution)."""
    global _compile_failed
    with _timed(name):
        if not _compile_this_call:
            return (eager or fn)(raw, *args)
        first = name not in _compiled
        if first:
            _compiled[name] = torch.compile(fn)  # automatic dynamic shapes: V stays static
        try:
            t0 = time.perf_counter()
            out = _compiled[name](raw, *args)
            if first:
                _compile_seconds[name] = time.perf_counter() - t0
            return out
        except Exception as e:  # a missing compiler toolchain, an unsupported backend, ...
            _compile_failed = True
            log.warning("torch.compile of the scoring kernel failed (%s); running eagerly from now on.", e)
            return (eager or fn)(raw, *args)


# ---------------------------------------------------------------------------- the sweeps
def _sweep_full(raw: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """Step 1 over rows ``(n, V)``; every output ``(n, 1)``. ``mz = max z``; ``s*`` are the sums
    of ``e^u``, ``e^u u``, ``e^u u²``, ``e^{2u}`` with ``u = z - mz``; ``lse1`` the log-sum-exp of
    the raw logits; ``n_top`` the count of the top logit and ``second`` the largest logit below it."""
    m = raw.amax(-1, keepdim=True).detach()  # the shift cancels: no gradient through it
    z = raw / temperature
    mz = m / temperature
    e = (z - mz).exp()
    u = torch.where(e > 0, z - mz, torch.zeros_like(z))  # -inf logits: mass 0, no 0 * -inf
    s0 = e.sum(-1, keepdim=True)
    s1 = (e * u).sum(-1, keepdim=True)
    s2 = (e * u * u).sum(-1, keepdim=True)
    s3 = (e * e).sum(-1, keepdim=True)
    lse1 = mz + s0.log() if temperature == 1.0 else m + (raw - m).exp().sum(-1, keepdim=True).log()
    top = raw == m
    n_top = top.sum(-1, keepdim=True)
    second = raw.masked_fill(top, _NEG_INF).amax(-1, keepdim=True).detach()
    z_min = raw.detach().masked_fill(raw == _NEG_INF, float("inf")).amin(-1, keepdim=True) / temperature
    return mz, s0, s1, s2, s3, lse1, n_top, second, z_min


def _sweep_full_eager(raw: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """:func:`_sweep_full` for eager mode: the same outputs with half the temporaries of the
    row's size (``topk(2)`` for the runner-up, the top-count and the minimum only as needed)."""
    m = raw.detach().amax(-1, keepdim=True)
    mz = m / temperature
    u = (raw / temperature - mz).clamp(min=-1e30)  # -inf logits: e = 0 and e * u = 0, not NaN
    e = u.exp()
    s0 = e.sum(-1, keepdim=True)
    eu = e * u
    s1 = eu.sum(-1, keepdim=True)
    s2 = (eu * u).sum(-1, keepdim=True)
    s3 = (e * e).sum(-1, keepdim=True)
    lse1 = mz + s0.log() if temperature == 1.0 else torch.logsumexp(raw, -1, keepdim=True)
    top2 = raw.detach().topk(min(2, raw.shape[-1]), dim=-1).values
    second = top2[:, 1:2] if top2.shape[-1] > 1 else torch.full_like(m, _NEG_INF)
    n_top = 1 + (second == m).long()  # 1, or >= 2 (all that margin needs)
    z_min = raw.detach().amin(-1, keepdim=True)
    bad = (z_min == _NEG_INF)[:, 0]
    if bool(bad.any()):  # the smallest finite logit of rows that hold -inf
        z_min[bad] = (
            raw.detach()[bad].masked_fill(raw.detach()[bad] == _NEG_INF, float("inf")).amin(-1, keepdim=True)
        )
    return mz, s0, s1, s2, s3, lse1, n_top, second, z_min / temperature


def _sweep_support(
    raw: torch.Tensor, temperature: float, thr: torch.Tensor, mz: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The sums of :func:`_sweep_full` restricted to the support ``z >= thr`` (``(n, 1)`` each)."""
    z = raw / temperature
    e = torch.where(z >= thr, (z - mz).exp(), torch.zeros_like(z))
    u = torch.where(e > 0, z - mz, torch.zeros_like(z))
    s0 = e.sum(-1, keepdim=True)
    s1 = (e * u).sum(-1, keepdim=True)
    s2 = (e * u * u).sum(-1, keepdim=True)
    s3 = (e * e).sum(-1, keepdim=True)
    return s0, s1, s2, s3


def _sweep_bracket(
    raw: torch.Tensor,
    temperature: float,
    t0: torch.Tensor,
    lse0: torch.Tensor,
    taus: torch.Tensor,
) -> torch.Tensor:
    """Mass (under the renormalised ``z >= t0`` distribution) of ``z >= taus[:, k]`` for each of
    the ``_SPLITS`` thresholds: ``(n, _SPLITS)``. One loop over the row with 16 accumulators."""
    z = raw / temperature
    p = torch.where(z >= t0, (z - lse0).exp(), torch.zeros_like(z))
    return torch.cat(
        [torch.where(z >= taus[:, k : k + 1], p, 0.0).sum(-1, keepdim=True) for k in range(_SPLITS)], -1
    )


def _sweep_bracket_eager(
    raw: torch.Tensor,
    temperature: float,
    t0: torch.Tensor,
    lse0: torch.Tensor,
    taus: torch.Tensor,
) -> torch.Tensor:
    """:func:`_sweep_bracket` for eager mode, without 16 temporaries of the row's size: each
    token's bucket among the (ascending) thresholds, a per-row histogram of the mass, and
    the masses above each threshold as its reverse cumulative sum."""
    z = raw / temperature
    p = torch.where(z >= t0, (z - lse0).exp(), torch.zeros_like(z))
    idx = torch.searchsorted(taus.contiguous(), z, right=True)  # thresholds <= z: 0.._SPLITS
    # accumulated in float64: a float32 running sum over thousands of tokens drifts by ~1e-5,
    # enough to move the nucleus boundary by a token
    hist = torch.zeros(z.shape[0], _SPLITS + 1, dtype=torch.float64, device=z.device)
    hist.scatter_add_(1, idx, p.double())
    return hist.flip(-1).cumsum(-1).flip(-1)[:, 1:].to(z.dtype)  # mass of z >= taus[:, k]


def _sweep_inside(raw: torch.Tensor, temperature: float, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``z`` where ``lo <= z < hi``, -inf elsewhere: ``(n, V)``."""
    z = raw / temperature
    return torch.where((z >= lo) & (z < hi), z, torch.full_like(z, _NEG_INF))


def _sweep_lse_above(
    raw: torch.Tensor, temperature: float, t0: torch.Tensor, mz: torch.Tensor
) -> torch.Tensor:
    """``log Σ_{z >= t0} e^z`` per row ``(n, 1)``."""
    z = raw / temperature
    return mz + torch.where(z >= t0, (z - mz).exp(), torch.zeros_like(z)).sum(-1, keepdim=True).log()


# ---------------------------------------------------------------------------- nucleus
def _nucleus_on_sorted(
    vals: torch.Tensor, mass_above: torch.Tensor, lse0: torch.Tensor, top_p: float, v_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus rule on descending tempered values ``(r, c)`` (-inf padding) that follow a
    mass ``mass_above`` ``(r, 1)`` of higher-ranked tokens. Returns the smallest kept value
    ``(r, 1)`` and whether these values decide the row ``(r,)`` (the crossing lies among them and
    its tie does not reach past the last one)."""
    p = (vals - lse0).exp()
    cum = mass_above + p.cumsum(-1)
    above = torch.cat([mass_above, cum[:, :-1]], -1)
    keep = (above < top_p) & (vals > _NEG_INF)
    thr = vals.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
    done = (cum[:, -1] >= top_p) & (thr[:, 0] > vals[:, -1]) & keep[:, 0]
    done |= vals[:, -1] == _NEG_INF  # every token of the bracket was seen
    # A decision within rounding of the boundary (mass ranked above a token ~ top_p) is left to
    # the full sort, whose arithmetic is the sampler's (vLLM's ascending cumsum): summed in
    # another order, the kernel could keep a token the sampler dropped, or the reverse.
    # The mass above the token after the last one (cum[:, -1]) counts too: the bracket's lower
    # end was placed by a sweep's sum, which can differ from this one by rounding.
    tol = nucleus_edge_tol(vals.dtype, v_size)
    near = ((above - top_p).abs() <= tol).any(-1) | ((cum[:, -1] - top_p).abs() <= tol)
    return thr, done & torch.isfinite(thr[:, 0]) & ~near


def _nucleus_bracket(
    raw: torch.Tensor,
    temperature: float,
    t0: torch.Tensor,
    lse0: torch.Tensor,
    mz: torch.Tensor,
    z_min: torch.Tensor,
    guess: tuple[torch.Tensor, torch.Tensor],
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus threshold of rows ``(r, V)`` whose candidates did not decide it.

    The bracket ``[lo, hi)`` always holds the threshold: the mass of ``z >= lo`` is >= top_p and
    that of ``z >= hi`` (``mass_hi``) is < top_p. A first sweep measures the mass above 16
    thresholds around ``guess = (centre, spread)`` (the quantile of a normal with q's mean and
    spread: a guess only, it never changes the result); then uniform sweeps shrink the bracket
    17x each, and after each one the ``_FINISH`` largest logits inside it decide every row they
    can. Returns ``(thr (r, 1), done (r,))``; rows not done after ``_ROUNDS`` sweeps go to the
    caller's full sort."""
    r = raw.shape[0]
    lo = torch.maximum(z_min, t0)
    hi = torch.full_like(lo, float("inf"))
    mass_hi = torch.zeros_like(lo)
    offsets = torch.tensor(_GUESS_OFFSETS, dtype=raw.dtype, device=raw.device)
    taus = (guess[0] + guess[1] * offsets).clamp(min=lo, max=mz)
    taus[:, -1:] = mz
    lo, hi, mass_hi = _shrink(raw, temperature, t0, lse0, taus, lo, hi, mass_hi, top_p)
    thr = torch.full_like(lo, float("nan"))
    done = torch.zeros(r, dtype=torch.bool, device=raw.device)
    todo = torch.arange(r, device=raw.device)
    k = torch.arange(1, _SPLITS + 1, dtype=raw.dtype, device=raw.device) / (_SPLITS + 1)
    for _ in range(_ROUNDS):
        x, t0_, lse0_, lo_, hi_, mh_ = (_rows(a, todo) for a in (raw, t0, lse0, lo, hi, mass_hi))
        taus = lo_ + (torch.minimum(hi_, mz.index_select(0, todo)) - lo_) * k
        lo_, hi_, mh_ = _shrink(x, temperature, t0_, lse0_, taus, lo_, hi_, mh_, top_p)
        kk = min(_FINISH, raw.shape[-1])
        inside = _run("inside", _sweep_inside, x, temperature, lo_, hi_)
        with _timed("finish_topk"):
            vals = inside.topk(kk, dim=-1).values
        thr_, done_ = _nucleus_on_sorted(vals, mh_, lse0_, top_p, raw.shape[-1])
        thr = thr.index_put((todo,), thr_)
        done = done.index_put((todo,), done_)
        lo, hi, mass_hi = (a.index_put((todo,), b) for a, b in ((lo, lo_), (hi, hi_), (mass_hi, mh_)))
        todo = todo[~done_]
        if todo.numel() == 0:
            break
    return thr, done


def _shrink(
    raw: torch.Tensor,
    temperature: float,
    t0: torch.Tensor,
    lse0: torch.Tensor,
    taus: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    mass_hi: torch.Tensor,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bracket sweep at ascending thresholds ``taus`` ``(r, _SPLITS)``: the new ``lo``,
    ``hi`` and ``mass_hi``."""
    s = _run("bracket", _sweep_bracket, raw, temperature, t0, lse0, taus, eager=_sweep_bracket_eager)
    ok = s >= top_p
    lo = torch.maximum(lo, torch.where(ok, taus, lo).amax(-1, keepdim=True))
    new_hi = torch.where(ok, float("inf"), taus).amin(-1, keepdim=True)
    mass_new = torch.where(taus == new_hi, s, 0.0).amax(-1, keepdim=True)
    better = new_hi < hi
    return lo, torch.where(better, new_hi, hi), torch.where(better, mass_new, mass_hi)


# ---------------------------------------------------------------------------- the kernel
def _support_sums_from(vals: torch.Tensor, thr: torch.Tensor, mz: torch.Tensor) -> tuple[torch.Tensor, ...]:
    e = torch.where(vals >= thr, (vals - mz).exp(), torch.zeros_like(vals))
    u = torch.where(e > 0, vals - mz, torch.zeros_like(vals))
    return (
        e.sum(-1, keepdim=True),
        (e * u).sum(-1, keepdim=True),
        (e * u * u).sum(-1, keepdim=True),
        (e * e).sum(-1, keepdim=True),
    )


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (ascending, distinct) of ``x``; ``x`` itself when that is every row (no copy)."""
    return x if idx.numel() == x.shape[0] else x.index_select(0, idx)


def score_rows(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    tokens: torch.Tensor | None = None,
    diagnostics: bool = False,
    eos_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """All per-row quantities of rows ``raw`` ``(n, V)`` (already in the working dtype).

    Args:
        raw: raw logits ``(n, V)`` (float32 or float64; the math runs in this dtype).
        policy: the sampling policy q.
        tokens: ``(n,)`` realised tokens, or None (then no ``logp``/``logp_temp``/``logq``).
        diagnostics: also return the step diagnostics (see the module docstring).
        eos_token_id: token whose q is returned as ``eos`` (with ``diagnostics``).

    Returns:
        ``rb_entropy`` and the requested quantities, each ``(n,)``.
    """
    global _compile_this_call
    outer, _compile_this_call = _compile_this_call, _use_compile(raw)
    try:
        return _score_rows(raw, policy, tokens, diagnostics, eos_token_id)
    finally:
        _compile_this_call = outer


def _score_rows(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    tokens: torch.Tensor | None,
    diagnostics: bool,
    eos_token_id: int | None,
) -> dict[str, torch.Tensor]:
    t = policy.temperature
    mz, s0, s1, s2, s3, lse1, n_top, second, z_min = _run(
        "full", _sweep_full, raw, t, eager=_sweep_full_eager
    )
    lse_t = mz + s0.log()  # log-sum-exp of the tempered, untruncated logits
    thr = torch.full_like(mz, _NEG_INF)
    if policy.truncates:
        thr, (s0, s1, s2, s3) = _truncated_support(raw, policy, mz, lse_t, z_min, (s0, s1, s2))
    lse_z = mz + s0.log()
    e_u = s1 / s0
    out = {"rb_entropy": (s0.log() - e_u)[:, 0]}  # H(q) = log Σ e^u - E_q[u]
    if tokens is not None:
        raw_y = raw.gather(-1, tokens[:, None])
        z_y = raw_y / t
        out["logp"] = (raw_y - lse1)[:, 0]
        out["logp_temp"] = (z_y - lse_t)[:, 0]
        out["logq"] = torch.where(z_y >= thr, z_y - lse_z, torch.full_like(z_y, _NEG_INF))[:, 0]
    if diagnostics:
        out["head_mass"] = (
            (lse_z - lse_t).exp()[:, 0].clamp(max=1.0) if policy.truncates else torch.ones_like(mz[:, 0])
        )
        out["top1_prob"] = (1.0 / s0)[:, 0]  # q of the top token: e^0 / Σ e^u
        z2 = torch.where(n_top >= 2, mz, second / t)
        margin = mz - z2
        out["margin"] = torch.where((z2 >= thr) & torch.isfinite(margin), margin, torch.zeros_like(margin))[
            :, 0
        ]
        out["collision"] = (s3 / (s0 * s0))[:, 0]
        out["logit_mean"] = (mz + e_u)[:, 0]
        out["logit_var"] = (s2 / s0 - e_u * e_u).clamp(min=0)[:, 0]
        if eos_token_id is not None:
            z_e = raw[:, eos_token_id : eos_token_id + 1] / t
            out["eos"] = torch.where(z_e >= thr, (z_e - lse_z).exp(), torch.zeros_like(z_e))[:, 0]
    return out


def _truncated_support(
    raw: torch.Tensor,
    policy: SamplingPolicy,
    mz: torch.Tensor,
    lse_t: torch.Tensor,
    z_min: torch.Tensor,
    full_sums: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``thr`` ``(n, 1)`` of the support ``z >= thr`` and the support sums ``(s0, s1, s2, s3)``."""
    n, v = raw.shape
    t = policy.temperature
    raw_d = raw.detach()  # thresholds are decisions: no gradient
    k_c = min(max(_CAND, policy.top_k if 0 < policy.top_k <= 4 * _CAND else 0), v)
    if policy.top_k == 0 and policy.min_p == 0.0 and bool((k_c * (mz - lse_t).exp() < policy.top_p).all()):
        k_c, cand = 1, mz  # flat rows: the largest logits cannot hold top_p of the mass; no topk
    else:
        with _timed("candidates_topk"):
            cand = raw.topk(k_c, dim=-1, sorted=True).values / t  # (n, k_c) descending, z space; keeps grad
    cand_d = cand.detach()
    t0 = torch.full_like(mz, _NEG_INF)
    if policy.min_p > 0.0:
        t0 = mz + math.log(policy.min_p)
    if 0 < policy.top_k < v:
        kth = cand_d[:, policy.top_k - 1 : policy.top_k] if policy.top_k <= k_c else None
        if kth is None:
            kth = raw_d.topk(policy.top_k, dim=-1).values[:, -1:] / t
        t0 = torch.maximum(t0, kth)
    in_cands = (
        cand_d[:, -1:] < t0 if k_c < v else torch.ones_like(t0, dtype=torch.bool)
    )  # support <= candidates
    cand_sup = cand_d.masked_fill(cand_d < t0, _NEG_INF)
    # log-mass of z >= t0: free without min-p/top-k, from the candidates where they hold it
    lse0 = lse_t.detach()
    if policy.min_p > 0.0 or policy.top_k > 0:
        lse0 = torch.where(in_cands, torch.logsumexp(cand_sup, -1, keepdim=True), lse_t)
        rest = (~in_cands[:, 0]).nonzero()[:, 0]
        if rest.numel():
            lse0 = lse0.index_put(
                (rest,),
                _run("lse_above", _sweep_lse_above, _rows(raw_d, rest), t, _rows(t0, rest), _rows(mz, rest)),
            )
    thr = t0
    if policy.top_p < 1.0:
        thr, done = _nucleus_on_sorted(cand_sup, torch.zeros_like(mz), lse0, policy.top_p, v)
        if k_c == v:
            done = torch.ones_like(done)
        rest = (~done).nonzero()[:, 0]
        if rest.numel() and v <= _SORT_VOCAB and not _compile_this_call:  # eager, small V: a sort is faster
            z_s = _rows(raw_d, rest) / t
            z_s = z_s.masked_fill(z_s < _rows(t0, rest), _NEG_INF)
            with _timed("full_sort"):
                thr = thr.index_put((rest,), _nucleus_threshold_full(z_s, policy.top_p))
            rest = rest[:0]
        if rest.numel():
            r_raw = _rows(raw_d, rest)
            s0, s1, s2 = (_rows(x.detach(), rest) for x in full_sums[:3])
            mean = s1 / s0
            spread = (s2 / s0 - mean * mean).clamp(min=0).sqrt()
            centre = _rows(mz, rest) + mean - spread * NormalDist().inv_cdf(policy.top_p)
            thr_b, done_b = _nucleus_bracket(
                r_raw,
                t,
                _rows(t0, rest),
                _rows(lse0, rest),
                _rows(mz, rest),
                _rows(z_min, rest),
                (centre, spread),
                policy.top_p,
            )
            hard = (~done_b).nonzero()[:, 0]
            if hard.numel():  # exact ties across the bracket: the full sort decides
                z_h = _rows(r_raw, hard) / t
                z_h = z_h.masked_fill(z_h < _rows(_rows(t0, rest), hard), _NEG_INF)
                with _timed("full_sort"):
                    thr_b = thr_b.index_put((hard,), _nucleus_threshold_full(z_h, policy.top_p))
            thr = thr.index_put((rest,), thr_b)
        thr = torch.maximum(thr, t0)
    # support sums: from the candidates where the support lies in them, else one masked sweep
    inside = cand_d[:, -1:] < thr if k_c < v else torch.ones_like(thr, dtype=torch.bool)
    sums = [torch.where(inside, c, torch.zeros_like(c)) for c in _support_sums_from(cand, thr, mz)]
    rest = (~inside[:, 0]).nonzero()[:, 0]
    if rest.numel():
        swept = _run("support", _sweep_support, _rows(raw, rest), t, _rows(thr, rest), _rows(mz, rest))
        sums = [s.index_put((rest,), w) for s, w in zip(sums, swept, strict=True)]
    return thr, tuple(sums)
