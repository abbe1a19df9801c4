"""Trainer-vs-sampler mismatch of the RL stage in fp32 and bf16 (writes JSON; not a test).

For a trained lens (default: the quickstart's) and held-out activations, explanations are
sampled by each rollout backend (the HF generator; vLLM with prompt_embeds and the lens's
decoder base synced into the engine, as the RL trainer does) under the RL sampling policy, then scored by the trainer's teacher-forced ``fwd_tokens``, all with the model
loaded in ``model_dtype``. Per token it reports |log q_trainer - log q_sampler| (nats) and the
importance-ratio statistics, with the project's correction (both log-probs under the same
top-p/temperature policy) and without it (TRL's ratio: the trainer's full-softmax log-prob over
the sampler's processed log-prob, whose mean is the kept nucleus mass, not 1).

    python benchmarks/bench_mismatch.py --out benchmarks/results/mismatch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch

from lens_rl.data.dataset import ActivationDataset
from lens_rl.models.families import load_causal_lm
from lens_rl.models.lens import ConsistencyLens
from lens_rl.models.loading import DTYPES
from lens_rl.ops.importance import mismatch_stats, token_log_ratio
from lens_rl.ops.sampling import SamplingPolicy


def _stats(trainer_logq, trainer_full_logp, sampler_lp) -> dict[str, float]:
    mask = torch.ones_like(sampler_lp, dtype=torch.long)
    corrected = token_log_ratio(trainer_logq, sampler_lp, mask)
    trl = token_log_ratio(trainer_full_logp, sampler_lp, mask)
    out = mismatch_stats(corrected, mask, prefix="corrected/")
    ratio = corrected[torch.isfinite(corrected)].exp()
    out["corrected/ratio_std"] = float(ratio.std())
    out["corrected/ratio_min"] = float(ratio.min())
    out["corrected/ratio_max"] = float(ratio.max())
    out.update(mismatch_stats(trl, mask, prefix="trl_full_softmax/"))
    return out


def main() -> None:
    """Measure both backends in both dtypes and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/mismatch.json")
    ap.add_argument("--lens", default="outputs/quickstart/sft/lens")
    ap.add_argument(
        "--activations",
        default=None,
        help="a dump split folder (default: the quickstart's val split, from outputs/quickstart/summary.json)",
    )
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--t_text", type=int, default=8)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no_vllm", action="store_true")
    args = ap.parse_args()
    if args.activations is None:
        args.activations = json.loads(Path("outputs/quickstart/summary.json").read_text())["data"]["val"]
    policy = SamplingPolicy(temperature=args.temperature, top_p=args.top_p)
    meta = json.loads((Path(args.lens) / "lens_config.json").read_text())["meta"]
    model_dir = meta["model_name_or_path"]
    acts = ActivationDataset(args.activations).A[: args.num].float()
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "setup": {
            "lens": args.lens,
            "activations": args.num,
            "t_text": args.t_text,
            "top_p": args.top_p,
            "temperature": args.temperature,
        },
        "results": {},
    }
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        lens = ConsistencyLens.from_pretrained(args.lens, base=load_causal_lm(model_dir, dtype=dtype)).to(
            dtype
        )
        lens.eval()
        dec = lens.decoder
        a = acts.to(dtype)
        samplers = {}
        with torch.no_grad():
            gen = dec.generate_soft_kv_cached_nondiff(
                a, args.t_text, generator=torch.Generator().manual_seed(0), policy=policy, return_logits=False
            )
            samplers["hf"] = (gen.hard_token_ids, gen.logprobs.float())
            if not args.no_vllm:
                from lens_rl.generation.vllm_backend import VLLMBackend

                engine = VLLMBackend(model_dir, dtype=name, seed=0)
                if any(p.requires_grad for p in dec.base.parameters()):  # a trained decoder base,
                    engine.sync_weights(dec.base.state_dict().items())  # as the RL trainer syncs it
                out = engine.generate(
                    policy=policy,
                    n=1,
                    max_new_tokens=args.t_text,
                    seed=0,
                    prompt_embeds=list(dec.prompt_embeds(a)),
                    ignore_eos=True,
                )
                ids = torch.tensor([r[0] for r in out.token_ids])
                samplers["vllm"] = (ids, torch.tensor([r[0] for r in out.logprobs], dtype=torch.float32))
                del engine
            for backend, (ids, sampler_lp) in samplers.items():
                scored = dec.fwd_tokens(a, ids, policy=policy)
                full = torch.log_softmax(scored.logits.float() / args.temperature, -1)
                full = full.gather(-1, ids[..., None])[..., 0]
                stats = _stats(scored.logprobs.float(), full, sampler_lp)
                report["results"][f"{backend}/{name}"] = stats
                print(
                    f"{backend:5s} {name:9s} |dlogq| mean {stats['corrected/log_ratio_abs_mean']:.2e} max "
                    f"{stats['corrected/log_ratio_abs_max']:.2e}; ratio mean {stats['corrected/ratio_mean']:.4f} "
                    f"[{stats['corrected/ratio_min']:.3f}, {stats['corrected/ratio_max']:.3f}]; TRL ratio mean "
                    f"{stats['trl_full_softmax/ratio_mean']:.4f}; outside support "
                    f"{stats['corrected/outside_support']:.0f}"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
