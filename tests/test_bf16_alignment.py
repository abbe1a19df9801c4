"""Alignment in bf16 weights on CPU (marker `alignment`): the three generators and the
teacher-forced scorer on every family, single- and multi-layer patching.

Bounds come from measurement (torch 2.13 CPU, 10 families x 2 modes x 2 seeds x 3 rows, T = 20,
policy temperature 1 / top_p 0.95 for the scored rollouts) with ~3x headroom:

- hard tokens of generate_soft / generate_soft_kv_cached / generate_soft_kv_cached_nondiff:
  identical (measured: identical in every row);
- logits generate_soft vs generate_soft_kv_cached: max abs <= 0.03 (measured max 8.3e-3,
  gemma3_text; gemma2, run with eager attention, 0) -- bf16 has 8 bits of mantissa, and the
  cached and recomputed passes round in different orders;
- fwd_tokens log q vs the nondiff generator's log q of the sampled tokens (the trainer-vs-sampler
  mismatch of the HF backend): max abs <= 0.02 nats (measured max 5.8e-3, llama multi-layer;
  mean <= 1.4e-3), no sampled token outside the trainer's support.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lens_rl.models import Decoder, DecoderConfig
from lens_rl.ops.sampling import SamplingPolicy

pytestmark = pytest.mark.alignment

LOGIT_ATOL = 0.03
LOGQ_ATOL = 0.02


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_bf16_generators_and_scorer_agree(arch, mode, tiny_model_factory, tokenizer, record_max):
    base = copy.deepcopy(tiny_model_factory(arch, n_layers=3)).to(torch.bfloat16)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig(patch_all_layers=mode == "multi"))
    policy = SamplingPolicy(temperature=1.0, top_p=0.95)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(100 + seed)
        a = (4 * torch.randn(3, base.config.hidden_size, generator=g)).to(torch.bfloat16)
        soft = dec.generate_soft(a, 20, generator=torch.Generator().manual_seed(seed))
        kv = dec.generate_soft_kv_cached(a, 20, generator=torch.Generator().manual_seed(seed))
        nd = dec.generate_soft_kv_cached_nondiff(a, 20, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(soft.hard_token_ids, kv.hard_token_ids)
        assert torch.equal(soft.hard_token_ids, nd.hard_token_ids)
        d_logits = float((soft.raw_lm_logits - kv.raw_lm_logits).abs().max())
        assert record_max(f"bf16 logits soft vs kv [{arch}]", d_logits) <= LOGIT_ATOL
        sampled = dec.generate_soft_kv_cached_nondiff(
            a, 20, generator=torch.Generator().manual_seed(seed), policy=policy, return_logits=False
        )
        with torch.no_grad():
            scored = dec.fwd_tokens(a, sampled.hard_token_ids, policy=policy)
        diff = scored.logprobs.float() - sampled.logprobs.float()
        assert bool(torch.isfinite(diff).all()), "a sampled token fell outside the trainer's support"
        assert record_max(f"bf16 fwd_tokens vs sampler log q [{arch}]", float(diff.abs().max())) <= LOGQ_ATOL
