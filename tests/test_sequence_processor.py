"""SequenceProcessor: sampler/scorer agreement, on-policy IS ratios, sampling frequencies,
no-grad vs with-grad, parameter overrides, lens mode."""

from __future__ import annotations

import itertools

import pytest
import torch

from lens_rl.models import Decoder, DecoderConfig
from lens_rl.ops.importance import importance_weights, mismatch_stats, token_log_ratio
from lens_rl.processing import SamplingConfig, SequenceProcessor

GRID = list(itertools.product([1.0, 0.9, 0.5], [1.0, 0.7], [0, 20]))  # top_p, temperature, top_k
HF_TOL = 1e-5  # fp32; measured max 9.5e-7


@pytest.mark.alignment
@pytest.mark.parametrize(("top_p", "temperature", "top_k"), GRID)
def test_hf_sampler_logq_equals_teacher_forced(
    top_p, temperature, top_k, tiny_model_factory, tokenizer, record_max
):
    model = tiny_model_factory("qwen2")
    cfg = SamplingConfig(
        top_p=top_p, temperature=temperature, top_k=top_k, max_new_tokens=16, num_return_sequences=4, seed=3
    )
    sp = SequenceProcessor(model, tokenizer, cfg)
    seqs, res, _ = sp.generate_with_logprobs(dataset_name="pydoc_openings", num_prompts=4)
    m = seqs.gen_mask
    diff = (res.token_logqs - seqs.sampler_logprobs)[m].abs().max().item()
    record_max("HF sampler log q vs teacher-forced log q", diff)
    assert diff <= HF_TOL
    assert torch.isfinite(res.token_logqs[m]).all()
    if top_p == 1.0 and top_k == 0:  # no truncation: log q = log softmax(logits / T)
        assert temperature != 1.0 or torch.allclose(res.token_logqs[m], res.token_logps[m], atol=1e-6)


def test_on_policy_ratio_top_p_08(tiny_model_factory, tokenizer, record_max):
    """Our ratio (log q vs the sampler) is 1; TRL's full-softmax ratio averages the kept mass."""
    model = tiny_model_factory("llama")
    cfg = SamplingConfig(top_p=0.8, temperature=1.0, max_new_tokens=24, num_return_sequences=4, seed=0)
    sp = SequenceProcessor(model, tokenizer, cfg)
    seqs, res, diag = sp.generate_with_logprobs(dataset_name="pydoc_openings", num_prompts=6)
    m = seqs.gen_mask
    ours = token_log_ratio(res.token_logqs, seqs.sampler_logprobs, m)
    trl = token_log_ratio(res.token_logps, seqs.sampler_logprobs, m)  # full softmax at T = 1
    ours_ratio = ours[m].exp()
    trl_ratio = trl[m].exp()
    kept_mass = diag.diagnostics.step.head_mass.view_as(m)[m]
    print(
        f"top_p=0.8: our ratio mean {ours_ratio.mean():.6f}, full-softmax ratio mean {trl_ratio.mean():.4f}, "
        f"mean kept mass {kept_mass.mean():.4f}"
    )
    record_max("on-policy |log ratio| (ours, top_p=0.8)", ours[m].abs().max())
    assert ours[m].abs().max() <= 1e-5
    assert trl_ratio.mean() < 0.95
    # Per token, the full-softmax ratio IS the kept mass S_t (q = p / S_t on the nucleus).
    torch.testing.assert_close(trl_ratio, kept_mass.double(), rtol=0, atol=1e-5)
    w = importance_weights(ours, "sequence_mask", clip_max=3.0, mask=m)
    stats = mismatch_stats(ours, m, w, importance_weights(ours, "sequence_mask", clip_max=None, mask=m))
    assert stats["clipped_or_masked_fraction"] == 0
    assert stats["outside_support"] == 0 and stats["seq_ess_fraction"] > 0.999


