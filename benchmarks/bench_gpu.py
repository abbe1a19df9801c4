"""GPU figures on one model folder (writes JSON; not a test). Run by ``scripts/gpu_check.py``.

Sections (each timed with :func:`timing.median_time`, CUDA-synchronised; a failing section is
recorded with its error and the others still run):

1. ``generation``: differentiable decoder generation, full recompute (``generate_soft``) vs
   kv-cached (``generate_soft_kv_cached``), forward + backward, at T = 32 and 128: seconds and the
   ratio soft / kv.
2. ``rollouts``: G = 8 samples per activation, T tokens: the HF kv-cached sampler
   (``generate_soft_kv_cached_nondiff``, ``num_samples=G``) vs the vLLM engine on
   ``prompt_embeds`` (:class:`~lens_rl.generation.vllm_backend.VLLMBackend`): tokens/s and the ratio.
3. ``dump``: activation-dump throughput (samples/s) of :func:`lens_rl.data.dump.run_dump`.
4. ``rl_step``: the parts of one GRPO step on the decoder (rollout, scoring under theta_old,
   policy forward + backward, optimizer step), seconds each and the share of the total.
5. ``scoring``: :func:`~lens_rl.ops.diagnostics.score_tokens` with ``diagnostics=True`` (log q,
   log p, entropy and the diagnostics in one pass) vs a plain ``log_softmax`` + gather on the same logits: the ratio.

    python benchmarks/bench_gpu.py --model_dir DIR --out benchmarks/results/gpu_llama-1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from timing import median_time

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _decoder(model_dir: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoTokenizer

    from lens_rl.models import Decoder, DecoderConfig
    from lens_rl.models.families import load_causal_lm

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = load_causal_lm(model_dir, dtype=dtype).to(device).eval()
    return tok, Decoder.from_base(base, tok, DecoderConfig(), share_weights=True).to(device)


def bench_generation(dec, device, args) -> list[dict]:
    """Soft vs kv-cached differentiable generation."""
    d = dec.base.get_input_embeddings().weight.shape[1]
    a = torch.randn(args.batch, d, generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device)
    rows = []
    for t in args.lengths:
        row: dict = {"T": t, "batch": args.batch}
        for name in ("generate_soft", "generate_soft_kv_cached"):
            fn = getattr(dec, name)

            def step(fn=fn, t=t):
                out = fn(a, t, generator=gen.manual_seed(0))
                (
                    out.generated_text_embeddings.float().pow(2).mean()
                    + out.raw_lm_logits.logsumexp(-1).mean()
                ).backward()
                dec.zero_grad(set_to_none=True)

            row[f"{name}_s"] = median_time(step, args.repeats, warmup=True)
        row["ratio_soft_over_kv"] = row["generate_soft_s"] / row["generate_soft_kv_cached_s"]
        rows.append(row)
        print("generation", json.dumps(row), flush=True)
    return rows


def bench_rollouts(dec, model_dir: str, dtype_name: str, device, args) -> dict:
    """HF kv-cached sampler vs vLLM on prompt_embeds, G samples per activation."""
    from lens_rl.ops.sampling import SamplingPolicy

    policy = SamplingPolicy(temperature=1.0, top_p=0.95)
    d = dec.base.get_input_embeddings().weight.shape[1]
    n_act, g, t = args.rollout_activations, args.group, args.rollout_tokens
    a = torch.randn(n_act, d, generator=torch.Generator().manual_seed(1)).to(device)
    gen = torch.Generator(device)

    def hf():
        with torch.no_grad():
            dec.generate_soft_kv_cached_nondiff(
                a, t, generator=gen.manual_seed(0), policy=policy, return_logits=False, num_samples=g
            )

    out: dict = {"activations": n_act, "group": g, "T": t}
    out["hf_s"] = median_time(hf, args.repeats, warmup=True)
    out["hf_tokens_per_s"] = n_act * g * t / out["hf_s"]
    if args.no_vllm:
        print("rollouts", json.dumps(out), flush=True)
        return out
    from lens_rl.generation.vllm_backend import VLLMBackend

    t0 = time.perf_counter()
    engine = VLLMBackend(
        model_dir,
        dtype=dtype_name,
        max_model_len=dec.prefix_len + t + 8,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
    )
    out["vllm_start_s"] = time.perf_counter() - t0
    try:
        with torch.no_grad():
            embeds = list(dec.prompt_embeds(a))

        def vllm():
            engine.generate(
                policy=policy, n=g, max_new_tokens=t, seed=0, prompt_embeds=embeds, ignore_eos=True
            )

        out["vllm_s"] = median_time(vllm, args.repeats, warmup=True)
        out["vllm_tokens_per_s"] = n_act * g * t / out["vllm_s"]
        out["ratio_vllm_over_hf_tokens_per_s"] = out["vllm_tokens_per_s"] / out["hf_tokens_per_s"]
        sd = dec.base.state_dict()
        out["vllm_sync_s"] = engine.sync_weights(sd.items())
    finally:
        engine.close()
    print("rollouts", json.dumps(out), flush=True)
    return out


def bench_dump(model_dir: str, dtype_name: str, args) -> dict:
    """Samples/s of the activation dump (forward to the layer, gather, cast, shard writing)."""
    from lens_rl.data.dump import DumpConfig, run_dump

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DumpConfig(
            model_name_or_path=model_dir,
            corpus="pydoc",
            layer=-2,
            seq_len=args.dump_seq_len,
            min_pos=4,
            num_train=args.dump_samples,
            num_val=0,
            shard_size=4096,
            batch_size=args.dump_batch,
            dtype="bfloat16",
            model_dtype=dtype_name,
            output_dir=tmp,
        )
        t0 = time.perf_counter()
        run_dump(cfg)
        s = time.perf_counter() - t0
    out = {
        "samples": args.dump_samples,
        "seq_len": args.dump_seq_len,
        "seconds": s,
        "samples_per_s": args.dump_samples / s,
    }
    print("dump", json.dumps(out), flush=True)
    return out


def bench_rl_step(dec, device, args) -> dict:
    """The parts of one GRPO step on the decoder, timed separately on the same batch."""
    from lens_rl.ops.diagnostics import score_tokens
    from lens_rl.ops.sampling import SamplingPolicy

    policy = SamplingPolicy(temperature=1.0, top_p=0.95)
    d = dec.base.get_input_embeddings().weight.shape[1]
    n_act, g, t = args.rollout_activations, args.group, args.rollout_tokens
    acts = (
        torch.randn(n_act, d, generator=torch.Generator().manual_seed(2)).to(device).repeat_interleave(g, 0)
    )
    gen = torch.Generator(device)
    params = [p for p in dec.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    state: dict = {}

    def rollout():
        with torch.no_grad():
            state["ids"] = dec.generate_soft_kv_cached_nondiff(
                acts[::g], t, generator=gen.manual_seed(0), policy=policy, return_logits=False, num_samples=g
            ).hard_token_ids

    def score_old():
        with torch.no_grad():
            logits = dec.fwd_tokens(acts, state["ids"]).logits
            score_tokens(logits, state["ids"], policy, diagnostics=True, mask=torch.ones_like(state["ids"]))

    def policy_fwd_bwd():
        out = dec.fwd_tokens(acts, state["ids"], policy=policy)
        (-out.logprobs.float().mean()).backward()

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=False)

    rollout()
    policy_fwd_bwd()
    out: dict = {"activations": n_act, "group": g, "T": t, "trainable_params": sum(p.numel() for p in params)}
    for name, fn in (
        ("rollout", rollout),
        ("score_old", score_old),
        ("policy_fwd_bwd", policy_fwd_bwd),
        ("optimizer", opt_step),
    ):
        out[f"{name}_s"] = median_time(fn, args.repeats, warmup=True)
    total = sum(out[f"{n}_s"] for n in ("rollout", "score_old", "policy_fwd_bwd", "optimizer"))
    out["total_s"] = total
    for n in ("rollout", "score_old", "policy_fwd_bwd", "optimizer"):
        out[f"{n}_share"] = out[f"{n}_s"] / total
    dec.zero_grad(set_to_none=True)
    print("rl_step", json.dumps(out), flush=True)
    return out


def bench_scoring(dec, device, args) -> dict:
    """Full scoring with diagnostics vs a plain log-softmax gather on the same logits."""
    from lens_rl.ops.diagnostics import score_tokens
    from lens_rl.ops.sampling import SamplingPolicy

    v = dec.base.get_output_embeddings().weight.shape[0]
    b, t = args.rollout_activations * args.group, args.rollout_tokens
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(device, dec.base.dtype)
    ids = torch.randint(0, v, (b, t), generator=g).to(device)
    mask = torch.ones_like(ids)
    policy = SamplingPolicy(temperature=1.0, top_p=0.95)

    def plain():
        logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1))

    def full():
        score_tokens(logits, ids, policy, diagnostics=True, mask=mask)

    out = {"batch": b, "T": t, "vocab": v}
    out["plain_s"] = median_time(plain, args.repeats, warmup=True)
    out["score_and_diagnose_s"] = median_time(full, args.repeats, warmup=True)
    out["ratio_full_over_plain"] = out["score_and_diagnose_s"] / out["plain_s"]
    print("scoring", json.dumps(out), flush=True)
    return out


def main() -> None:
    """Run the sections on one model and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--lengths", default="32,128")
    ap.add_argument("--batch", type=int, default=8, help="Activations per differentiable generation.")
    ap.add_argument("--rollout_activations", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="G: samples per activation.")
    ap.add_argument("--rollout_tokens", type=int, default=32)
    ap.add_argument("--dump_samples", type=int, default=4096)
    ap.add_argument("--dump_seq_len", type=int, default=128)
    ap.add_argument("--dump_batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.35)
    ap.add_argument("--no_vllm", action="store_true")
    ap.add_argument("--sections", default="generation,rollouts,dump,rl_step,scoring")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tok, dec = _decoder(args.model_dir, dtype, device)
    cfg = dec.base.config
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "model": {
            "dir": args.model_dir,
            "model_type": cfg.model_type,
            "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers,
            "vocab": cfg.vocab_size,
            "parameters": sum(p.numel() for p in dec.base.parameters()),
            "dtype": args.dtype,
            "prefix_len": dec.prefix_len,
        },
        "errors": {},
    }
    sections = {
        "generation": lambda: bench_generation(dec, device, args),
        "rollouts": lambda: bench_rollouts(dec, args.model_dir, args.dtype, device, args),
        "dump": lambda: bench_dump(args.model_dir, args.dtype, args),
        "rl_step": lambda: bench_rl_step(dec, device, args),
        "scoring": lambda: bench_scoring(dec, device, args),
    }
    for name in args.sections.split(","):
        try:
            report[name] = sections[name]()
        except Exception as e:  # recorded; the other sections still run
            report["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
