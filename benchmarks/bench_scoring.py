"""Benchmark teacher-forced scoring against a bare forward (writes JSON; not a test).

For each case, in one run: throughput (tokens/s) of
``SequenceProcessor.teacher_force_logprobs_with_diagnostics`` (log p, log q, RB entropy,
surprisal, all step diagnostics; functional_call path) against a bare ``model(ids).logits`` +
``log_softmax`` + gather on the same batch (goal: ratio >= 0.8 on the d=1024/V=32k model,
>= 0.6 on the quickstart base), and the profile of what is left: the forward alone, the bare
vocabulary math, the fused kernel (compiled and eager) on the same logits, split by sweep
(:func:`lens_rl.ops.scoring.profile_sweeps`), and torch.compile's first-call seconds. Peak
memory (max RSS of a fresh process) of both paths at a long sequence.

Cases: the quickstart base (``.cache/lens_rl/base-llama-d128``, pretrained here once if
missing), a random Llama with d=1024 and V=32k (flat next-token distributions: the nucleus
holds most of the vocabulary), and the same model under a low temperature (peaked q).

    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py --out benchmarks/results/scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a fresh inductor cache, so the compile times reported are cold ones (the memory children share it)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lens_rl_inductor_"))

import torch
from timing import median_time
from transformers import AutoModelForCausalLM, LlamaConfig

from lens_rl.ops import scoring
from lens_rl.ops.diagnostics import score_tokens
from lens_rl.ops.sampling import SamplingPolicy


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


def run_one(mode: str, model, seqs, tf_batch: int, policy: SamplingPolicy) -> None:
    """One scoring pass in the given mode (``bare``, ``forward`` or ``processor``)."""
    from lens_rl.processing import SamplingConfig, SequenceProcessor

    if mode in ("bare", "forward"):
        ids = seqs.sequences[:, 0]
        p = seqs.prompt_lens[0]
        with torch.no_grad():
            for s in range(0, ids.shape[0], tf_batch):
                x = ids[s : s + tf_batch]
                logits = model(x).logits[:, p - 1 : -1]
                if mode == "bare":
                    torch.log_softmax(logits.float(), -1).gather(-1, x[:, p:, None])
    else:
        cfg = SamplingConfig(
            temperature=policy.temperature, top_p=policy.top_p, top_k=policy.top_k, tf_batch_size=tf_batch
        )
        SequenceProcessor(model, None, cfg).teacher_force_logprobs_with_diagnostics(seqs)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def kernel_profile(model, seqs, tf_batch: int, policy: SamplingPolicy, repeats: int) -> dict:
    """The vocabulary math alone on one tf batch of logits: bare log_softmax + gather, the fused
    kernel compiled (with its sweeps) and eager."""
    ids = seqs.sequences[:tf_batch, 0]
    p = seqs.prompt_lens[0]
    with torch.no_grad():
        logits = model(ids).logits[:, p - 1 : -1].float()
    y = ids[:, p:]

    def score():
        return score_tokens(logits, y, policy, diagnostics=True, eos_token_id=0)

    out: dict = {"rows": int(y.numel()), "vocab": int(logits.shape[-1])}
    out["bare_log_softmax_gather_s"] = median_time(
        lambda: torch.log_softmax(logits, -1).gather(-1, y[..., None]), repeats, warmup=True
    )
    with torch.no_grad():
        scoring.set_compile("always")
        t0 = time.perf_counter()
        pack = score().diagnostics
        first = time.perf_counter() - t0
        t = median_time(score, repeats)
        with scoring.profile_sweeps() as sweeps:
            score()
        out["kernel_compiled"] = {"s": t, "first_call_s": first, "sweeps_s": dict(sweeps)}
        scoring.set_compile("never")  # the eager fallback: one timed call (slow on flat rows)
        with scoring.profile_sweeps() as sweeps:
            t0 = time.perf_counter()
            score()
            out["kernel_eager"] = {"s": time.perf_counter() - t0, "sweeps_s": dict(sweeps)}
    scoring.set_compile("auto")
    out["compile_s_by_sweep_first_call"] = scoring.compile_seconds()
    out["mean_eff_support_tokens"] = float(pack.step.eff_support.mean())
    out["mean_head_mass"] = float(pack.step.head_mass.mean())
    return out


def memory(model_dir: str, long: int, policy: SamplingPolicy) -> dict:
    """Extra peak RSS (MiB) of bare and processor on one ``long``-token sequence, fresh processes."""
    res = {}
    for mode in ("bare", "processor"):
        cmd = [
            sys.executable,
            __file__,
            "--_memory_child",
            mode,
            model_dir,
            str(long),
            json.dumps(vars(policy)),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_MiB"]
    return res


def memory_child(mode: str, model_dir: str, long: int, policy: SamplingPolicy) -> None:
    """Measure in this (fresh) process; prints one JSON line."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seqs = batch(model, 1, 16, long)
    run_one(mode, model, seqs, 1, policy)  # warm-up (allocator pools, lazy inits, compilation)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    base = _rss_kib("VmRSS")
    run_one(mode, model, seqs, 1, policy)
    print(json.dumps({"extra_peak_MiB": (_rss_kib("VmHWM") - base) / 1024}))


