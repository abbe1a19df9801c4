"""Encoder read-out, end-to-end gradients through the lens, and config validation."""

from __future__ import annotations

import pytest
import torch

from lens_rl.config import ConfigError
from lens_rl.models import Decoder, DecoderConfig, Encoder, EncoderConfig, OrigWrapper


def test_encoder_reads_the_configured_block(arch, tiny_model_factory, tokenizer):
    """With no prompt and an identity projection, Â is the block output at the last position, when
    the encoder is fed what the model's embedding module returns for the ids (scaled for Gemma)."""
    base = tiny_model_factory(arch, n_layers=3)
    ids = tokenizer("return the value", return_tensors="pt", add_special_tokens=False)["input_ids"]
    emb = base.get_input_embeddings()(ids)
    orig = OrigWrapper(base)
    for layer in (0, 1):
        enc = Encoder.from_base(base, tokenizer, EncoderConfig(output_layer=layer), share_weights=True)
        expected = orig.capture(ids, layer, torch.tensor([ids.shape[1] - 1]))
        torch.testing.assert_close(enc(emb), expected, rtol=0, atol=1e-6)


@pytest.mark.alignment
def test_every_trainable_group_gets_a_gradient(arch, tiny_model_factory, tokenizer):
    """All decoder and encoder groups on: each trainable tensor gets a finite, nonzero gradient."""
    base = tiny_model_factory(arch, n_layers=3)
    dec = Decoder.from_base(
        base,
        tokenizer,
        DecoderConfig(
            patch_all_layers=2,
            per_layer_projections=True,
            trainable_base=True,
            trainable_embeddings=True,
            trainable_output_head=True,
        ),
    )
    enc = Encoder.from_base(
        base,
        tokenizer,
        EncoderConfig(prompt="meaning of <text> is", trainable_base=True, add_current_token=True),
    )
    a = 4 * torch.randn(3, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    gen = dec.generate_soft_kv_cached(a, 6, generator=torch.Generator().manual_seed(0))
    a_hat = enc(gen.generated_text_embeddings, current_token_ids=torch.tensor([3, 4, 5]))
    loss = (a_hat - a).pow(2).mean() + 1e-3 * gen.raw_lm_logits.logsumexp(-1).mean()
    loss.backward()
    missing = []
    for module_name, module in (("decoder", dec), ("encoder", enc)):
        for name, p in module.named_parameters():
            if p.requires_grad and (
                p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
            ):
                missing.append(f"{module_name}.{name}")
    # Every trainable tensor gets a gradient: the encoder's final norm and LM head (skipped, since
    # output_layer=-1 reads the last block's output) are frozen at build time, not left trainable.
    assert missing == []
    # Outside the blocks, only the token table (add_current_token) and GPT-2's positions are used.
    in_blocks = {n for n, _ in enc.base.named_parameters() if ".h." in n or ".layers." in n}
    used_outside = {n for n, p in enc.base.named_parameters() if p is enc.base.get_input_embeddings().weight}
    used_outside |= {n for n, _ in enc.base.named_parameters() if n.startswith("transformer.wpe.")}
    outside = {n for n, _ in enc.base.named_parameters()} - in_blocks - used_outside
    assert outside and outside <= set(enc.frozen_unused), (outside, enc.frozen_unused)
    assert sum(p.requires_grad for p in dec.projection_parameters()) == 4  # 2 layers x (W, b)


def test_gradient_reaches_decoder_through_encoder_only(tiny_model_factory, tokenizer):
    """Reconstruction loss alone (no logits) trains the decoder via straight-through."""
    base = tiny_model_factory("llama")
    dec = Decoder.from_base(base, tokenizer, DecoderConfig(), share_weights=True)
    enc = Encoder.from_base(base, tokenizer, EncoderConfig(), share_weights=True)
    a = 4 * torch.randn(2, base.config.hidden_size, generator=torch.Generator().manual_seed(1))
    gen = dec.generate_soft_kv_cached(a, 5, generator=torch.Generator().manual_seed(0))
    (enc(gen.generated_text_embeddings) - a).pow(2).mean().backward()
    for p in [*dec.projection_parameters(), *dec.prompt_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())  # shared base stays frozen


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt="no slot"), "exactly one '<embed>'"),
        (dict(prompt="<embed> and <embed>"), "exactly one '<embed>'"),
        (dict(per_layer_projections=True), "needs patch_all_layers"),
        (dict(patch_all_layers=0), "positive layer count"),
        (dict(patch_all_layers="all"), "does not match the expected type"),
    ],
)
def test_decoder_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(**kwargs)


