"""Benchmark the entropy probe (writes JSON; not a test).

1. Wall time of each probe phase as a multiple of one training step on the same update batch
   (``sample_u + update_vector``: rollouts, teacher-forced log q with gradient, backward,
   clipping and the AdamW direction; what one GRPO step costs).
2. The JVP phase against the original probe's approach, a ``torch.func.jvp`` loop with one
   sequence per call (it spent ~77% of 5,215 s there), on the same sequences and the same v:
   seconds per sequence, batched vs looped, in the same run.

    python benchmarks/bench_probe.py --model_dir .cache/lens_rl/base-llama-d128 \
        --out benchmarks/results/probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lens_rl.probe.config import EntropyProbeConfig
from lens_rl.probe.runner import probe
from lens_rl.probe.subjects import lm_subject
from lens_rl.processing.sequence_processor import BatchedSequences


def _row(seqs: BatchedSequences, i: int) -> BatchedSequences:
    return BatchedSequences(
        sequences=seqs.sequences[i : i + 1],
        prompt_lens=seqs.prompt_lens[i : i + 1],
        gen_lens=seqs.gen_lens[i : i + 1],
        attention_masks=seqs.attention_masks[i : i + 1],
        responses_text=[],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default=".cache/lens_rl/base-llama-d128")
    ap.add_argument("--batch_size_e", type=int, default=256)
    ap.add_argument("--looped", type=int, default=32, help="sequences timed in the per-sequence loop")
    ap.add_argument("--out", default="benchmarks/results/probe.json")
    args = ap.parse_args()

    cfg = EntropyProbeConfig(
        model_name_or_path=args.model_dir,
        batch_size_e=args.batch_size_e,
        batch_size_u=8,
        num_generations=4,
        max_new_tokens=16,
        top_p=0.95,
        temperature=1.0,
        tf_batch_size=64,
        output_dir="/tmp/bench_probe",
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    subject = lm_subject(model, tok, cfg)
    out = probe(subject, cfg, show_progress=False)
    res = out.results
    step = res["training_step_s"]
    phases = {k: {"seconds": v, "x_training_step": v / step} for k, v in res["timings_s"].items()}

    # batched vs per-sequence JVP on the same sequences and v
    sp = subject.sp
    idx = torch.randint(0, subject.pool_size, (args.looped,), generator=torch.Generator().manual_seed(1))
    seqs = sp.generate_batched(subject.prompts(idx), G=1, seed=3)
    t0 = time.perf_counter()
    sp.teacher_force_jvp(seqs, out.v_named)
    batched = (time.perf_counter() - t0) / args.looped
    t0 = time.perf_counter()
    for i in range(args.looped):
        sp.teacher_force_jvp(_row(seqs, i), out.v_named, tf_batch_size=1)
    looped = (time.perf_counter() - t0) / args.looped

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "model_dir": args.model_dir,
        "config": {
            k: getattr(cfg, k) for k in ("batch_size_e", "batch_size_u", "num_generations", "max_new_tokens")
        },
        "training_step_s": step,
        "phases": phases,
        "total_x_training_step": sum(res["timings_s"].values()) / step,
        "jvp_seconds_per_sequence": {
            "batched": batched,
            "looped_one_per_call": looped,
            "speedup": looped / batched,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
