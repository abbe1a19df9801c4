"""The one sampling policy of the project: temperature, top-k, top-p (and min-p).

Every generator (the decoder's, the HF path, the parameters handed to vLLM) samples from
``q = softmax(process_logits(logits))`` and every scorer computes ``log q`` with the same
:meth:`SamplingPolicy.process_logits`, so importance weights compare like with like.

The truncation rule is vLLM's (``vllm/v1/sample/ops/topk_topp_sampler.py``,
``apply_top_k_top_p_pytorch``), which HF's ``TopKLogitsWarper``/``TopPLogitsWarper`` share:

- temperature first: ``z = logits / T``;
- top-k keeps every token whose logit is >= the k-th largest (ties at the threshold stay);
- top-p sorts ascending, and removes a token iff the cumulative mass up to and including it
  is ``<= 1 - top_p``; equivalently a token is kept iff the mass of the tokens ranked above
  it is ``< top_p``. The most likely token is always kept, so the token that crosses the
  threshold is kept too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingPolicy:
    """Temperature and truncation of the distribution tokens are sampled from.

    Attributes:
        temperature: divides the logits; must be > 0 (greedy decoding is not a policy with
            log-probs; use a small temperature instead).
        top_k: keep the k most likely tokens (ties at the k-th logit kept); 0 disables.
        top_p: nucleus mass in (0, 1]; 1 disables.
        min_p: drop tokens whose probability is below ``min_p`` times the top probability;
            0 disables.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}.")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 disables it), got {self.min_p}.")

    @property
    def truncates(self) -> bool:
        """Whether any truncation (top-k, top-p, min-p) is active."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Return ``logits / T`` in fp32 (or the input's wider dtype) with dropped tokens at -inf.

        Args:
            logits: raw model logits, shape ``(..., V)``. Not modified.
        """
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(dtype) / self.temperature
        if not self.truncates:
            return z
        shape = z.shape
        z = z.reshape(-1, shape[-1])
        if self.min_p > 0.0:
            probs = z.softmax(dim=-1)
            thresh = self.min_p * probs.amax(dim=-1, keepdim=True)
            z = z.masked_fill(probs < thresh, float("-inf"))
        if self.top_p < 1.0:
            z = _top_k_top_p(z, self.top_k, self.top_p)
        elif self.top_k > 0 and self.top_k < shape[-1]:
            kth = z.topk(self.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))  # ties at the k-th logit stay
        return z.reshape(shape)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log q`` over the vocabulary, shape ``(..., V)``; -inf for dropped tokens."""
        return F.log_softmax(self.process_logits(logits), dim=-1)

    def vllm_kwargs(self) -> dict[str, float | int]:
        """The same policy as keyword arguments for ``vllm.SamplingParams``."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k if self.top_k > 0 else -1,
            "top_p": self.top_p,
            "min_p": self.min_p,
        }


_CANDIDATES = (32, 512)  # candidate-set sizes tried before falling back to a full sort


