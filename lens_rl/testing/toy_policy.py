"""A policy small enough to enumerate every response: 6-token vocabulary, 1-layer Llama.

Used by the entropy-probe checks: with every response of length <= T enumerated, expectations
under q are exact sums, so the probe's estimates can be compared with exact values.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from lens_rl.processing.sequence_processor import BatchedSequences
from lens_rl.testing.tiny_models import build_tiny_model

TOY_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "a", "b", "c", "d")
TOY_PROMPTS: tuple[str, ...] = ("a", "b a", "c d", "d d a", "b", "a c")


def build_toy_policy(save_dir: str | Path, seed: int = 0, initializer_range: float = 0.5):
    """Save a word-level tokenizer and a seeded 1-layer Llama to ``save_dir``; load both back."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_dir = Path(save_dir)
    core = Tokenizer(WordLevel({t: i for i, t in enumerate(TOY_TOKENS)}, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>").save_pretrained(
        save_dir
    )
    model = build_tiny_model(
        "llama",
        save_dir,
        len(TOY_TOKENS),
        seed=seed,
        n_layers=1,
        eos_token_id=TOY_TOKENS.index("</s>"),
        initializer_range=initializer_range,
    )
    return model, AutoTokenizer.from_pretrained(save_dir)


def enumerate_responses(vocab_size: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Every response a sampler can produce: EOS-terminated ones of length <= T (EOS last) and
    the length-T ones without EOS."""
    other = [t for t in range(vocab_size) if t != eos_id]
    out = []
    for k in range(max_new_tokens):
        out += [[*p, eos_id] for p in itertools.product(other, repeat=k)]
    out += [list(p) for p in itertools.product(other, repeat=max_new_tokens)]
    return out


def enumeration_batch(tokenizer, prompts: list[str], max_new_tokens: int) -> BatchedSequences:
    """All responses for each prompt as one :class:`BatchedSequences` (B prompts x R responses),
    laid out as SequenceProcessor's generator lays out samples (left-padded prompts)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    responses = enumerate_responses(len(tokenizer), tokenizer.eos_token_id, max_new_tokens)
    b, r, p = len(prompts), len(responses), enc["input_ids"].shape[1]
    gen = torch.full((r, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long)
    lens = torch.tensor([len(x) for x in responses])
    for i, x in enumerate(responses):
        gen[i, : len(x)] = torch.tensor(x)
    seqs = torch.cat([enc["input_ids"][:, None, :].expand(b, r, p), gen[None].expand(b, r, -1)], -1)
    gen_mask = (torch.arange(max_new_tokens)[None, :] < lens[:, None]).long()
    attn = torch.cat([enc["attention_mask"][:, None, :].expand(b, r, p), gen_mask[None].expand(b, r, -1)], -1)
    return BatchedSequences(
        sequences=seqs.contiguous(),
        prompt_lens=[p] * b,
        gen_lens=lens[None].expand(b, r).contiguous(),
        attention_masks=attn.contiguous(),
        responses_text=[],
    )
