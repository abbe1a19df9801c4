"""Random models of realistic shape, built locally (no hub), for the GPU check and benchmarks.

The shapes are those of public ~1B checkpoints (layer count, widths, GQA, head size, vocabulary),
the weights are seeded random (``initializer_range`` 0.02): the point is memory traffic, kernel
shapes and numerical behaviour in bf16 at scale, not text quality. Each folder also gets a
byte-level BPE tokenizer trained offline on the pydoc topics (its vocabulary is smaller than the
model's; token ids beyond it are still valid model inputs and vLLM samples over the full vocab).

``SHAPES`` (parameters, untied unless stated):

* ``llama-1b``: Llama-3.2-1B-like: d 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192,
  vocab 128256, tied embeddings (1.24 B).
* ``qwen3-1b``: Qwen3-1.7B-like: d 2048, 28 layers, 16 / 8 heads of 128 with q/k norm, MLP 6144,
  vocab 151936, tied (1.7 B).
* ``gemma3-1b``: Gemma-3-1B-like (``gemma3_text``): d 1152, 26 layers, 4 / 1 heads of 256, MLP 6912,
  vocab 262144, sliding window 512 on 5 of every 6 layers, scaled embeddings (1.0 B).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from lens_rl.data.corpus import pydoc_topics
from lens_rl.models.tokenizer import train_bpe_tokenizer

SHAPES = ("llama-1b", "qwen3-1b", "gemma3-1b")


def realistic_config(name: str, eos_token_id: int = 0, pad_token_id: int = 1) -> PretrainedConfig:
    """The config of one of :data:`SHAPES`."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    common = dict(
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        initializer_range=0.02,
        max_position_embeddings=8192,
    )
    if name == "llama-1b":
        return LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            **common,
        )
    if name == "qwen3-1b":
        return Qwen3Config(
            hidden_size=2048,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=6144,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            **common,
        )
    if name == "gemma3-1b":
        return Gemma3TextConfig(
            hidden_size=1152,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            intermediate_size=6912,
            vocab_size=262144,
            sliding_window=512,
            query_pre_attn_scalar=256,
            **common,
        )
    raise ValueError(f"Unknown shape {name!r}; known: {SHAPES}.")


def build_realistic_model(
    name: str,
    save_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> Path:
    """Write a seeded random model of shape ``name`` and a tokenizer to ``save_dir`` (reused when
    already there); returns the folder."""

    save_dir = Path(save_dir)
    if (save_dir / "config.json").exists() and (save_dir / "tokenizer.json").exists():
        return save_dir
    save_dir.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(pydoc_topics(), save_dir, vocab_size=8192)
    config = realistic_config(name, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(save_dir)
    tok.save_pretrained(save_dir)
    del model
    return save_dir