def test_sampling_frequencies_match_q_and_rb_entropy(tmp_path, tokenizer):
    """Vocabulary of 8: 40,000 first-token draws match q (chi-square, p > 1e-3), and the RB
    entropy equals the Monte-Carlo mean of -log q within 4 standard errors."""
    from scipy.stats import chisquare

    from lens_rl.testing.tiny_models import build_tiny_model

    model = build_tiny_model("llama", tmp_path / "v8", 8, seed=1, eos_token_id=0)
    with torch.no_grad():  # sharpen the random logits so truncation bites
        model.lm_head.weight.mul_(5.0)  # q: 6 of 8 tokens kept, probabilities 0.08-0.35
    cfg = SamplingConfig(
        top_p=0.9,
        temperature=0.7,
        max_new_tokens=1,
        num_return_sequences=40_000,
        gen_batch_size=40_000,
        tf_batch_size=40_000,
        seed=11,
    )

    class Tok:  # token-id prompts: the 8-token model needs no text tokenizer
        eos_token_id = 0
        pad_token_id = 0
        padding_side = "left"

        def __call__(self, prompts, **kw):
            ids = torch.tensor([[3, 5, 2]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def decode(self, ids):
            return " ".join(map(str, ids.tolist()))

    sp = SequenceProcessor(model, Tok(), cfg)
    seqs, res, _ = sp.generate_with_logprobs(prompts=["x"], G=40_000)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 5, 2]])).logits[0, -1]
    q = sp.policy.log_probs(logits).exp()
    support = q > 0
    assert 1 < int(support.sum()) < 8  # truncation is active and not degenerate
    counts = torch.bincount(seqs.sequences[0, :, -1], minlength=8).double()
    assert counts[~support].sum() == 0
    expected = q[support].double() / q[support].double().sum() * counts.sum()
    p_value = chisquare(counts[support].numpy(), expected.numpy()).pvalue
    assert p_value > 1e-3, p_value
    neg_logq = -res.token_logqs[0, :, 0].double()
    rb = res.rb_entropies[0, 0, 0].double()
    se = neg_logq.std() / neg_logq.numel() ** 0.5
    assert abs(neg_logq.mean() - rb) < 4 * se, (float(neg_logq.mean()), float(rb), float(se))


def test_grad_and_nograd_agree_and_overrides(tmp_path, tokenizer):
    from lens_rl.testing.tiny_models import build_tiny_model

    # A private model: session-shared ones may have been frozen by an OrigWrapper elsewhere.
    model = build_tiny_model("gpt2", tmp_path / "gpt2", len(tokenizer), seed=0)
    sp = SequenceProcessor(
        model,
        tokenizer,
        SamplingConfig(top_p=0.9, max_new_tokens=10, num_return_sequences=2, rb_requires_grad=True),
    )
    seqs = sp.generate_batched(sp.sample_prompts("pydoc_openings", "train", 3, seed=0))
    nograd = sp.teacher_force_logprobs(seqs)
    grad = sp.teacher_force_logprobs(seqs, with_grad=True)
    assert grad.token_logps.requires_grad and grad.rb_entropies_torch is not None
    torch.testing.assert_close(grad.token_logps.detach(), nograd.token_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad.token_logqs.detach(), nograd.token_logqs, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    zero = sp.teacher_force_logprobs(seqs, params_override=sp.build_params_override(v, 0.0))
    assert torch.equal(zero.token_logps, nograd.token_logps)  # eta = 0 is the live model, bit for bit
    moved = sp.teacher_force_logprobs_multi_eta(seqs, v, [1e-3])
    assert (moved[0].token_logps - nograd.token_logps).abs().max() > 1e-5
    # Central difference of the fp64 override path equals the autograd directional derivative.
    sp64 = SequenceProcessor(
        model, tokenizer, sp.config, precision={"func_override_dtype": "float64", "entropy_fp64": True}
    )
    eta = 1e-4
    plus, minus = sp64.teacher_force_logprobs_multi_eta(seqs, v, [eta, -eta])
    fd = (plus.sequence_logps.sum() - minus.sequence_logps.sum()) / (2 * eta)
    model.zero_grad()
    grad.sequence_logps.sum().backward()
    jvp = sum((p.grad.double() * v[n].double()).sum() for n, p in model.named_parameters())
    model.zero_grad()
    assert abs(float(fd) - float(jvp)) <= 1e-3 * abs(float(jvp)), (float(fd), float(jvp))
    # With grad through an override theta + eta v (eta a tensor): d/d eta = the same derivative;
    # the forward-mode tangents of log q (teacher_force_jvp) sum to d/d eta of sum log q.
    eta_t = torch.tensor(0.0, requires_grad=True)
    through = sp.teacher_force_logprobs(
        seqs, with_grad=True, params_override=sp.build_params_override(v, eta_t)
    )
    (d_eta,) = torch.autograd.grad(through.sequence_logps.sum(), eta_t)
    assert abs(float(d_eta) - float(jvp)) <= 1e-4 * abs(float(jvp)), (float(d_eta), float(jvp))
    tang = sp.teacher_force_jvp(seqs, v)
    res_q = sp.teacher_force_logprobs(
        seqs, with_grad=True, params_override=sp.build_params_override(v, eta_t)
    )
    (d_eta_q,) = torch.autograd.grad(res_q.sequence_logqs.sum(), eta_t)
    assert abs(float(tang.d_token_logqs.sum()) - float(d_eta_q)) <= 1e-4 * abs(float(d_eta_q))


def test_fp64_scores_stay_fp64(tiny_model_factory, tokenizer):
    model = tiny_model_factory("llama")
    sp = SequenceProcessor(
        model,
        tokenizer,
        SamplingConfig(max_new_tokens=6, num_return_sequences=2),
        precision={"entropy_fp64": True},
    )
    seqs = sp.generate_batched(["The with statement"])
    res = sp.teacher_force_logprobs(seqs)
    assert res.token_logps.dtype == torch.float64 and res.sequence_logps.dtype == torch.float64
    fp32 = SequenceProcessor(model, tokenizer, sp.config).teacher_force_logprobs(seqs)
    torch.testing.assert_close(res.token_logps.float(), fp32.token_logps, rtol=0, atol=1e-5)


def test_eos_is_generated_and_scored(tiny_model_factory, tokenizer):
    """A row that samples EOS stops there; the EOS token is inside gen_lens and scored."""
    model = tiny_model_factory("llama")  # EOS has probability ~1/512 per step: 64 x 40 draws
    sp = SequenceProcessor(
        model, tokenizer, SamplingConfig(max_new_tokens=40, num_return_sequences=64, seed=2)
    )
    seqs, res, _ = sp.generate_with_logprobs(prompts=["A class definition"])
    toks = seqs.gen_tokens()[0]
    lens = seqs.gen_lens[0]
    stopped = [i for i in range(64) if lens[i] < 40]
    assert stopped, "expected some rows to stop at EOS"
    for i in stopped:
        assert toks[i, lens[i] - 1] == tokenizer.eos_token_id
        assert res.token_logqs[0, i, lens[i] - 1] < 0 and res.token_logqs[0, i, lens[i] :].eq(0).all()
    diff = (res.token_logqs - seqs.sampler_logprobs)[seqs.gen_mask].abs().max()
    assert diff <= HF_TOL


@pytest.mark.alignment
def test_lens_mode_scores_through_fwd_tokens(tiny_model_factory, tokenizer, record_max):
    base = tiny_model_factory("llama", n_layers=3)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig(patch_all_layers=2, per_layer_projections=True))
    sp = SequenceProcessor(
        dec,
        tokenizer,
        SamplingConfig(top_p=0.8, temperature=0.9, max_new_tokens=10, num_return_sequences=3, seed=5),
    )
    acts = 4 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    seqs, res, diag = sp.generate_with_logprobs(prompts=acts)
    assert seqs.sequences.shape == (4, 3, 10)
    diff = (res.token_logqs - seqs.sampler_logprobs).abs().max().item()
    record_max("lens nondiff log q vs SequenceProcessor teacher-forced log q", diff)
    assert diff <= HF_TOL
    # Responses of one activation differ (G independent samples), and the override path works.
    assert not torch.equal(seqs.sequences[0, 0], seqs.sequences[0, 1])
    zero = sp.teacher_force_logprobs(seqs, params_override=sp.build_params_override(None, 0.0))
    assert torch.equal(zero.token_logps, res.token_logps)
    pool = sp.generate_with_replacement_sampling(6, prompts_pool=acts, seed=1)[0]
    assert pool.sequences.shape == (6, 1, 10)


