"""Gradient checkpointing of the lens (TrainingArguments' / GRPOConfig's `gradient_checkpointing`):
the decoder's cache-free passes and the encoder recompute their blocks in the backward, and the
gradients are the ones without checkpointing."""

from __future__ import annotations

import pytest
import torch

from lens_rl.config import ConfigError
from lens_rl.models import DecoderConfig, EncoderConfig
from lens_rl.models.families import get_blocks
from lens_rl.models.lens import ConsistencyLens
from lens_rl.testing.configs import tiny_sft_config
from lens_rl.training.sft_trainer import build_sft


def _count_block_calls(model):
    """Count calls of the block class's forward (every block of the decoder and the encoder)."""
    calls = [0]
    cls = type(get_blocks(model)[0])
    forward = cls.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    cls.forward = counting  # the class-level forward, which checkpointing re-runs
    return calls, lambda: setattr(cls, "forward", forward)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_checkpointed_gradients_equal_stored_ones(arch, tiny_model_factory, tokenizer):
    """fwd_tokens + encoder loss: gradients with and without checkpointing agree to 1e-6 (measured:
    identical); every block's forward runs a second time (in the backward) only with checkpointing."""
    base = tiny_model_factory(arch, n_layers=3)
    lens = ConsistencyLens.build(
        base,
        tokenizer,
        DecoderConfig(trainable_base=True, patch_all_layers=True),
        EncoderConfig(trainable_base=True),
    )
    a = 4 * torch.randn(3, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(1))
    params = [p for p in lens.parameters() if p.requires_grad]

    def grads():
        out = lens.decoder.fwd_tokens(a, ids)
        emb = lens.decoder.base.get_input_embeddings()(ids)
        loss = out.logprobs.sum() + (lens.encoder(emb) - a).pow(2).mean()
        return torch.autograd.grad(loss, params, allow_unused=True)

    calls, restore = _count_block_calls(lens.decoder.base)
    try:
        stored = grads()
    finally:
        restore()
    n_stored = calls[0]
    assert n_stored == 6  # 3 decoder blocks + 3 encoder blocks
    lens.gradient_checkpointing_enable()
    calls, restore = _count_block_calls(lens.decoder.base)
    try:
        ckpt = grads()
    finally:
        restore()
    assert calls[0] == 2 * n_stored, calls  # each block recomputed once in the backward
    for g0, g1 in zip(stored, ckpt, strict=True):
        if g0 is None:
            assert g1 is None
        else:
            torch.testing.assert_close(g1, g0, rtol=0, atol=1e-6)
    lens.gradient_checkpointing_disable()
    calls, restore = _count_block_calls(lens.decoder.base)
    try:
        grads()
    finally:
        restore()
    assert calls[0] == n_stored


def test_sft_with_gradient_checkpointing_trains_the_same(tiny_model_dir, tiny_dump, tmp_path):
    """`gradient_checkpointing: true` in the SFT config: 3 steps give the same weights (1e-6) and
    losses as without it."""
    runs = {}
    for gc in (False, True):
        cfg = tiny_sft_config(
            tiny_model_dir,
            tiny_dump,
            tmp_path / f"gc{gc}",
            val_data=None,
            max_steps=3,
            plot=True,
            explain_texts=4,
            gradient_checkpointing=gc,
            encoder={"trainable_base": True},
            decoder={"trainable_base": True},
        )
        trainer = build_sft(cfg)
        trainer.train()
        assert trainer.lens.is_gradient_checkpointing == gc
        runs[gc] = (trainer.lens.state_dict(), [r["loss"] for r in trainer.state.log_history if "loss" in r])
    for k, v in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][k], v, rtol=0, atol=1e-6, msg=k)
    assert runs[True][1] == pytest.approx(runs[False][1], abs=1e-6)


def test_offload_and_reentrant_are_refused(tiny_model_factory, tokenizer):
    lens = ConsistencyLens.build(tiny_model_factory("llama"), tokenizer, DecoderConfig(), EncoderConfig())
    with pytest.raises(ConfigError, match="offload"):
        lens.gradient_checkpointing_enable(offload=True)
    with pytest.raises(ConfigError, match="use_reentrant"):
        lens.gradient_checkpointing_enable({"use_reentrant": True})
