"""The README's main job (``make demo``): build the embedded default and run the lens on it."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    """Build (cached) an offline tokenizer and tiny model, then run what the toolkit has."""
    from rich.console import Console

    from lens_rl.data.corpus import pydoc_topics
    from lens_rl.models.tokenizer import train_bpe_tokenizer
    from lens_rl.testing.tiny_models import build_tiny_model

    console = Console()
    root = Path(os.environ.get("LENS_RL_CACHE", ".cache/lens_rl"))
    tok_dir = root / "tokenizer"
    console.rule("lens_rl quickstart")
    tok = train_bpe_tokenizer(pydoc_topics(), tok_dir, vocab_size=512)
    model = build_tiny_model("llama", root / "tiny-llama", len(tok), seed=0, eos_token_id=tok.eos_token_id)
    console.print(f"tokenizer: {len(tok)} tokens; model: {type(model).__name__}")
    return 0
