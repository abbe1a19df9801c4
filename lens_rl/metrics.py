"""How well ``Â = encode(decode(A))`` reconstructs ``A``: the one home of that arithmetic.

Per sample (:func:`reconstruct`, rows of ``(N, d)`` activations):

- ``sq_error = ||Â - A||²``;
- ``rel_error = ||Â - A||² / max(||A - train_mean||², 1e-12)``: the per-sample term of the FVE
  (``fve = 1 - rel_error``); 0 is perfect, 1 is the "training mean" predictor;
- ``nmse = mean_d((Â - A)²) / mean(train_var)``: 0 is perfect, ~1 is the "training mean"
  predictor; the supervised loss (its batch mean), the GRPO reward (its negative) and the GRPO
  encoder term (its batch mean);
- ``direction_error = ||u(Â - train_mean) - u(A - train_mean)||² = 2 (1 - cos)`` with
  ``u(x) = x / max(||x||, 1e-6)``: the squared distance of the L2-normalised centred vectors
  (NLA's reward, on deviations from the training mean); 0 is perfect, 2 is orthogonal.

Over a whole split (:class:`FVEAccumulator`, batch by batch, summable across processes):

- ``fve = 1 - sum ||Â - A||² / sum ||A - mean_split(A)||²`` (the split's own mean);
- ``nmse = sum ||Â - A||² / (n d) / mean(train_var)`` (pooled: the mean of the per-sample
  ``nmse``).

``train_mean`` and ``train_var`` are the per-feature mean and variance of A over the lens's
training split (fixed, so no score depends on the batch it is computed in).

:func:`functional_kl` is the other half of a lens's score: how much the original model's next
token changes when ``Â`` replaces ``A`` in its residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lens_rl.models.orig import OrigWrapper
from lens_rl.ops.distributions import kl_from_logits

_EPS = 1e-12  # floor of the FVE denominators (a constant A would divide by zero)
_UNIT_EPS = 1e-6  # floor of the norms in direction_error (a zero vector stays zero)


@dataclass(frozen=True)
class Reconstruction:
    """Per-sample reconstruction scores of ``N`` rows, each ``(N,)`` in the requested dtype.

    Attributes:
        sq_error: ``||Â - A||²``.
        rel_error: ``||Â - A||² / max(||A - train_mean||², 1e-12)``; None without ``train_mean``.
        nmse: ``mean_d((Â - A)²) / mean(train_var)``; None without ``train_var``.
        direction_error: ``2 (1 - cos(Â - train_mean, A - train_mean))``; None without ``train_mean``.
    """

    sq_error: torch.Tensor
    rel_error: torch.Tensor | None
    nmse: torch.Tensor | None
    direction_error: torch.Tensor | None = None


def reconstruct(
    a_hat: torch.Tensor,
    a: torch.Tensor,
    *,
    train_mean: torch.Tensor | None = None,
    train_var: torch.Tensor | float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Reconstruction:
    """Score the reconstruction ``a_hat`` of ``a``, row by row (formulas: the module docstring).

    Differentiable (training losses take ``nmse.mean()``); the scores keep ``a_hat``'s graph.

    Args:
        a_hat: ``(N, d)`` the reconstruction Â (the encoder's output, or what stands for it: the
            resample-ablated ``A_train``, the mean predictor broadcast to ``(N, d)``).
        a: ``(N, d)`` the activations A.
        train_mean: ``(d,)`` per-feature mean of A over the training split (for ``rel_error``).
        train_var: ``(d,)`` per-feature variance of A over the training split, or its mean (a
            float or 0-dim tensor: only the mean is used), for ``nmse``.
        dtype: the dtype every operation runs in: float64 for reported scores, float32 for the
            training losses and rewards.
    """
    a = a.to(dtype)
    diff2 = (a_hat.to(dtype) - a).pow(2)  # (N, d)
    sq_error = diff2.sum(-1)
    rel_error = nmse = direction_error = None
    if train_mean is not None:
        mu = train_mean.to(device=a.device, dtype=dtype)
        dev2 = (a - mu).pow(2).sum(-1)  # ||A - train_mean||²
        rel_error = sq_error / dev2.clamp(min=_EPS)
        u_hat = torch.nn.functional.normalize(a_hat.to(dtype) - mu, dim=-1, eps=_UNIT_EPS)
        u = torch.nn.functional.normalize(a - mu, dim=-1, eps=_UNIT_EPS)
        direction_error = (u_hat - u).pow(2).sum(-1)
    if train_var is not None:
        nmse = diff2.mean(-1) / _var_mean(train_var, a.device, dtype)
    return Reconstruction(sq_error=sq_error, rel_error=rel_error, nmse=nmse, direction_error=direction_error)


def _var_mean(train_var: torch.Tensor | float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``mean(train_var)`` as a 0-dim tensor in ``dtype`` (the NMSE's normaliser)."""
    return torch.as_tensor(train_var, dtype=torch.float64, device=device).to(dtype).mean()