def test_config_errors(tiny_model_factory, tokenizer):
    with pytest.raises(ValueError, match="do_sample=False"):
        SamplingConfig(do_sample=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    model = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="needs a VLLMBackend"):
        SequenceProcessor(model, tokenizer, SamplingConfig(backend="vllm"))
    sp = SequenceProcessor(model, tokenizer)
    with pytest.raises(KeyError, match="Unknown prompt dataset"):
        sp.sample_prompts("nope", "train", 1, 0)


def test_stop_strings_end_rows_and_are_scored(tiny_model_factory, tokenizer):
    """A row ends at the token that completes a stop string; that token is generated and scored."""
    model = tiny_model_factory("llama")
    cfg = SamplingConfig(max_new_tokens=30, num_return_sequences=6, stop_strings=["e"], seed=4)
    sp = SequenceProcessor(model, tokenizer, cfg)
    seqs, res, _ = sp.generate_with_logprobs(prompts=["The return statement"])
    toks, lens = seqs.gen_tokens()[0], seqs.gen_lens[0]
    ended = [i for i in range(6) if lens[i] < 30]
    assert ended, "expected some rows to hit the stop string"
    for i in ended:
        text = tokenizer.decode(toks[i, : lens[i]])
        assert "e" in text and "e" not in tokenizer.decode(toks[i, : lens[i] - 1])
        assert res.token_logqs[0, i, lens[i] - 1] < 0  # the stop token is scored
    diff = (res.token_logqs - seqs.sampler_logprobs)[seqs.gen_mask].abs().max()
    assert diff <= HF_TOL