def _nucleus_threshold_full(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest kept logit per row ``(N, 1)`` by vLLM's rule (one ascending sort, inclusive
    cumulative mass ``<= 1 - top_p`` dropped, the most likely token always kept)."""
    z_sort, _ = z.sort(dim=-1, descending=False)
    cum = z_sort.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1.0 - top_p
    drop[:, -1] = False
    return z_sort.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)


def top_k_mask(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """``z`` ``(N, V)`` with every token below the k-th largest logit at -inf (ties at it stay)."""
    if not 0 < top_k < z.shape[-1]:
        return z
    kth = z.topk(top_k, dim=-1).values[:, -1:]
    return z.masked_fill(z < kth, float("-inf"))


def nucleus_edge_tol(dtype: torch.dtype, v: int) -> float:
    """How close to top_p a cumulative mass must be for the nucleus decision to be left to the
    full sort (:func:`_nucleus_threshold_full`, the engines' ascending cumsum): a bound on the
    rounding that separates two summation orders of ``v`` probabilities. Shared by the candidate
    path here and the scoring kernel (``lens_rl.ops.scoring``)."""
    return 4.0 * torch.finfo(dtype).eps * v**0.5


def nucleus_candidates(
    z: torch.Tensor, top_p: float, k: int, lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nucleus rule on the ``k`` largest logits of each row of ``z`` ``(N, V)``.

    Returns ``(vals, idx, thr, done)``: the candidates in descending order ``(N, k)``, their
    token ids, the smallest kept logit ``(N, 1)`` (tie-inclusive: every token with a logit >=
    ``thr`` is kept) and ``(N,)`` whether the candidates decide the row (they hold >= top_p of
    the mass and the boundary tie does not reach past the last candidate; always true when
    ``k`` covers the vocabulary). ``lse`` is ``logsumexp(z)`` when the caller already has it.
    """
    v = z.shape[-1]
    k = min(k, v)
    lse = torch.logsumexp(z, dim=-1, keepdim=True) if lse is None else lse
    vals, idx = z.topk(k, dim=-1, sorted=True)
    p_sorted = (vals - lse).exp()
    cum_incl = p_sorted.cumsum(dim=-1)
    above = torch.nn.functional.pad(cum_incl[:, :-1], (1, 0))  # exclusive cumsum, no subtraction
    keep = above < top_p
    keep[:, 0] = True
    thr = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
    done = (cum_incl[:, -1] >= top_p) & (thr[:, 0] > vals[:, -1])
    if k == v:
        done = torch.ones_like(done)
    # A decision within rounding of the edge (some mass ranked above a token ~ top_p) is left to
    # the full sort: its ascending cumsum is the engines' arithmetic, this descending one is not.
    tol = nucleus_edge_tol(z.dtype, v)
    near = ((above - top_p).abs() <= tol).any(-1) | ((cum_incl[:, -1] - top_p).abs() <= tol)
    return vals, idx, thr, done & ~near


def _top_k_top_p(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus on ``z`` ``(N, V)``, without sorting the whole vocabulary when possible.

    Token j is kept iff the mass of the tokens ranked above it is < top_p (so the token that
    crosses the threshold is kept). The ``_CANDIDATES`` largest logits are examined first (32,
    then 512, :func:`nucleus_candidates`); rows they cannot decide fall back to vLLM's full-sort
    computation.

    Ties: top-k keeps every token tied at the k-th logit (vLLM and HF do too). At the nucleus
    boundary the engines keep an arbitrary subset of exactly tied tokens (their sort is not
    stable), so we keep all of them: a token an engine sampled is always inside our support,
    and q differs from the engine's only when such a tie occurs (by the tied tokens' mass).
    """
    n, v = z.shape
    z = top_k_mask(z, top_k)
    thr = torch.empty(n, 1, dtype=z.dtype, device=z.device)
    todo = torch.arange(n, device=z.device)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    for k in _CANDIDATES:  # small candidate sets first; rows they cannot decide move on
        if k >= v or todo.numel() == 0:
            break
        _, _, t, done = nucleus_candidates(z[todo], top_p, k, lse[todo])
        thr[todo[done]] = t[done]
        todo = todo[~done]
    if todo.numel():
        thr[todo] = _nucleus_threshold_full(z[todo], top_p)
    return z.masked_fill(z < thr, float("-inf"))


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """The seed of the noise drawn at optimizer step ``step``, call ``micro`` within it, on process
    ``process``: a pure function of the run's position, so a resumed run draws the noise the
    uninterrupted one drew (no global RNG state). Used by the supervised Gumbel noise and the RL
    rollouts. Processes are 15,485,863 apart so that per-request seeds (``seed + i``, as the vLLM
    backend uses) of different processes never coincide."""
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + process * 15_485_863) % 2**62


def gumbel_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, device, dtype
) -> torch.Tensor:
    """Standard Gumbel noise ``-log(E)``, ``E ~ Exp(1)``, drawn from an explicit generator.

    ``argmax(z + noise)`` is an exact sample from ``softmax(z)`` (the Gumbel-max trick), so a
    generator seeded once yields the same tokens in every generator that draws in the same order.
    """
    e = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    return -e.log()


@dataclass
class GumbelSample:
    """One Gumbel-max draw per row.

    Attributes:
        ids: ``(N,)`` the sampled tokens, ``argmax(z + g)``.
        perturbed: ``(N, V)`` ``z + g``: the processed logits ``z`` plus the Gumbel noise ``g``
            (keeps the graph to the logits; the straight-through estimator softmaxes it).
        logq: ``(N,)`` log q of the sampled tokens under the policy, or None if not requested.
    """

    ids: torch.Tensor
    perturbed: torch.Tensor
    logq: torch.Tensor | None


def gumbel_max_sample(
    logits: torch.Tensor, policy: SamplingPolicy, generator: torch.Generator, want_logq: bool = True
) -> GumbelSample:
    """The one Gumbel-max sampling step of the project (the decoder's generators and the HF
    backend): ``z = policy.process_logits(logits)``, ``ids = argmax(z + g)`` with ``g`` from
    :func:`gumbel_noise` (an exact draw from q), and log q of the drawn ids.

    Args:
        logits: ``(N, V)`` raw logits of the step.
        policy: the sampling policy q.
        generator: where the noise comes from (one ``(N, V)`` draw per call).
        want_logq: also return log q of the drawn ids.
    """
    z = policy.process_logits(logits)  # (N, V) fp32, -inf outside the policy's support
    perturbed = z + gumbel_noise(z.shape, generator, z.device, z.dtype)
    ids = perturbed.argmax(dim=-1)
    logq = F.log_softmax(z, dim=-1).gather(-1, ids[:, None]).squeeze(-1) if want_logq else None
    return GumbelSample(ids=ids, perturbed=perturbed, logq=logq)


def entropy_from_log_probs(log_q: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum q log q`` over the last axis, treating ``-inf`` entries as zero mass."""
    q = log_q.exp()
    return -(q * log_q.masked_fill(q == 0, 0.0)).sum(dim=-1)
