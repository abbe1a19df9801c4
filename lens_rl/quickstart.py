"""The README's main job (``make demo``): build the embedded default and run the lens on it.

Today it runs what the toolkit has (the lens core): it builds, once and cached under
``.cache/lens_rl``, an offline tokenizer and a tiny Llama-style model, captures activations
from documentation sentences with the orig wrapper, and decodes them with the three
generators, checking that they agree. Supervised and RL training join the same command as
those stages land.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The with statement is used to wrap the execution of a block",
    "A class definition defines a class object",
    "The return statement leaves the current function call",
    "Exceptions are raised by the raise statement",
]


def main(argv: list[str] | None = None) -> int:
    """Build the cached default, then capture, decode and cross-check activations."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lens_rl.data.corpus import pydoc_topics
    from lens_rl.models import Decoder, DecoderConfig, Encoder, EncoderConfig, OrigWrapper
    from lens_rl.models.tokenizer import train_bpe_tokenizer
    from lens_rl.testing.tiny_models import build_tiny_model

    console = Console()
    root = Path(os.environ.get("LENS_RL_CACHE", ".cache/lens_rl"))
    console.rule("lens_rl quickstart (lens core on a tiny offline model)")
    tok_dir, model_dir = root / "tokenizer", root / "tiny-llama"
    if (tok_dir / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = train_bpe_tokenizer(pydoc_topics(), tok_dir, vocab_size=512)
    if (model_dir / "config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        base = build_tiny_model("llama", model_dir, len(tok), seed=0, eos_token_id=tok.eos_token_id)
    console.print(f"tokenizer {tok_dir} ({len(tok)} tokens); model {model_dir} ({type(base).__name__})")

    orig = OrigWrapper(base)
    tok.padding_side = "left"
    enc = tok(SENTENCES, return_tensors="pt", padding=True, add_special_tokens=False)
    layer = 0
    positions = torch.full((len(SENTENCES),), enc["input_ids"].shape[1] - 1)
    acts = orig.capture(enc["input_ids"], layer, positions, enc["attention_mask"])
    console.print(f"captured A after block {layer}: shape {tuple(acts.shape)}")

    decoder = Decoder.from_base(base, tok, DecoderConfig(), share_weights=True)
    encoder = Encoder.from_base(base, tok, EncoderConfig(output_layer=layer), share_weights=True)
    seed, length = 0, 8
    outs = {
        name: getattr(decoder, name)(acts, length, generator=torch.Generator().manual_seed(seed))
        for name in ("generate_soft", "generate_soft_kv_cached", "generate_soft_kv_cached_nondiff")
    }
    ref = outs["generate_soft"]
    table = Table(title="explanations (untrained lens on an untrained model: gibberish is expected)")
    table.add_column("context")
    table.add_column("explanation")
    for i, text in enumerate(SENTENCES):
        table.add_row(text, repr(tok.decode(ref.hard_token_ids[i])))
    console.print(table)
    same = all(torch.equal(o.hard_token_ids, ref.hard_token_ids) for o in outs.values())
    max_diff = max((o.raw_lm_logits - ref.raw_lm_logits).abs().max().item() for o in outs.values())
    a_hat = encoder(ref.generated_text_embeddings.detach())
    fve = 1 - (a_hat - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    console.print(f"three generators: identical tokens = {same}; max |logit diff| = {max_diff:.2e}")
    console.print(f"untrained reconstruction FVE = {fve.item():.3f} (training arrives with `sft_lens.py`)")
    return 0 if same and max_diff <= 1e-5 else 1
