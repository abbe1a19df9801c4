"""FSDP2 (``fully_shard``) on the lens modules, 2 CPU processes over gloo (issue #27).

Each case shards a tiny lens with :func:`lens_rl.models.sharding.fully_shard_lens` and compares
it with an unsharded copy computing the same function (the mean of the per-rank losses, each
with its rank's noise): the loss; every gradient (FSDP2 averages them over ranks; torch issue
#162338 reported gloo summing instead); the parameters after one SGD step of rate 1 (the update
is the gradient, so a stale or misplaced shard would be off by O(gradient)); the full state dict
gathered from the shards (``full_state_dict``); and the rollouts' tokens and log q.

Measured (this CPU, 2026-12-06, 1 and 2 threads): SFT gradients and post-step parameters within
1.9e-7 of the largest gradient entry; the GRPO scorer and the rollouts bit-identical. The
bounds (1e-5 relative to the largest gradient entry) are float32 rounding of a reduce-scatter's
summation order with a wide margin, while a sum instead of a mean (factor 2), a missing rank's
share or a stale shard would be off by O(1) of it.

Each worker waits at a barrier before destroying its process group: without it, 3 of 20 rollout
runs here aborted ("terminate called without an active exception", SIGABRT: one rank's gloo
teardown racing the other's collectives); with it, 0 of 50 runs (rollouts, SFT; both families).
"""

from __future__ import annotations

import pytest

from lens_rl.testing.fsdp2_check import fsdp2_vs_unsharded


@pytest.mark.parametrize("case", ["sft", "grpo"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"], ids=["untied-llama", "tied-gemma3"])
def test_fully_shard_matches_unsharded(arch, case):
    r = fsdp2_vs_unsharded(arch, case, trainable_base=True)
    assert r["tied"] == (arch == "gemma3_text")
    assert r["grads_compared"] == r["grads_in_reference"] > 40  # bases, projections, prompts
    assert r["loss_err"] <= 1e-6
    assert r["grad_rel_err"] <= 1e-5
    assert r["step_rel_err"] <= 1e-5
    assert r["state_dict_equal"] is True


def test_fully_shard_with_frozen_bases():
    """Frozen bases (shared by decoder and encoder): only projections and prompts train."""
    r = fsdp2_vs_unsharded("llama", "sft", trainable_base=False)
    assert 0 < r["grads_compared"] == r["grads_in_reference"] < 10
    assert r["grad_rel_err"] <= 1e-5 and r["step_rel_err"] <= 1e-5 and r["state_dict_equal"] is True


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"], ids=["untied-llama", "tied-gemma3"])
def test_rollouts_through_the_sharded_module(arch):
    """The GRPO rollouts' HF generator (no grad, KV cache expanded over the group), called as
    ``module(fn, ...)`` on the sharded lens, samples the same tokens with the same log q as the
    unsharded lens (same seed): the root unit gathers the embedding table, LM head and
    projections, each block its own weights."""
    r = fsdp2_vs_unsharded(arch, "rollout")
    assert r["tokens_equal"] is True
    assert r["logq_err"] <= 1e-5  # float32 rounding allowed; measured 0.0 (bit-identical) on both