def run_case(name, model, model_dir, policy, n, gen, tf_batch, repeats, long) -> dict:
    """Throughput, kernel profile and memory of one case."""
    seqs = batch(model, n, 16, gen)
    tokens = n * gen
    t0 = time.perf_counter()
    run_one("processor", model, seqs, tf_batch, policy)  # first call: compiles the sweeps (if it pays)
    first = time.perf_counter() - t0
    times = {
        mode: median_time(
            lambda mode=mode: run_one(mode, model, seqs, tf_batch, policy), repeats, warmup=True
        )
        for mode in ("bare", "forward", "processor")
    }
    case = {
        "case": name,
        "model": model_dir,
        "vocab": model.config.vocab_size,
        "hidden": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "policy": vars(policy),
        "sequences": n,
        "generated_tokens_each": gen,
        "tf_batch": tf_batch,
        "bare_tokens_per_s": tokens / times["bare"],
        "forward_only_tokens_per_s": tokens / times["forward"],
        "processor_tokens_per_s": tokens / times["processor"],
        "throughput_ratio_processor_over_bare": times["bare"] / times["processor"],
        "processor_first_call_s": first,
        "processor_first_call_extra_s": first - times["processor"],
        "vocab_math": kernel_profile(model, seqs, tf_batch, policy, repeats),
    }
    if long:
        case["long_sequence_tokens"] = long
        case["long_sequence_extra_peak_MiB"] = memory(model_dir, long, policy)
        case["full_logits_MiB_at_long"] = long * model.config.vocab_size * 4 / 2**20
    print(json.dumps(case, indent=2), flush=True)
    return case


def main() -> None:
    """Run the three cases and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/scoring.json")
    ap.add_argument("--cache_dir", default=".cache/lens_rl", help="where the quickstart base is cached")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random d=1024 model")
    ap.add_argument("--n", type=int, default=32, help="sequences (quickstart)")
    ap.add_argument("--n_big", type=int, default=8, help="sequences (d=1024)")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--long", type=int, default=2048, help="long sequence of the memory check (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_memory_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        mode, model_dir, long, pol = args._memory_child
        memory_child(mode, model_dir, int(long), SamplingPolicy(**json.loads(pol)))
        return

    from lens_rl.cli.pretrain import pretrain_small_lm

    cases = []
    qs_dir = str(pretrain_small_lm(Path(args.cache_dir) / "base-llama-d128"))
    qs = AutoModelForCausalLM.from_pretrained(qs_dir).eval()
    cases.append(
        run_case(
            "quickstart_base",
            qs,
            qs_dir,
            SamplingPolicy(0.8, 0, 0.9),
            args.n,
            args.gen,
            8,
            args.repeats,
            args.long,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        big = build(tmp, 32768, 1024, args.layers)
        for name, policy, long in (
            ("random_d1024_v32k", SamplingPolicy(0.8, 0, 0.9), args.long),
            ("random_d1024_v32k_peaked_T0.1", SamplingPolicy(0.1, 0, 0.9), 0),
        ):
            cases.append(run_case(name, big, tmp, policy, args.n_big, args.gen, 8, args.repeats, long))
    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
