"""A reproducible recipe for the quickstart's base model: a small LM trained offline.

No hub is reachable, so the embedded default is a small Llama-style model with its own
byte-level BPE tokenizer, pretrained on text that ships with CPython (``pydoc_data`` topics
and standard-library sources) with ``transformers.Trainer``. It learns enough in a few CPU
minutes for its activations to carry structure a lens can read. The result is cached: a
folder whose ``recipe.json`` matches the requested recipe is reused as is.

Reproducibility. Float sums depend on the thread count and on the SIMD width the CPU
kernels pick, and 600 steps of training amplify a last-bit difference into a different
model (an earlier quickstart measured held-out lens FVE 0.19 on one machine's base and 0.44
on another's, same code). On CPU the pretraining therefore runs in a child process pinned to
one thread, with MKL's conditional numerical reproducibility set to the AVX2 code path
(``MKL_CBWR``) and ATen's and oneDNN's kernels capped at AVX2 (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``). The same Python (the corpus is read from the interpreter, see
:mod:`lens_rl.data.corpus`) and the same torch then give the same weights bit for bit,
whatever the parent's thread settings. ``recipe.json`` records the corpus hash, the Python and
torch versions and the weights hash (``weights_sha256``), so two machines can compare bases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lens_rl.data.corpus import pydoc_topics, stdlib_sources
from lens_rl.data.windows import tokenize_corpus
from lens_rl.models.tokenizer import train_bpe_tokenizer

# The child process's environment on CPU (see the module docstring).
DETERMINISTIC_CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


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
    # 2: pinned single-thread child process on CPU (1: trained in the caller's process).
    determinism: int = 2


def _recipe_matches(path: Path, recipe: PretrainRecipe) -> bool:
    f = path / "recipe.json"
    if not ((path / "config.json").exists() and f.exists()):
        return False
    recorded = json.loads(f.read_text())
    return {k: recorded.get(k) for k in asdict(recipe)} == asdict(recipe)


def corpus_sha256(texts: list[str]) -> str:
    """sha256 of the corpus documents (length-prefixed, so document boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and exact bytes: equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def pretrain_small_lm(path: str | Path, recipe: PretrainRecipe = PretrainRecipe(), log=print) -> Path:
    """Build (or reuse) the tokenizer and pretrained model in ``path``; return ``path``.

    On CPU the training runs in a pinned child process (``python -m lens_rl.cli.pretrain``), so the
    result does not depend on this process's thread settings; its output streams through.
    """
    path = Path(path)
    if _recipe_matches(path, recipe):
        info = json.loads((path / "recipe.json").read_text())
        log(f"base model: reusing {path} (weights {info.get('weights_sha256', '?')})")
        return path
    if torch.cuda.is_available():
        _pretrain(path, recipe, log=log)
    else:
        log("base model: pretraining in a single-thread child process (bit-reproducible; ~3 min)")
        env = {**os.environ, **DETERMINISTIC_CPU_ENV}
        cmd = [
            sys.executable,
            "-m",
            "lens_rl.cli.pretrain",
            "--path",
            str(path),
            "--recipe",
            json.dumps(asdict(recipe)),
        ]
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pretraining the base model failed (exit {proc.returncode}): {' '.join(cmd)}")
        if not _recipe_matches(path, recipe):
            raise RuntimeError(f"pretraining finished but {path / 'recipe.json'} does not match the recipe")
    info = json.loads((path / "recipe.json").read_text())
    log(f"base model: {path} (weights {info['weights_sha256']}, corpus {info['corpus_sha256']})")
    return path


def _pretrain(path: Path, recipe: PretrainRecipe, log=print) -> None:
    """Train the tokenizer and the model in this process and save both with ``recipe.json``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

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
    record = {
        **asdict(recipe),
        "final_train_loss": round(float(result.training_loss), 4),
        "corpus_sha256": corpus_sha256(texts),
        "weights_sha256": weights_sha256(model),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }
    (path / "recipe.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Child-process entry point: ``python -m lens_rl.cli.pretrain --path DIR --recipe JSON``."""
    ap = argparse.ArgumentParser(
        description="Pretrain the quickstart's base model (see lens_rl.cli.pretrain)."
    )
    ap.add_argument("--path", required=True)
    ap.add_argument(
        "--recipe", default="{}", help="PretrainRecipe fields as JSON (default: the quickstart's)."
    )
    args = ap.parse_args(argv)
    recipe = PretrainRecipe(**json.loads(args.recipe))
    _pretrain(Path(args.path), recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
