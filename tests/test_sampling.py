"""The shared sampling policy against HF's warpers and vLLM's truncation code."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lens_rl.ops.sampling import SamplingPolicy, entropy_from_log_probs, gumbel_noise

POLICIES = [
    SamplingPolicy(),
    SamplingPolicy(temperature=0.7),
    SamplingPolicy(top_p=0.9),
    SamplingPolicy(top_p=0.5, temperature=0.7),
    SamplingPolicy(top_k=20),
    SamplingPolicy(top_k=20, top_p=0.8, temperature=1.3),
]


def _logits(seed: int, b: int = 16, v: int = 300, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, generator=g) * 2
    if ties:  # coarse rounding creates many exact ties, including at the top-k / top-p boundary
        x = (x * 2).round() / 2
    return x


def _hf(policy: SamplingPolicy, logits: torch.Tensor) -> torch.Tensor:
    z = TemperatureLogitsWarper(policy.temperature)(None, logits.clone())
    if policy.top_k:
        z = TopKLogitsWarper(policy.top_k)(None, z)
    if policy.top_p < 1:
        z = TopPLogitsWarper(policy.top_p)(None, z)
    return z


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_support_matches_hf_warpers(policy, ties):
    """Without exact ties: the same kept set as HF's warpers, kept logits equal to logits / T.
    With ties (coarsely rounded logits): HF keeps an arbitrary subset of the tokens tied at the
    nucleus boundary (its sort is not stable); we keep all of them, a superset."""
    logits = _logits(0, ties=ties)
    ours = policy.process_logits(logits)
    hf = _hf(policy, logits)
    kept, kept_hf = ~torch.isinf(ours), ~torch.isinf(hf)
    if ties:
        assert bool((kept | ~kept_hf).all())
        boundary = ours.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
        extra = kept & ~kept_hf
        assert torch.equal(extra, extra & (ours == boundary))  # every extra token is a boundary tie
    else:
        assert torch.equal(kept, kept_hf)
    torch.testing.assert_close(ours[kept], logits[kept] / policy.temperature, rtol=0, atol=0)


@pytest.mark.vllm
@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_support_matches_vllm_sampler(policy, ties, scale):
    """vLLM's own truncation function (the one its CPU sampler calls): identical kept sets on
    untied logits (flat and peaked distributions, so both our candidate path and our full-sort
    fallback run); a superset differing only in boundary ties otherwise."""
    topk_topp = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    logits = _logits(1, v=3000, ties=ties) * scale
    z = logits / policy.temperature
    b = z.shape[0]
    k = torch.full((b,), policy.top_k, dtype=torch.long) if policy.top_k else None
    p = torch.full((b,), policy.top_p) if policy.top_p < 1 else None
    ref = ~torch.isinf(topk_topp.apply_top_k_top_p_pytorch(z.clone(), k, p, allow_cpu_sync=True))
    kept = ~torch.isinf(policy.process_logits(logits))
    if ties:
        assert bool((kept | ~ref).all())
    else:
        assert torch.equal(kept, ref)


def test_nucleus_keeps_every_token_tied_at_the_boundary():
    # probs 0.3, 0.4, 0.3 with top_p = 0.5: one 0.3 is kept (mass above it, 0.4, is < 0.5); the
    # other 0.3 is tied with it and kept too (the engines keep an arbitrary one of the two).
    logits = torch.tensor([[0.3, 0.4, 0.3]]).log()
    assert (~torch.isinf(SamplingPolicy(top_p=0.5).process_logits(logits))).tolist() == [[True, True, True]]


def test_nucleus_keeps_the_crossing_token():
    # probs 0.5, 0.3, 0.2: top_p = 0.6 keeps the first two (mass above the second is 0.5 < 0.6).
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = ~torch.isinf(SamplingPolicy(top_p=0.6).process_logits(logits))
    assert kept.tolist() == [[True, True, False]]
    # top_p = 0.5: mass above the second token is exactly 0.5, not < 0.5, so only the top stays.
    kept = ~torch.isinf(SamplingPolicy(top_p=0.5).process_logits(logits))
    assert kept.tolist() == [[True, False, False]]


def test_log_q_normalised_on_support():
    logits = _logits(2)
    for policy in POLICIES:
        log_q = policy.log_probs(logits)
        torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(logits.shape[0]), rtol=0, atol=1e-6)


def test_entropy_ignores_dropped_tokens():
    log_q = torch.tensor([[0.5, 0.5, 0.0]]).log()
    torch.testing.assert_close(entropy_from_log_probs(log_q), torch.tensor([2 * 0.5 * 0.6931471805599453]))


def test_gumbel_noise_is_reproducible_and_gumbel():
    a = gumbel_noise((4, 1000), torch.Generator().manual_seed(5), "cpu", torch.float32)
    b = gumbel_noise((4, 1000), torch.Generator().manual_seed(5), "cpu", torch.float32)
    assert torch.equal(a, b)
    # Gumbel(0, 1) has mean Euler-Mascheroni 0.5772 and sd pi/sqrt(6) = 1.2825; 4000 draws give
    # a standard error of 0.0203 on the mean; 5 standard errors is 0.10.
    assert abs(a.mean().item() - 0.5772) < 0.10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
    ],
)
def test_policy_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingPolicy(**kwargs)
