"""OrigWrapper: capture after block L, replacement, padding, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from lens_rl.models.hooks import UnsupportedArchitectureError, get_blocks, hooked
from lens_rl.models.orig import OrigWrapper


def _batch(tokenizer, side: str):
    texts = ["The for statement iterates over a sequence.", "Raise an exception.", "x = 1"]
    tokenizer.padding_side = side
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return texts, enc["input_ids"], enc["attention_mask"]


def _hook_ids(model) -> list[tuple[int, ...]]:
    """Ids of the hooks on every block (HF itself installs some for output_hidden_states)."""
    return [(*b._forward_hooks, *b._forward_pre_hooks) for b in get_blocks(model)]


def test_capture_is_block_output(arch, tiny_model_factory, tokenizer):
    orig = OrigWrapper(tiny_model_factory(arch))
    _, ids, mask = _batch(tokenizer, "right")
    pos = mask.sum(1) - 1
    with torch.no_grad():
        hs = orig.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    before = _hook_ids(orig.model)
    a = orig.capture(ids, 0, pos, mask)
    # hidden_states[L + 1] is the output of block L (for L below the last block).
    torch.testing.assert_close(a, hs[1][torch.arange(3), pos], rtol=0, atol=0)
    assert _hook_ids(orig.model) == before


def test_patching_own_activation_reproduces_clean_logits(arch, tiny_model_factory, tokenizer):
    orig = OrigWrapper(tiny_model_factory(arch, n_layers=3))
    _, ids, mask = _batch(tokenizer, "right")
    pos = torch.tensor([4, 1, 2])
    before = _hook_ids(orig.model)
    with torch.no_grad():
        clean = orig.logits(ids, mask)
        for layer in (0, 1, 2):
            a = orig.capture(ids, layer, pos, mask)
            patched = orig.forward_with_replacement(ids, layer, pos, a, mask)
            torch.testing.assert_close(patched, clean, rtol=0, atol=0)  # exact
    assert _hook_ids(orig.model) == before


def test_replacement_changes_only_later_positions(tiny_model_factory, tokenizer):
    orig = OrigWrapper(tiny_model_factory("llama"))
    _, ids, mask = _batch(tokenizer, "right")
    pos = torch.tensor([3, 2, 1])
    with torch.no_grad():
        clean = orig.logits(ids, mask)
        new = torch.randn(3, orig.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        patched = orig.forward_with_replacement(ids, 0, pos, new, mask)
    for b in range(3):
        p = int(pos[b])
        torch.testing.assert_close(patched[b, :p], clean[b, :p], rtol=0, atol=0)
        assert (patched[b, p] - clean[b, p]).abs().max() > 1e-3


def test_left_and_right_padding_capture_agree(arch, tiny_model_factory, tokenizer):
    """Both paddings give the unpadded activation (tolerance 1e-5: only the batch shape differs)."""
    orig = OrigWrapper(tiny_model_factory(arch))
    texts, ids_r, mask_r = _batch(tokenizer, "right")
    _, ids_l, mask_l = _batch(tokenizer, "left")
    lens = mask_r.sum(1)
    a_right = orig.capture(ids_r, 1, lens - 1, mask_r)
    a_left = orig.capture(ids_l, 1, torch.full_like(lens, ids_l.shape[1] - 1), mask_l)
    for b, text in enumerate(texts):
        single = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = orig.capture(single, 1, torch.tensor([single.shape[1] - 1]))[0]
        torch.testing.assert_close(a_right[b], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(a_left[b], ref, rtol=0, atol=1e-5)
    tokenizer.padding_side = "right"


def test_hooks_removed_when_forward_raises(tiny_model_factory, tokenizer):
    orig = OrigWrapper(tiny_model_factory("gpt2"))
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    before = _hook_ids(orig.model)
    with pytest.raises(IndexError, match="outside a sequence"):
        orig.forward_with_replacement(ids, 0, torch.tensor([99]), torch.zeros(1, 64))
    assert _hook_ids(orig.model) == before

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooked(orig.model, input_edits={1: boom}):
        orig.model(ids)
    assert _hook_ids(orig.model) == before


def test_replacement_gradient_reaches_new_activation(tiny_model_factory, tokenizer):
    orig = OrigWrapper(tiny_model_factory("qwen2"))
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    new = torch.randn(1, 64, requires_grad=True)
    logits = orig.next_token_logits_with_replacement(ids, 0, torch.tensor([2]), new)
    (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), new)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(not p.requires_grad for p in orig.parameters())


def test_unsupported_architecture_is_refused():
    """A family in REFUSED_FAMILIES is refused by name, with the reason (Gemma 3n: per-layer token
    embeddings looked up from ids, which text fed as embeddings cannot carry)."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    model = Gemma3nForCausalLM(
        Gemma3nTextConfig(
            vocab_size=32,
            vocab_size_per_layer_input=32,
            hidden_size=32,
            hidden_size_per_layer_input=4,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
            num_kv_shared_layers=0,
            laurel_rank=4,
            altup_num_inputs=2,
            activation_sparsity_pattern=[0.0, 0.0],
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="'gemma3n_text' is not supported: .*per-layer"):
        OrigWrapper(model)
