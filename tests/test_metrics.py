"""lens_rl.metrics against hand-written formulas (float64: exact up to summation order)."""

from __future__ import annotations

import pytest
import torch

from lens_rl.metrics import FVEAccumulator, reconstruct

N, D = 7, 5


def _data(seed: int = 0, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, D, generator=g, dtype=torch.float64) * 3 + 1
    return {
        "a": a,
        "a_hat": a + torch.randn(n, D, generator=g, dtype=torch.float64),
        "mean": torch.randn(D, generator=g, dtype=torch.float64),
        "var": torch.rand(D, generator=g, dtype=torch.float64) + 0.5,
    }


def test_reconstruct_matches_the_formulas():
    x = _data()
    a, a_hat, mean, var = x["a"], x["a_hat"], x["mean"], x["var"]
    rec = reconstruct(a_hat, a, train_mean=mean, train_var=var)
    sq, rel, nmse = [], [], []
    for i in range(N):
        s = sum((float(a_hat[i, j]) - float(a[i, j])) ** 2 for j in range(D))
        dev = sum((float(a[i, j]) - float(mean[j])) ** 2 for j in range(D))
        sq.append(s)
        rel.append(s / dev)
        nmse.append(s / D / (sum(float(v) for v in var) / D))
    kw = {"rtol": 1e-12, "atol": 0.0}
    assert rec.sq_error.dtype == rec.rel_error.dtype == rec.nmse.dtype == torch.float64
    assert rec.sq_error.shape == rec.rel_error.shape == rec.nmse.shape == (N,)
    torch.testing.assert_close(rec.sq_error, torch.tensor(sq, dtype=torch.float64), **kw)
    torch.testing.assert_close(rec.rel_error, torch.tensor(rel, dtype=torch.float64), **kw)
    torch.testing.assert_close(rec.nmse, torch.tensor(nmse, dtype=torch.float64), **kw)
    # only the mean of train_var matters: a float gives the same nmse
    torch.testing.assert_close(reconstruct(a_hat, a, train_var=float(var.mean())).nmse, rec.nmse, **kw)


def test_reconstruct_options_dtype_and_gradient():
    x = _data()
    bare = reconstruct(x["a_hat"], x["a"])
    assert bare.rel_error is None and bare.nmse is None
    # float32 arithmetic (the training losses and the reward): the reward's former expression, bit for bit
    a32, a_hat32 = x["a"].float(), x["a_hat"].float().requires_grad_()
    var_mean = float(x["var"].mean())
    rec = reconstruct(a_hat32, a32, train_var=var_mean, dtype=torch.float32)
    assert rec.nmse.dtype == torch.float32
    assert torch.equal(rec.nmse, (a_hat32 - a32).pow(2).mean(-1) / var_mean)
    # differentiable: d nmse.mean() / d a_hat = 2 (Â - A) / (N D mean(var))
    (grad,) = torch.autograd.grad(rec.nmse.mean(), a_hat32)
    torch.testing.assert_close(grad, 2 * (a_hat32 - a32).detach() / (N * D * var_mean), rtol=1e-5, atol=0)
    # a constant A (||A - mean||² = 0) does not divide by zero
    flat = torch.zeros(2, D, dtype=torch.float64)
    assert torch.isfinite(reconstruct(flat + 1, flat, train_mean=torch.zeros(D)).rel_error).all()


def test_accumulator_equals_one_shot_fve_over_concatenated_batches():
    batches = [_data(seed, n) for seed, n in ((1, 3), (2, 1), (3, 6))]
    a = torch.cat([b["a"] for b in batches])
    a_hat = torch.cat([b["a_hat"] for b in batches])
    var = batches[0]["var"]
    acc = FVEAccumulator(D)
    for b in batches:
        acc.update(b["a_hat"], b["a"])
    fve = 1 - (a_hat - a).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    nmse = (a_hat - a).pow(2).mean() / var.mean()
    torch.testing.assert_close(acc.fve(), fve, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.nmse(var), nmse, rtol=1e-12, atol=0.0)
    # the pooled nmse is the mean of the per-sample one
    torch.testing.assert_close(
        acc.nmse(var), reconstruct(a_hat, a, train_var=var).nmse.mean(), rtol=1e-12, atol=0
    )
    # a broadcast predictor (the training mean) and sums split over two "processes"
    mean = batches[0]["mean"]
    parts = [FVEAccumulator(D), FVEAccumulator(D)]
    for i, b in enumerate(batches):
        parts[i % 2].update(mean, b["a"])
    other = iter([parts[1].sse, parts[1].n, parts[1].sum_a, parts[1].sum_a2])  # reduce_'s order
    parts[0].reduce_(lambda t: t + next(other))  # the sum over the two processes
    base = 1 - (mean - a).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    torch.testing.assert_close(parts[0].fve(), base, rtol=1e-12, atol=1e-12)


def test_fve_of_the_perfect_and_the_mean_predictor():
    x = _data(n=50)
    acc, mean_acc = FVEAccumulator(D), FVEAccumulator(D)
    acc.update(x["a"], x["a"])
    mean_acc.update(x["a"].mean(0), x["a"])
    assert float(acc.fve()) == 1.0
    assert float(mean_acc.fve()) == pytest.approx(0.0, abs=1e-12)
