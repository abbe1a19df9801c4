"""GPU-only paths (marker `gpu`; skipped with a stated reason on machines without CUDA)."""

from __future__ import annotations

import pytest
import torch

from lens_rl.models import Decoder, DecoderConfig

pytestmark = pytest.mark.gpu


def test_bf16_generators_agree_on_gpu(tiny_model_factory, tokenizer):
    """bf16 on CUDA: the three generators still draw identical tokens; kv vs soft logits agree
    to bf16 precision (tolerance 5e-2, to be tightened from measurement on a lent GPU)."""
    base = tiny_model_factory("llama", n_layers=3)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig(patch_all_layers=True), share_weights=False)
    dec = dec.to("cuda", torch.bfloat16)
    a = (4 * torch.randn(3, 64, generator=torch.Generator().manual_seed(0))).to("cuda", torch.bfloat16)
    outs = [
        getattr(dec, name)(a, 12, generator=torch.Generator("cuda").manual_seed(0))
        for name in ("generate_soft", "generate_soft_kv_cached", "generate_soft_kv_cached_nondiff")
    ]
    assert torch.equal(outs[0].hard_token_ids, outs[2].hard_token_ids)
    assert (outs[0].raw_lm_logits - outs[1].raw_lm_logits).abs().max() < 5e-2


def test_sft_bf16_autocast_step(tiny_model_dir, tiny_dump, tmp_path):
    """A short supervised run with the default bf16=None picks bf16 on CUDA and stays finite."""
    from lens_rl.training.sft_config import LensSFTConfig
    from lens_rl.training.sft_trainer import run_sft

    splits = tiny_dump
    cfg = LensSFTConfig(
        model_name_or_path=str(tiny_model_dir),
        train_data=str(splits["train"]),
        val_data=str(splits["val"]),
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        eval_strategy="no",
        save_strategy="no",
        per_device_train_batch_size=8,
        t_text=4,
        plot=False,
    )
    result = run_sft(cfg)
    assert cfg.bf16 and result["trainer"].accelerator.mixed_precision == "bf16"
    assert torch.isfinite(torch.tensor(result["final"]["fve"]))
