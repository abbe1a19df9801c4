"""Model families (issue 12): generic lookup, Gemma's scaled embeddings and soft-capped logits,
sliding-window caches, length-dependent RoPE, refusals, and the lens round trip on every family.

Everything runs on the tiny configs of ``lens_rl.testing.tiny_models`` (fp32, CPU). Bounds, with
the values measured on 2 CPU cores (torch 2.13, transformers 5.19):

- residual stream entering block 0 at the ``<embed>`` slot vs ``proj(A)`` (``+ wpe`` for GPT-2 in
  single-layer mode), the prompt and the generated tokens vs the embedding module's output:
  exact (bitwise), every family;
- decoder logits (fwd_tokens and generation) vs the HF model's own ``logits`` for the same
  ``inputs_embeds``: max abs <= 1e-5 (measured 1.9e-6 for gemma2, <= 5.8e-7 for the others);
  Gemma 2's cap of 3 moves these logits by > 0.1;
- sliding-window models (windows 5-6; 14 prompt positions + 20 tokens), KV cache vs full
  recompute: <= 1e-5 (measured 1.8e-6 gemma2, 7.2e-7 gemma3_text, 2.1e-7 mistral);
- length-dependent RoPE, passes up to the limit (23 dynamic, 24 longrope): <= 1e-5 (measured
  2.6e-6); past it, with the guard disabled to measure, KV-cached vs recomputed logits differ by
  0.59 (dynamic) and 1.9 (longrope) on these models, which is why the decoder refuses such passes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from lens_rl.config import ConfigError
from lens_rl.models import Decoder, DecoderConfig, EncoderConfig
from lens_rl.models.families import (
    UnsupportedArchitectureError,
    embed_soft,
    embed_tokens,
    get_blocks,
    load_causal_lm,
)
from lens_rl.models.family_check import check_lens_family
from lens_rl.models.lens import ConsistencyLens

ATOL = 1e-5
SLIDING = ("mistral", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
ROPE_VARIANTS = ("llama_dynamic", "phi3_longrope")


def _activation(d: int, b: int = 3, seed: int = 0) -> torch.Tensor:
    return 4 * torch.randn(b, d, generator=torch.Generator().manual_seed(100 + seed))


def _block0_inputs(model, fn):
    """Run ``fn()`` and return the hidden states block 0 computes on, for each forward.

    Recorded inside block 0's ``forward``, i.e. after every forward pre-hook (the decoder's
    multi-layer slot edit included), which a pre-hook registered first would not see."""
    seen = []
    block = get_blocks(model)[0]
    inner = block.forward

    def forward(*args, **kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return inner(*args, **kwargs)

    block.forward = forward
    try:
        fn()
    finally:
        del block.forward
    return seen


# ----------------------------------------------------------------------------- lookup
def test_family_lookup(arch, tiny_model_factory):
    """Blocks, embedding scale and soft-cap are found generically (no per-family table)."""
    model = tiny_model_factory(arch, n_layers=3)
    info = check_lens_family(model)
    expected_path = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(arch, "model.layers")
    assert info.block_path == expected_path and info.n_layers == 3
    assert get_blocks(model) is model.get_submodule(expected_path)
    assert info.embed_scale == (8.0 if arch in GEMMA else None)  # sqrt(hidden_size = 64)
    assert info.final_logit_softcap == (3.0 if arch == "gemma2" else None)
    assert info.rope_limit is None
    if arch == "gemma2":  # attention soft-capping needs eager attention (sdpa drops it)
        assert model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("mode", ["single", "multi_per_layer"])
def test_residual_stream_entering_block0(arch, mode, tiny_model_factory, tokenizer):
    """At the slot, block 0 receives proj(A) exactly: not multiplied by Gemma's sqrt(d) (GPT-2 adds
    its learned position in single-layer mode; multi-layer mode replaces the slot outright). At the
    prompt and token positions it receives the embedding module's own (scaled) output."""
    base = tiny_model_factory(arch, n_layers=3)
    kw = dict(patch_all_layers=True, per_layer_projections=True) if mode != "single" else {}
    dec = Decoder.from_base(base, tokenizer, DecoderConfig(**kw))
    with torch.no_grad():  # a non-identity projection, so "proj(A)" is not just A
        for p in dec.projection_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    a = _activation(base.config.hidden_size)
    tokens = torch.tensor([[5, 6, 7, 8]] * 3)
    (h0,) = _block0_inputs(dec.base, lambda: dec.fwd_tokens(a, tokens))
    with torch.no_grad():
        slot = dec.projected(a)[0]
        prompt_ids = dec.prompt_ids[dec.prompt_ids >= 0]
        prompt = torch.cat([dec.prompt_left_emb, dec.prompt_right_emb])
        emb_w = base.get_input_embeddings().weight
    pos_emb = torch.zeros_like(h0)
    if arch == "gpt2":
        pos_emb = dec.base.transformer.wpe(torch.arange(h0.shape[1]))[None].expand_as(h0)
    e = dec.embed_pos
    expected_slot = slot if (mode != "single" or arch != "gpt2") else slot + pos_emb[:, e]
    assert torch.equal(h0[:, e], expected_slot)
    # The soft prompt starts as the module's embeddings of its tokens (Gemma: weight * 8).
    assert torch.equal(prompt, embed_tokens(base, prompt_ids))
    scale = 8.0 if arch in GEMMA else 1.0
    assert torch.equal(prompt, emb_w[prompt_ids] * scale)
    if arch in GEMMA:
        assert not torch.allclose(prompt, emb_w[prompt_ids])
    not_slot = [i for i in range(dec.prefix_len) if i != e]
    assert torch.equal(h0[:, not_slot], prompt.expand(3, -1, -1) + pos_emb[:, not_slot])
    tok_pos = slice(dec.prefix_len, dec.prefix_len + 3)  # the pass reads tokens[:, :-1]
    assert torch.equal(h0[:, tok_pos], embed_tokens(base, tokens[:, :-1]) + pos_emb[:, tok_pos])


