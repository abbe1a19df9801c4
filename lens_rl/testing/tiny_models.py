"""Tiny causal LMs of several architecture families, built locally from a config.

Every model is created with ``from_config`` under a fixed seed, written with
``save_pretrained`` and loaded back with ``AutoModelForCausalLM.from_pretrained``, so the
loading code a user runs on a real checkpoint is what runs here too. No hub is touched.

Families:
- ``gpt2``: learned absolute positions, LayerNorm, fused ``c_attn``; head size 16.
- ``llama``: RoPE, RMSNorm, gated MLP; head size 16.
- ``llama_vllm``: Llama with head size 64, which vLLM's CPU attention kernel accepts
  (it rejects 16).
- ``qwen2``: RoPE with grouped-query attention (2 KV heads for 4 query heads) and q/k/v bias;
  tied embeddings.
- ``qwen3``: q/k RMSNorm, GQA (4 query / 2 KV heads) with head size 8 (projections 64 -> 32).
- ``mistral``: GQA, sliding-window attention on every layer with a window of 6 tokens (shorter
  than the decoder's prompt plus the generated tokens, so the window matters).
- ``gemma2``: token embeddings scaled by ``sqrt(64) = 8`` inside the embedding module, head size
  24 (4 query / 2 KV heads), alternating sliding (window 6) / full layers, attention and final
  logit soft-capping (final cap 3, small enough to bend the tiny model's logits), tied
  embeddings, eager attention (HF's sdpa drops attention soft-capping).
- ``gemma3_text``: ``Gemma3ForCausalLM``; scaled embeddings, head size 32 with one KV head
  (multi-query), sliding (window 5) / full / sliding layers with their own RoPE bases and linear
  RoPE scaling on the full layer, q/k norms, tied embeddings, no final soft-capping (as released).
- ``olmo2``: post-block norms, q/k norms over the whole projection, attention biases.
- ``phi3``: fused ``qkv_proj``/``gate_up_proj``, GQA, tied embeddings.
- ``gpt_neox`` (Pythia): parallel residual, partial rotary (25% of head size 32), biases,
  untied ``embed_out`` head, blocks at ``gpt_neox.layers``.

Not in :data:`TINY_ARCHS` (the lens refuses passes past their length limit, see
``lens_rl.models.families``): ``llama_dynamic`` (``dynamic`` RoPE, factor 4, its limit
``max_position_embeddings`` 24) and ``phi3_longrope`` (``longrope``, limit
``original_max_position_embeddings`` 24, ``max_position_embeddings`` 96).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from lens_rl.models.families import attn_implementation_for, load_causal_lm

# The families added for issue 12 (every lens check runs on them too).
FAMILY_ARCHS: tuple[str, ...] = ("qwen3", "mistral", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt_neox")
TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "llama_vllm", "qwen2", *FAMILY_ARCHS)
# Length-dependent RoPE variants (not in TINY_ARCHS): the lens refuses passes past their limit.
ROPE_VARIANT_ARCHS: tuple[str, ...] = ("llama_dynamic", "phi3_longrope")


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
    # The newer families: hidden size 64, intermediate 128, pad id 1 (the test tokenizer's).
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, pad_token_id=1, **common)
    if arch == "qwen3":
        return Qwen3Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **small,
        )
    if arch == "mistral":
        return MistralConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=6,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **small,
        )
    if arch == "gemma2":
        return Gemma2Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
            attn_logit_softcapping=10.0,
            final_logit_softcapping=3.0,
            initializer_range=0.1,  # logits up to ~4, so the cap of 3 changes them by up to ~1.3
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **small,
        )
    if arch == "gemma3_text":
        return Gemma3TextConfig(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=5,
            layer_types=["full_attention" if i % 3 == 1 else "sliding_attention" for i in range(n_layers)],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            },
            final_logit_softcapping=None,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **small,
        )
    if arch == "olmo2":
        return Olmo2Config(
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_bias=True,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **small,
        )
    if arch == "phi3":
        return Phi3Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **small,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            num_attention_heads=2,
            rotary_pct=0.25,
            use_parallel_residual=True,
            attention_bias=True,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **small,
        )
    if arch == "llama_dynamic":
        return LlamaConfig(
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10_000.0},
            max_position_embeddings=24,
            initializer_range=0.1,  # attention sharp enough for positions (and RoPE) to matter
            tie_word_embeddings=False,
            **small,
        )
    if arch == "phi3_longrope":
        half_rotary = 64 // 4 // 2  # head size 16, full rotary
        return Phi3Config(
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10_000.0,
                "short_factor": [1.0] * half_rotary,
                "long_factor": [float(2**i) for i in range(half_rotary)],
                "original_max_position_embeddings": 24,
            },
            original_max_position_embeddings=24,
            max_position_embeddings=96,
            initializer_range=0.1,  # attention sharp enough for positions (and RoPE) to matter
            tie_word_embeddings=False,
            **small,
        )
    raise ValueError(
        f"Unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS} or {ROPE_VARIANT_ARCHS}."
    )


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
    # Eager attention where sdpa would drop attention soft-capping (Gemma 2), as load_causal_lm does.
    impl = attn_implementation_for(config)
    attn = {"attn_implementation": impl} if impl else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    loaded = load_causal_lm(save_dir, dtype=dtype)
    return loaded.eval()