def test_model_dependent_errors(tiny_model_factory, tokenizer):
    base = tiny_model_factory("gpt2")
    with pytest.raises(ConfigError, match="exceeds the model's 2 blocks"):
        Decoder.from_base(base, tokenizer, DecoderConfig(patch_all_layers=3))
    with pytest.raises(ConfigError, match="needs a frozen base"):
        Decoder.from_base(base, tokenizer, DecoderConfig(trainable_base=True), share_weights=True)
    with pytest.raises(ConfigError, match="use_dropout=True would switch the shared"):
        Decoder.from_base(base, tokenizer, DecoderConfig(use_dropout=True), share_weights=True)
    with pytest.raises(ConfigError, match="prompt_embeds"):
        Decoder.from_base(base, tokenizer, DecoderConfig(patch_all_layers=True)).prompt_embeds(
            torch.zeros(1, 64)
        )
    with pytest.raises(ConfigError, match="output_layer=5 is out of range"):
        Encoder.from_base(base, tokenizer, EncoderConfig(output_layer=5))
    with pytest.raises(ConfigError, match="exactly one '<text>'"):
        EncoderConfig(prompt="no marker")
    enc = Encoder.from_base(base, tokenizer, EncoderConfig(add_current_token=True))
    with pytest.raises(ValueError, match="needs current_token_ids"):
        enc(torch.zeros(1, 3, 64))
    dec = Decoder.from_base(base, tokenizer, DecoderConfig())
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        dec.generate_soft(torch.zeros(1, 64), 0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\)"):
        dec.fwd_tokens(torch.zeros(2, 64), torch.zeros(3, 4, dtype=torch.long))


def test_prompt_embeds_is_the_generation_prefix(tiny_model_factory, tokenizer):
    """The single-layer prompt handed to an engine reproduces the decoder's first-step logits."""
    base = tiny_model_factory("llama_vllm")
    dec = Decoder.from_base(base, tokenizer, DecoderConfig())
    a = torch.randn(2, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = base(inputs_embeds=dec.prompt_embeds(a)).logits[:, -1]
    gen = dec.generate_soft_kv_cached_nondiff(a, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits, gen.raw_lm_logits[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("output_layer", [-1, 0])
def test_encoder_trains_only_what_its_forward_reaches(arch, tiny_model_factory, tokenizer, output_layer):
    """trainable_base marks trainable exactly the base tensors that receive a gradient: the
    blocks up to output_layer (plus GPT-2's positions); the embedding table, later blocks, the
    final norm and the head stay frozen (DDP refuses parameters that never get a gradient)."""
    base = tiny_model_factory(arch, n_layers=3)
    enc = Encoder.from_base(base, tokenizer, EncoderConfig(trainable_base=True, output_layer=output_layer))
    emb = 4 * torch.randn(2, 5, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    enc(emb).pow(2).sum().backward()
    trainable = {n for n, p in enc.base.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in enc.base.named_parameters() if p.grad is not None}
    assert trainable == with_grad and trainable
    last = output_layer % 3
    for n in trainable:
        assert ".h." not in n and ".layers." not in n or int(n.split(".")[2]) <= last, n
    assert set(enc.frozen_unused) == {n for n, _ in enc.base.named_parameters()} - trainable
