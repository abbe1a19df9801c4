"""Diagnostics and importance-weight helpers against direct formulas on hand-made distributions."""

from __future__ import annotations

import math

import pytest
import torch

from lens_rl.ops.diagnostics import score_tokens
from lens_rl.ops.importance import effective_sample_size, importance_weights, mismatch_stats, token_log_ratio
from lens_rl.ops.sampling import SamplingPolicy


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().view(1, 1, -1)


def _direct(q: list[float], kept_full_mass: float, kept_logits: list[float]):
    q = torch.tensor(q, dtype=torch.float64)
    nz = q[q > 0]
    h = float(-(nz * nz.log()).sum())
    coll = float((nz * nz).sum())
    a = torch.tensor(kept_logits, dtype=torch.float64)
    mean = float((nz * a).sum())
    var = float((nz * a * a).sum() - mean**2)
    s = kept_full_mass
    two = -(s * math.log(s) + ((1 - s) * math.log(1 - s) if s < 1 else 0.0))
    return h, coll, mean, var, two


@pytest.mark.parametrize(
    ("probs", "policy", "q", "kept_mass", "kept_logits", "margin"),
    [
        # nucleus 0.6 keeps 0.5 and 0.3 (mass above 0.3 is 0.5 < 0.6)
        (
            [0.5, 0.3, 0.2],
            SamplingPolicy(top_p=0.6),
            [0.625, 0.375, 0.0],
            0.8,
            [math.log(0.5), math.log(0.3)],
            math.log(0.5) - math.log(0.3),
        ),
        # one-token nucleus: mass above the second token (0.5) is not < 0.5
        ([0.5, 0.3, 0.2], SamplingPolicy(top_p=0.5), [1.0, 0.0, 0.0], 0.5, [math.log(0.5)], 0.0),
        # ties inside the support: both tied tokens kept, each q = 0.3 / 0.6... (top_k=3 keeps all 3)
        (
            [0.4, 0.3, 0.3],
            SamplingPolicy(top_k=3),
            [0.4, 0.3, 0.3],
            1.0,
            [math.log(0.4), math.log(0.3), math.log(0.3)],
            math.log(0.4) - math.log(0.3),
        ),
        # a tie at the top-k boundary: top_k=2 keeps BOTH tokens tied at the 2nd logit (vLLM and HF rule)
        (
            [0.4, 0.3, 0.3],
            SamplingPolicy(top_k=2),
            [0.4, 0.3, 0.3],
            1.0,
            [math.log(0.4), math.log(0.3), math.log(0.3)],
            math.log(0.4) - math.log(0.3),
        ),
    ],
    ids=["nucleus", "one_token", "ties_kept", "tie_at_topk_boundary"],
)
def test_step_diagnostics_equal_direct_formulas(probs, policy, q, kept_mass, kept_logits, margin):
    logits = _logits(probs)
    tokens = logits.argmax(-1)  # the step diagnostics are functions of the logits only
    diag = score_tokens(logits, tokens, policy, fp64=True, diagnostics=True, eos_token_id=2).diagnostics.step
    h, coll, mean, var, two = _direct(q, kept_mass, kept_logits)
    close = dict(rel_tol=0, abs_tol=1e-12)
    assert math.isclose(float(diag.rb_entropy), h, **close)
    assert math.isclose(float(diag.head_mass), kept_mass, **close)
    assert math.isclose(float(diag.tail_mass), 1 - kept_mass, **close)
    assert math.isclose(float(diag.two_point_entropy), two, **close)
    assert math.isclose(float(diag.top1_prob), max(q), **close)
    assert math.isclose(float(diag.margin), margin, **close)
    assert math.isclose(float(diag.collision), coll, **close)
    assert math.isclose(float(diag.renyi2), -math.log(coll), **close)
    assert math.isclose(float(diag.eff_support), math.exp(h), **close)
    assert math.isclose(float(diag.logit_mean), mean, **close)
    assert math.isclose(float(diag.logit_var), var, abs_tol=1e-12)
    assert math.isclose(float(diag.eos_prob), q[2], **close)