def test_generated_token_embeddings_and_straight_through_map(arch, tiny_model_factory, tokenizer):
    """Generated tokens enter as the embedding module's output (Gemma: scaled), and the
    straight-through path ``y @ W_E * scale`` is the same linear map: equal on one-hot rows, and
    its Jacobian is ``scale * W_E``."""
    base = tiny_model_factory(arch, n_layers=3)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig())
    a = _activation(base.config.hidden_size)
    gen = dec.generate_soft_kv_cached(a, 6, generator=torch.Generator().manual_seed(0))
    ids = gen.hard_token_ids
    assert torch.equal(gen.generated_text_embeddings, base.get_input_embeddings()(ids))
    one_hot = torch.nn.functional.one_hot(ids, base.config.vocab_size).float()
    assert torch.equal(embed_soft(base, one_hot), embed_tokens(base, ids))
    y = torch.rand(2, base.config.vocab_size, requires_grad=True)
    r = torch.randn(2, base.config.hidden_size)
    (g,) = torch.autograd.grad((embed_soft(base, y) * r).sum(), y)
    w = base.get_input_embeddings().weight.detach()
    scale = 8.0 if arch in GEMMA else 1.0
    torch.testing.assert_close(g, scale * r @ w.T, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- logits
def test_decoder_logits_are_the_models_logits(arch, tiny_model_factory, tokenizer, record_max):
    """Decoder logits (fwd_tokens and generation) equal the HF model's own ``logits`` for the same
    inputs_embeds, so Gemma 2's final soft-capping is applied (and only where configured)."""
    base = tiny_model_factory(arch, n_layers=3)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig())
    a = _activation(base.config.hidden_size)
    nd = dec.generate_soft_kv_cached_nondiff(a, 12, generator=torch.Generator().manual_seed(0))
    tokens = nd.hard_token_ids
    with torch.no_grad():
        seq = torch.cat([dec.prompt_embeds(a), embed_tokens(base, tokens[:, :-1])], dim=1)
        hf = base(inputs_embeds=seq).logits[:, dec.prefix_len - 1 :].float()
        ft = dec.fwd_tokens(a, tokens)
    d_ft = (ft.logits - hf).abs().max().item()
    d_gen = (nd.raw_lm_logits - hf).abs().max().item()
    record_max("decoder logits vs HF model logits", max(d_ft, d_gen), arch)
    assert d_ft <= ATOL and d_gen <= ATOL
    if arch == "gemma2":
        cap = base.config.final_logit_softcapping
        with torch.no_grad():
            uncapped = base.lm_head(base.model(inputs_embeds=seq).last_hidden_state)[:, dec.prefix_len - 1 :]
        assert hf.abs().max() < cap
        assert (uncapped - hf).abs().max() > 0.1  # the cap really bends these logits
        # log p of the sampled tokens uses the capped logits
        lp = torch.log_softmax(hf, -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(ft.logprobs, lp, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- sliding windows
@pytest.mark.parametrize("arch_sw", SLIDING)
def test_sliding_window_cache_matches_recompute(arch_sw, tiny_model_factory, tokenizer, record_max):
    """With sequences far longer than the window (14 prompt + 20 tokens vs 5-6), the KV-cached
    generator (whose sliding layers keep only window - 1 keys) draws the same tokens with the same
    logits as full recomputation, and the window really changes the model's output."""
    base = tiny_model_factory(arch_sw, n_layers=3)
    window = base.config.sliding_window
    dec = Decoder.from_base(base, tokenizer, DecoderConfig())
    t = 20
    assert dec.prefix_len + t > 2 * window
    a = _activation(base.config.hidden_size)
    soft = dec.generate_soft(a, t, generator=torch.Generator().manual_seed(1))
    kv = dec.generate_soft_kv_cached(a, t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(soft.hard_token_ids, kv.hard_token_ids)
    diff = (soft.raw_lm_logits - kv.raw_lm_logits).abs().max().item()
    record_max("sliding window: kv vs recompute logits", diff, arch_sw)
    assert diff <= ATOL
    # The cache of a sliding layer really is truncated to the window.
    with torch.no_grad():
        _, past = dec._backbone(dec.prefix_embeds(dec.projected(a)[0]), use_cache=True)
    sliding = [layer for layer in past.layers if isinstance(layer, DynamicSlidingWindowLayer)]
    assert sliding and all(layer.keys.shape[-2] == window - 1 for layer in sliding)
    # Same weights without the window: different logits for the same tokens.
    wide = load_causal_lm(base.name_or_path_on_disk, sliding_window=1000).eval()
    dec_wide = Decoder.from_base(wide, tokenizer, DecoderConfig())
    with torch.no_grad():
        far = (
            dec_wide.fwd_tokens(a, kv.hard_token_ids).logits - dec.fwd_tokens(a, kv.hard_token_ids).logits
        ).abs()
    assert far.max() > 1e-3


# ----------------------------------------------------------------------------- length-dependent RoPE
def _rope_decoder(arch, tiny_model_factory, tokenizer):
    base = tiny_model_factory(arch, n_layers=2)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig())
    return base, dec, dec.family.rope_limit


@pytest.mark.parametrize("arch_rope", ROPE_VARIANTS)
def test_length_dependent_rope_hf_cache_disagrees(arch_rope, tiny_model_factory):
    """Why the decoder refuses: on the HF model alone, a KV-cached pass that crosses the limit
    gives other logits than one full pass (keys cached with the short-context frequencies)."""
    base = tiny_model_factory(arch_rope, n_layers=2)
    rope_type, limit = check_lens_family(base).rope_limit
    assert (rope_type, limit) == {"llama_dynamic": ("dynamic", 23), "phi3_longrope": ("longrope", 24)}[
        arch_rope
    ]
    ids = torch.randint(2, 500, (1, limit + 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = base(ids).logits[0, -1]
        out = base(ids[:, : limit - 2], use_cache=True)
        past = out.past_key_values
        for i in range(limit - 2, ids.shape[1]):
            out = base(ids[:, i : i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
    assert (out.logits[0, -1] - full).abs().max() > 1e-2


@pytest.mark.parametrize("arch_rope", ROPE_VARIANTS)
def test_length_dependent_rope_agrees_up_to_its_limit(arch_rope, tiny_model_factory, tokenizer, record_max):
    """Passes of at most ``limit`` positions (prompt 14 + max_length - 1; dynamic: 23, longrope: 24),
    even right after a longer pass (which grows dynamic RoPE's frequencies): the three generators
    and fwd_tokens agree to the alignment bounds."""
    base, dec, (_, limit) = _rope_decoder(arch_rope, tiny_model_factory, tokenizer)
    t = limit - dec.prefix_len + 1  # the longest pass is exactly `limit` positions
    a = _activation(base.config.hidden_size).requires_grad_(True)
    long_ids = torch.randint(2, 500, (1, 3 * limit), generator=torch.Generator().manual_seed(5))
    nd = dec.generate_soft_kv_cached_nondiff(a, t, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a longer pass (the orig model on a long context, say) right before...
        dec.base(long_ids)
    ft = dec.fwd_tokens(a, nd.hard_token_ids)  # ...a pass of exactly `limit` positions
    lp = (ft.logprobs - nd.logprobs).abs().max().item()
    with torch.no_grad():
        dec.base(long_ids)
    soft = dec.generate_soft(a, t, generator=torch.Generator().manual_seed(0))
    kv = dec.generate_soft_kv_cached(a, t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(soft.hard_token_ids, kv.hard_token_ids)
    assert torch.equal(soft.hard_token_ids, nd.hard_token_ids)
    diff = max((soft.raw_lm_logits - o.raw_lm_logits).abs().max().item() for o in (kv, nd))
    record_max("length-dependent RoPE below limit: logits / logprob", max(diff, lp), arch_rope)
    assert diff <= ATOL and lp <= ATOL
    assert torch.isfinite(ft.logprobs).all()


@pytest.mark.parametrize("arch_rope", ROPE_VARIANTS)
def test_length_dependent_rope_past_its_limit_is_refused(
    arch_rope, tiny_model_factory, tokenizer, record_max, monkeypatch
):
    """One position past the limit, every generator and fwd_tokens raise a ConfigError naming the
    rope type; with the guard disabled the cached and recomputed logits indeed disagree."""
    base, dec, (rope_type, limit) = _rope_decoder(arch_rope, tiny_model_factory, tokenizer)
    t = limit - dec.prefix_len + 2
    a = _activation(base.config.hidden_size)
    match = f"rope_type='{rope_type}'.*beyond {limit} positions"
    for name in ("generate_soft", "generate_soft_kv_cached", "generate_soft_kv_cached_nondiff"):
        with pytest.raises(ConfigError, match=match):
            getattr(dec, name)(a, t, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=match):
        dec.fwd_tokens(a, torch.full((3, t), 5))
    dec.fwd_tokens(a, torch.full((3, t - 1), 5))  # at the limit: fine
    monkeypatch.setattr(dec, "check_length", lambda n: None)
    soft = dec.generate_soft(a, t + 8, generator=torch.Generator().manual_seed(0))
    kv = dec.generate_soft_kv_cached(a, t + 8, generator=torch.Generator().manual_seed(0))
    same = (soft.hard_token_ids == kv.hard_token_ids).all(0)
    n = int((~same).nonzero()[0]) + 1 if not same.all() else same.numel()  # steps fed the same tokens
    diff = (soft.raw_lm_logits[:, :n] - kv.raw_lm_logits[:, :n]).abs().max().item()
    record_max(
        f"length-dependent RoPE past limit, guard off: kv vs soft logits ({arch_rope})", diff, arch_rope
    )
    assert diff > 1e-2


def test_prompt_longer_than_rope_limit_is_refused_at_build(tiny_model_factory, tokenizer):
    base = tiny_model_factory("phi3_longrope", n_layers=2)
    long_prompt = (
        "The for statement iterates over the items of any sequence (a list or a string), in order <embed>:"
    )
    n = len(tokenizer(long_prompt.replace("<embed>", ""), add_special_tokens=False)["input_ids"]) + 1
    assert n > 24
    with pytest.raises(ConfigError, match="rope_type='longrope'"):
        Decoder.from_base(base, tokenizer, DecoderConfig(prompt=long_prompt))


# ----------------------------------------------------------------------------- refusals and warnings
def _tiny(config_cls, **kw):
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    small |= dict(num_attention_heads=2, num_key_value_heads=2)
    small |= kw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config_cls(**small)).eval()


def test_probe_refuses_transformed_inputs_and_heads():
    """The build-time probe refuses, naming the model type, what the generic lens cannot
    reproduce: an input-embedding multiplier (Granite), a logit scale (Granite, Cohere), an
    embedding module that scales without exposing ``embed_scale``, and a missing block list."""
    from transformers import CohereConfig, GraniteConfig, LlamaConfig

    with pytest.raises(UnsupportedArchitectureError, match="'granite'.*transforms inputs_embeds"):
        check_lens_family(_tiny(GraniteConfig, embedding_multiplier=12.0))
    with pytest.raises(UnsupportedArchitectureError, match="'granite'.*reproduce the model's logits"):
        check_lens_family(_tiny(GraniteConfig, logits_scaling=8.0))
    with pytest.raises(UnsupportedArchitectureError, match="'cohere'.*reproduce the model's logits"):
        check_lens_family(_tiny(CohereConfig, logit_scale=0.5))

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    model = _tiny(LlamaConfig)
    scaled = Scaled(64, 32)
    scaled.weight = model.model.embed_tokens.weight
    model.model.embed_tokens = scaled
    with pytest.raises(UnsupportedArchitectureError, match="'llama'.*does not return weight"):
        check_lens_family(model)

    model = _tiny(LlamaConfig)
    model.config.num_hidden_layers = 5
    with pytest.raises(UnsupportedArchitectureError, match="'llama'.*no nn.ModuleList of 5 blocks"):
        check_lens_family(model)


def test_untested_family_builds_with_a_warning(tokenizer):
    """A family outside the tested list that passes the probe is accepted, with a warning."""
    from transformers import Starcoder2Config

    model = _tiny(Starcoder2Config, vocab_size=512)
    with pytest.warns(UserWarning, match="'starcoder2' is not among the families"):
        dec = Decoder.from_base(model, tokenizer, DecoderConfig())
    assert dec.family.model_type == "starcoder2"
    assert dec.family.n_layers == model.config.num_hidden_layers


def test_gemma2_sdpa_drops_attention_softcapping(tiny_model_factory):
    """HF's sdpa ignores Gemma 2's attention soft-capping: load_causal_lm picks eager, and a model
    loaded otherwise gets a warning (and indeed different logits)."""
    path = tiny_model_factory("gemma2", n_layers=3).name_or_path_on_disk
    eager = load_causal_lm(path).eval()
    assert eager.config._attn_implementation == "eager"
    sdpa = AutoModelForCausalLM.from_pretrained(path).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    ids = torch.arange(5, 25)[None]
    with torch.no_grad():
        assert (eager(ids).logits - sdpa(ids).logits).abs().max() > 1e-4
    with pytest.warns(UserWarning, match="attn_logit_softcapping"):
        check_lens_family(sdpa)


# ----------------------------------------------------------------------------- lens round trip
def test_lens_save_load_round_trip(arch, tiny_model_factory, tokenizer, tmp_path):
    """ConsistencyLens.build / save_pretrained / from_pretrained restores every trained tensor
    (trainable embeddings: tied head aliases included) and reproduces the generated tokens."""
    base = tiny_model_factory(arch, n_layers=3)
    dcfg = DecoderConfig(patch_all_layers=2, per_layer_projections=True, trainable_embeddings=True)
    ecfg = EncoderConfig(prompt="meaning of <text> is", trainable_base=True, output_layer=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no family warning for a tested family
        lens = ConsistencyLens.build(base, tokenizer, dcfg, ecfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in lens.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    lens.save_pretrained(tmp_path / "lens")
    again = ConsistencyLens.from_pretrained(tmp_path / "lens", base=base, tokenizer=tokenizer)
    sd, sd2 = lens.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    head, inp = again.decoder.base.get_output_embeddings(), again.decoder.base.get_input_embeddings()
    assert (head.weight is inp.weight) == bool(base.config.tie_word_embeddings)
    a = _activation(base.config.hidden_size)
    g1 = lens.decoder.generate_soft_kv_cached_nondiff(a, 6, generator=torch.Generator().manual_seed(0))
    g2 = again.decoder.generate_soft_kv_cached_nondiff(a, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g1.hard_token_ids, g2.hard_token_ids)
    assert torch.equal(
        lens.encoder(g1.generated_text_embeddings), again.encoder(g2.generated_text_embeddings)
    )
