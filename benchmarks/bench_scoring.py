"""Benchmark teacher-forced scoring (writes JSON; not a test).

Throughput (tokens/s) of ``SequenceProcessor.teacher_force_logprobs_with_diagnostics``
(log p, log q, RB entropy, surprisal, all step diagnostics; functional_call path) against a
bare ``model(ids).logits`` + ``log_softmax`` + gather on the same batch; the goal is a ratio
>= 0.8. Peak memory (max RSS of a fresh process) of both at a long sequence shows that the
chunked vocabulary math keeps the extra memory bounded.

    python benchmarks/bench_scoring.py --out benchmarks/results/scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import median_time
from transformers import AutoModelForCausalLM, LlamaConfig


def build(tmp: str, vocab: int, hidden: int, layers: int):
    """A random Llama saved and reloaded (offline)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=8192,
        eos_token_id=0,
        bos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
    return AutoModelForCausalLM.from_pretrained(tmp).eval()


def batch(model, n: int, prompt: int, gen: int):
    """BatchedSequences with random tokens (scoring does not care how they were sampled)."""
    from lens_rl.processing import BatchedSequences

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (n, 1, prompt + gen), generator=g)
    return BatchedSequences(
        sequences=ids,
        prompt_lens=[prompt] * n,
        gen_lens=torch.full((n, 1), gen),
        attention_masks=torch.ones_like(ids),
        responses_text=[],
    )


def run_one(mode: str, model, seqs, tf_batch: int) -> None:
    """One scoring pass in the given mode."""
    from lens_rl.processing import GenerationConfig, SequenceProcessor

    if mode == "bare":
        ids = seqs.sequences[:, 0]
        p = seqs.prompt_lens[0]
        with torch.no_grad():
            for s in range(0, ids.shape[0], tf_batch):
                x = ids[s : s + tf_batch]
                logits = model(x).logits[:, p - 1 : -1]
                torch.log_softmax(logits.float(), -1).gather(-1, x[:, p:, None])
    else:
        sp = SequenceProcessor(
            model, None, GenerationConfig(top_p=0.9, temperature=0.8, tf_batch_size=tf_batch)
        )
        sp.teacher_force_logprobs_with_diagnostics(seqs)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    """Run the throughput and memory comparisons and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/scoring.json")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--long", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--model_dir",
        default=None,
        help="Score a trained model (e.g. .cache/lens_rl/base-llama-d128) instead of a random one.",
    )
    ap.add_argument("--_memory_child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        mode, tmp = args._memory_child
        model = AutoModelForCausalLM.from_pretrained(tmp).eval()
        seqs = batch(model, 1, 16, args.long)
        run_one(mode, model, seqs, 1)  # warm-up (allocator pools, lazy inits)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
        base = _rss_kib("VmRSS")
        run_one(mode, model, seqs, 1)
        print(json.dumps({"extra_peak_MiB": (_rss_kib("VmHWM") - base) / 1024}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            tmp = args.model_dir
            model = AutoModelForCausalLM.from_pretrained(tmp).eval()
        else:
            model = build(tmp, args.vocab, args.hidden, args.layers)
        seqs = batch(model, args.n, 16, args.gen)
        tokens = args.n * args.gen
        times = {}
        for mode in ("bare", "processor"):
            times[mode] = median_time(
                lambda mode=mode: run_one(mode, model, seqs, 8), args.repeats, warmup=True
            )
        memory = {}
        for mode in ("bare", "processor"):
            res = subprocess.run(
                [sys.executable, __file__, "--long", str(args.long), "--_memory_child", mode, tmp],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[mode] = json.loads(res.stdout.strip().splitlines()[-1])["extra_peak_MiB"]
    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "model": args.model_dir
        or {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "random": True},
        "batch": {"sequences": args.n, "generated_tokens_each": args.gen, "policy": "top_p=0.9, T=0.8"},
        "bare_tokens_per_s": tokens / times["bare"],
        "processor_tokens_per_s": tokens / times["processor"],
        "throughput_ratio_processor_over_bare": times["bare"] / times["processor"],
        "long_sequence_tokens": args.long,
        "long_sequence_extra_peak_MiB": memory,
        "full_logits_MiB_at_long": args.long * args.vocab * 4 / 2**20,
    }
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