def test_temperature_enters_every_quantity():
    probs = [0.5, 0.3, 0.2]
    logits = _logits(probs)
    t = 0.5
    pol = SamplingPolicy(temperature=t)
    diag = score_tokens(logits, logits.argmax(-1), pol, fp64=True, diagnostics=True).diagnostics.step
    a = [math.log(p) / t for p in probs]
    z = sum(math.exp(x) for x in a)
    q = [math.exp(x) / z for x in a]
    assert math.isclose(float(diag.rb_entropy), -sum(x * math.log(x) for x in q), abs_tol=1e-12)
    assert math.isclose(float(diag.margin), a[0] - a[1], abs_tol=1e-12)


def test_sequence_aggregates_and_windows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 20, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    tokens = torch.randint(0, 7, (2, 20), generator=g)
    pol = SamplingPolicy(top_p=0.9)
    sc = score_tokens(logits, tokens, pol, fp64=True, diagnostics=True, mask=mask, early_window=16)
    pack = sc.diagnostics
    h = pack.step.rb_entropy
    torch.testing.assert_close(h, sc.rb_entropy * mask)
    assert pack.seq.length.tolist() == [20, 12]
    assert math.isclose(float(pack.seq.rb_entropy_sum[1]), float(h[1, :12].sum()), abs_tol=1e-12)
    assert math.isclose(float(pack.seq.early_rb_entropy_mean[0]), float(h[0, :16].mean()), abs_tol=1e-12)
    assert math.isclose(float(pack.seq.late_rb_entropy_mean[0]), float(h[0, 16:].mean()), abs_tol=1e-12)
    # T <= window: late mean falls back to the early mean
    assert math.isclose(float(pack.seq.late_rb_entropy_mean[1]), float(pack.seq.early_rb_entropy_mean[1]))
    assert math.isclose(float(pack.seq.rb_entropy_max[1]), float(h[1, :12].max()), abs_tol=1e-12)
    assert math.isclose(float(pack.seq.rb_entropy_min[1]), float(h[1, :12].min()), abs_tol=1e-12)
    assert math.isclose(float(pack.seq.surprisal_sum[0]), float(-sc.logp[0].sum()), abs_tol=1e-12)


def test_importance_modes_and_ess():
    D = torch.float64
    num = torch.tensor([[0.0, 0.5, -2.0], [1.5, 0.0, 0.0]])
    den = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    lr = token_log_ratio(num, den, mask)
    w_tt = importance_weights(lr, "token_truncate", clip_max=2.0, mask=mask)
    torch.testing.assert_close(
        w_tt, torch.tensor([[1.0, math.exp(0.5), math.exp(-2.0)], [2.0, 1.0, 0.0]], dtype=D)
    )
    w_tm = importance_weights(lr, "token_mask", clip_max=2.0, clip_min=0.2, mask=mask)
    torch.testing.assert_close(w_tm, torch.tensor([[1.0, math.exp(0.5), 0.0], [0.0, 1.0, 0.0]], dtype=D))
    w_sm = importance_weights(lr, "sequence_mask", clip_max=3.0, mask=mask)
    # sequence 0: exp(-1.5) kept; sequence 1: exp(1.5) = 4.48 > 3 masked
    torch.testing.assert_close(
        w_sm, torch.tensor([[math.exp(-1.5)] * 3, [0.0, 0.0, 0.0]], dtype=D), atol=1e-12, rtol=0
    )
    w_st = importance_weights(lr, "sequence_truncate", clip_max=3.0, mask=mask)
    torch.testing.assert_close(w_st[1, :2], torch.tensor([3.0, 3.0], dtype=D))
    assert float(effective_sample_size(torch.zeros(10))) == pytest.approx(10.0)
    lw = torch.tensor([0.0, math.log(3.0)])
    assert float(effective_sample_size(lw)) == pytest.approx(16 / 10)
    # a token outside the recomputed support (-inf) is counted and gets weight 0
    lr2 = token_log_ratio(
        torch.tensor([[float("-inf"), 0.0]]), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    )
    stats = mismatch_stats(lr2, torch.ones(1, 2, dtype=torch.bool))
    assert stats["outside_support"] == 1
    assert importance_weights(lr2, "token_truncate", clip_min=0.1)[0, 0] == 0
