"""Benchmark the decoder's generators (writes JSON; not a test).

1. ``generate_soft`` vs ``generate_soft_kv_cached``, forward + backward, T in {8, 32, 128}:
   median wall time and the bytes of tensors saved for backward (the graph's memory; on CUDA
   also ``max_memory_allocated``). The ratio soft / kv is the figure of merit.
2. ``generate_soft_kv_cached_nondiff`` vs HF ``generate`` with the same sampling settings
   (temperature, top-p), same prompt embeddings, same number of new tokens: the time ratio.
3. Group rollouts (``num_samples=G``: prefix once, KV cache expanded) vs repeated activations.

Ratios are taken within one run, so machine noise mostly cancels.

    python benchmarks/bench_generation.py --out benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import median_time
from transformers import AutoModelForCausalLM, LlamaConfig

from lens_rl.data.corpus import pydoc_topics
from lens_rl.models import Decoder, DecoderConfig
from lens_rl.models.tokenizer import train_bpe_tokenizer
from lens_rl.ops.sampling import SamplingPolicy


def _saved_bytes(fn) -> tuple[object, int]:
    """Run ``fn`` and count the bytes of distinct storages autograd saves for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def main() -> None:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/generation.json")
    ap.add_argument("--lengths", default="8,32,128")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_bpe_tokenizer(pydoc_topics(), Path(tmp) / "tok", vocab_size=1024)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            max_position_embeddings=512,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(Path(tmp) / "model")
        base = (
            AutoModelForCausalLM.from_pretrained(Path(tmp) / "model", dtype=torch.float32).to(device).eval()
        )
    dec = Decoder.from_base(base, tok, DecoderConfig(), share_weights=True).to(device)
    a = torch.randn(args.batch, args.hidden, device=device, generator=torch.Generator(device).manual_seed(0))
    gen_device = torch.Generator(device)

    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "model": {
            "arch": "llama",
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": len(tok),
            "prefix_len": dec.prefix_len,
            "batch": args.batch,
        },
        "diff": [],
        "rollout": [],
    }

    for T in lengths:
        row = {"T": T}
        for name in ("generate_soft", "generate_soft_kv_cached"):
            fn = getattr(dec, name)

            def step(fn=fn, T=T):
                gen_device.manual_seed(0)
                out = fn(a, T, generator=gen_device)
                (
                    out.generated_text_embeddings.pow(2).mean() + out.raw_lm_logits.logsumexp(-1).mean()
                ).backward()
                dec.zero_grad(set_to_none=True)

            _, saved = _saved_bytes(lambda fn=fn, T=T: fn(a, T, generator=gen_device.manual_seed(0)))
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            step()  # warm-up
            row[f"{name}_s"] = median_time(step, args.repeats)
            row[f"{name}_saved_MiB"] = saved / 2**20
            if torch.cuda.is_available():
                row[f"{name}_cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        row["speedup_kv_over_soft"] = row["generate_soft_s"] / row["generate_soft_kv_cached_s"]
        row["memory_ratio_soft_over_kv"] = (
            row["generate_soft_saved_MiB"] / row["generate_soft_kv_cached_saved_MiB"]
        )
        results["diff"].append(row)
        print(json.dumps(row))

    policy = SamplingPolicy(temperature=0.8, top_p=0.9)
    prompt = dec.prompt_embeds(a).detach()
    for T in lengths:

        def ours(T=T):
            dec.generate_soft_kv_cached_nondiff(
                a, T, generator=gen_device.manual_seed(0), policy=policy, return_logits=False
            )

        def hf(T=T):
            with torch.inference_mode():
                base.generate(
                    inputs_embeds=prompt,
                    attention_mask=torch.ones(prompt.shape[:2], device=device, dtype=torch.long),
                    do_sample=True,
                    temperature=policy.temperature,
                    top_p=policy.top_p,
                    top_k=0,
                    max_new_tokens=T,
                    min_new_tokens=T,
                    pad_token_id=tok.pad_token_id,
                )

        ours()
        hf()
        row = {
            "T": T,
            "nondiff_s": median_time(ours, args.repeats),
            "hf_generate_s": median_time(hf, args.repeats),
        }
        row["nondiff_over_hf"] = row["nondiff_s"] / row["hf_generate_s"]
        results["rollout"].append(row)
        print(json.dumps(row))

    # Group rollouts: prefix encoded once + KV cache expanded over G, vs repeating the activation.
    results["group"] = []
    a_small = a[:2]
    for g_count in (4, 16):

        def grouped(g_count=g_count):
            dec.generate_soft_kv_cached_nondiff(
                a_small, 32, generator=gen_device.manual_seed(0), num_samples=g_count, return_logits=False
            )

        def repeated(g_count=g_count):
            dec.generate_soft_kv_cached_nondiff(
                a_small.repeat_interleave(g_count, 0),
                32,
                generator=gen_device.manual_seed(0),
                return_logits=False,
            )

        grouped()
        repeated()
        row = {
            "G": g_count,
            "activations": 2,
            "T": 32,
            "grouped_s": median_time(grouped, args.repeats),
            "repeated_s": median_time(repeated, args.repeats),
        }
        row["repeated_over_grouped"] = row["repeated_s"] / row["grouped_s"]
        results["group"].append(row)
        print(json.dumps(row))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
