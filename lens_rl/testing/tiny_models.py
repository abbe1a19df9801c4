"""Tiny causal LMs of several architecture families, built locally from a config.

Every model is created with ``from_config`` under a fixed seed, written with
``save_pretrained`` and loaded back with ``AutoModelForCausalLM.from_pretrained``, so the
loading code a user runs on a real checkpoint is what runs here too. No hub is touched.

Families:
- ``gpt2``: learned absolute positions, LayerNorm, fused ``c_attn``; head size 16.
- ``llama``: RoPE, RMSNorm, gated MLP; head size 16.
- ``llama_vllm``: Llama with head size 64, which vLLM's CPU attention kernel accepts
  (it rejects 16).
- ``qwen2``: RoPE with grouped-query attention (2 KV heads for 4 query heads) and q/k/v bias.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "llama_vllm", "qwen2")


def tiny_config(
    arch: str, vocab_size: int, *, n_layers: int = 2, max_positions: int = 256, eos_token_id: int = 0
) -> PretrainedConfig:
    """Return the config of a tiny model of family ``arch`` (see the module docstring)."""
    common = dict(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    if arch == "gpt2":
        return GPT2Config(
            n_layer=n_layers,
            n_embd=64,
            n_head=4,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    if arch in ("llama", "llama_vllm"):
        hidden, heads = (64, 4) if arch == "llama" else (128, 2)
        return LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **common,
        )
    raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}.")


def build_tiny_model(
    arch: str,
    save_dir: str | Path,
    vocab_size: int,
    *,
    seed: int = 0,
    n_layers: int = 2,
    eos_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
    initializer_range: float | None = None,
) -> PreTrainedModel:
    """Build a seeded random tiny model, save it to ``save_dir`` and load it back from disk.

    The seed goes through ``torch.random.fork_rng`` so the caller's global RNG is untouched.
    ``initializer_range`` (std of the init) larger than the default 0.02 gives peaked,
    position-dependent next-token distributions instead of near-uniform ones.
    """
    config = tiny_config(arch, vocab_size, n_layers=n_layers, eos_token_id=eos_token_id)
    if initializer_range is not None:
        config.initializer_range = initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    loaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=dtype)
    return loaded.eval()