class FVEAccumulator:
    """Dataset-level FVE (and pooled NMSE) of one predictor, accumulated batch by batch in float64.

    ``fve() = 1 - SSE / SST`` with ``SSE = sum ||Â - A||²`` (from :func:`reconstruct`) and
    ``SST = sum ||A - mean_split(A)||² = sum_d (sum A² - (sum A)² / n)`` (floored at 1e-12), so
    batches may come in any order and be split over processes (:meth:`reduce_` sums the parts).

    Args:
        d: the activations' width.
        device: where the sums live (the batches' device).
    """

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        zeros = {"dtype": torch.float64, "device": device}
        self.sse = torch.zeros((), **zeros)  # sum ||Â - A||²
        self.n = torch.zeros((), **zeros)  # rows seen
        self.sum_a = torch.zeros(d, **zeros)  # (d,) sum A
        self.sum_a2 = torch.zeros(d, **zeros)  # (d,) sum A²

    def update(self, a_hat: torch.Tensor, a: torch.Tensor) -> None:
        """Add a batch: ``a_hat`` ``(N, d)`` (or broadcastable to it) reconstructs ``a`` ``(N, d)``."""
        a = a.double()
        self.sse += reconstruct(a_hat.expand_as(a), a).sq_error.sum()
        self.sum_a += a.sum(0)
        self.sum_a2 += (a * a).sum(0)
        self.n += a.shape[0]

    def reduce_(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every sum by ``reduce(sum)`` (e.g. the sum over processes), in place."""
        for name in ("sse", "n", "sum_a", "sum_a2"):
            setattr(self, name, reduce(getattr(self, name)))

    def sst(self) -> torch.Tensor:
        """``sum ||A - mean_split(A)||²`` over the rows seen (0-dim, float64, floored at 1e-12)."""
        return (self.sum_a2 - self.sum_a**2 / self.n).sum().clamp(min=_EPS)

    def fve(self) -> torch.Tensor:
        """``1 - SSE / SST`` (0-dim, float64)."""
        return 1 - self.sse / self.sst()

    def nmse(self, train_var: torch.Tensor | float) -> torch.Tensor:
        """``SSE / (n d) / mean(train_var)`` (0-dim, float64): the mean of the per-sample ``nmse``."""
        return self.sse / (self.n * self.sum_a.numel()) / _var_mean(train_var, self.sse.device, torch.float64)


def functional_kl(
    orig: OrigWrapper, batch: dict[str, torch.Tensor], layer: int, new_activation: torch.Tensor
):
    """KL(P(next | A) || P(next | new)) at the position of A, per row (context cut after P)."""
    pos = batch["token_pos"]
    ids = batch["input_ids"][:, : int(pos.max()) + 1]
    rows = torch.arange(ids.shape[0], device=ids.device)
    with torch.no_grad():
        clean = orig.logits(ids)[rows, pos]
    patched = orig.next_token_logits_with_replacement(ids, layer, pos, new_activation)
    return kl_from_logits(clean, patched)
