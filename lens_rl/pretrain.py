"""A reproducible recipe for the quickstart's base model: a small LM trained offline.

No hub is reachable, so the embedded default is a small Llama-style model with its own
byte-level BPE tokenizer, pretrained on text that ships with CPython (``pydoc_data`` topics
and standard-library sources) with ``transformers.Trainer``. It learns enough in a few CPU
minutes for its activations to carry structure a lens can read. The result is cached: a
folder whose ``recipe.json`` matches the requested recipe is reused as is.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the pretrained model (its hash decides cache reuse)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2  # head size 64: vLLM's CPU attention accepts it
    seq_len: int = 128
    stdlib_files: int = 250
    batch_size: int = 16
    max_steps: int = 600
    learning_rate: float = 3e-3
    seed: int = 0


def _recipe_matches(path: Path, recipe: PretrainRecipe) -> bool:
    f = path / "recipe.json"
    return (path / "config.json").exists() and f.exists() and json.loads(f.read_text()) == asdict(recipe)


def pretrain_small_lm(path: str | Path, recipe: PretrainRecipe = PretrainRecipe(), log=print) -> Path:
    """Build (or reuse) the tokenizer and pretrained model in ``path``; return ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

    from lens_rl.data.corpus import pydoc_topics, stdlib_sources
    from lens_rl.data.windows import tokenize_corpus
    from lens_rl.models.tokenizer import train_bpe_tokenizer

    path = Path(path)
    if _recipe_matches(path, recipe):
        log(f"base model: reusing {path}")
        return path
    log(
        f"base model: pretraining a {recipe.num_layers}-layer, d={recipe.hidden_size} Llama on pydoc + stdlib"
    )
    texts = pydoc_topics() + stdlib_sources(max_files=recipe.stdlib_files)
    tok = train_bpe_tokenizer(texts, path, vocab_size=recipe.vocab_size)
    stream = tokenize_corpus(texts, tok)
    n = stream.numel() // recipe.seq_len
    windows = stream[: n * recipe.seq_len].view(n, recipe.seq_len)
    log(f"corpus: {stream.numel():,} tokens, {n:,} windows of {recipe.seq_len}")

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=4 * recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=max(512, recipe.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config)

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": windows[i], "labels": windows[i]}

    args = TrainingArguments(
        output_dir=str(path / "trainer"),
        per_device_train_batch_size=recipe.batch_size,
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.05 * recipe.max_steps),
        weight_decay=0.1,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        seed=recipe.seed,
        data_seed=recipe.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Windows())
    result = trainer.train()
    log(f"pretraining done: final train loss {result.training_loss:.3f}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return path
