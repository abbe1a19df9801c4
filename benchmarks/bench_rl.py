"""Benchmark the RL stage's parts (writes JSON; not a test).

On the quickstart base model (pretrained if not cached) and a fresh single-layer lens:

1. rollout throughput (tokens/s): the decoder's HF generator vs vLLM with ``prompt_embeds``,
   for several group sizes G (B activations x G samples x T tokens);
2. one RL step split into rollout (HF), scoring (no-grad ``fwd_tokens`` + diagnostics, the
   importance weights' log q) and update (``fwd_tokens`` with grad + backward + AdamW step);
3. the vLLM weight sync of a trainable decoder base, against one vLLM rollout.

    python benchmarks/bench_rl.py --out benchmarks/results/rl.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import median_time


def main() -> None:
    """Run the rollout and step-split benchmarks and write the JSON report."""
    from transformers import AutoTokenizer

    from lens_rl.cli.pretrain import pretrain_small_lm
    from lens_rl.models import DecoderConfig, EncoderConfig
    from lens_rl.models.lens import ConsistencyLens
    from lens_rl.models.orig import OrigWrapper
    from lens_rl.ops.diagnostics import score_tokens
    from lens_rl.ops.sampling import SamplingPolicy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/rl.json")
    ap.add_argument("--cache_dir", default=".cache/lens_rl")
    ap.add_argument("--activations", type=int, default=8)
    ap.add_argument("--groups", default="4,16")
    ap.add_argument("--t", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no_vllm", action="store_true")
    args = ap.parse_args()

    model_dir = pretrain_small_lm(Path(args.cache_dir) / "base-llama-d128")
    tok = AutoTokenizer.from_pretrained(model_dir)
    orig = OrigWrapper.from_pretrained(model_dir)
    lens = ConsistencyLens.build(orig.model, tok, DecoderConfig(), EncoderConfig())
    dec = lens.decoder
    policy = SamplingPolicy(temperature=1.0, top_p=0.95)
    d = orig.model.config.hidden_size
    acts = torch.randn(args.activations, d, generator=torch.Generator().manual_seed(0))
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "model": str(model_dir),
        "activations": args.activations,
        "T": args.t,
        "rollouts": [],
    }
    vllm = None
    if not args.no_vllm:
        try:
            from lens_rl.generation.vllm_backend import VLLMBackend

            vllm = VLLMBackend(model_dir, seed=0)
        except ImportError:
            vllm = None
    embeds = list(dec.prompt_embeds(acts).detach())

    def hf_rollout(g_count: int):
        """The trainer's HF rollout: prefix encoded once per activation, cache expanded over G."""
        return dec.generate_soft_kv_cached_nondiff(
            acts,
            args.t,
            generator=torch.Generator().manual_seed(0),
            policy=policy,
            num_samples=g_count,
            return_logits=False,
        )

    for g_count in [int(x) for x in args.groups.split(",")]:
        tokens = args.activations * g_count * args.t

        def hf(g_count=g_count):
            hf_rollout(g_count)

        row = {"G": g_count, "hf_tokens_per_s": tokens / median_time(hf, args.repeats, warmup=True)}
        if vllm is not None:

            def vl(g_count=g_count):
                vllm.generate(
                    policy=policy,
                    n=g_count,
                    max_new_tokens=args.t,
                    seed=0,
                    prompt_embeds=embeds,
                    ignore_eos=True,
                )

            row["vllm_tokens_per_s"] = tokens / median_time(vl, args.repeats, warmup=True)
            row["vllm_over_hf"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
        report["rollouts"].append(row)
        print(json.dumps(row))

    if vllm is not None:  # weight sync of a trainable base, against one vLLM rollout of G = first
        base_sd = dec.base.state_dict()
        sync = median_time(lambda: vllm.sync_weights(base_sd.items()), args.repeats, warmup=True)
        g0 = report["rollouts"][0]
        rollout_s = args.activations * g0["G"] * args.t / g0["vllm_tokens_per_s"]
        report["vllm_sync"] = {"seconds": sync, "over_one_vllm_rollout": sync / rollout_s, "G": g0["G"]}
        print(json.dumps(report["vllm_sync"]))

    # One step's parts, G = the first group size.
    g_count = int(args.groups.split(",")[0])
    rep = acts.repeat_interleave(g_count, 0)
    gen = hf_rollout(g_count)
    ids = gen.hard_token_ids
    opt = torch.optim.AdamW([p for p in lens.parameters() if p.requires_grad], lr=1e-4)
    adv = torch.randn(ids.shape[0], 1, generator=torch.Generator().manual_seed(1))

    def rollout():
        hf_rollout(g_count)

    from lens_rl.training.grpo_trainer import _score_rollouts

    mask = torch.ones_like(ids)

    def scoring():
        """The trainer's rollout scoring: one pass, one vocabulary sweep (log q, H(q), diagnostics)."""
        with torch.no_grad():
            _score_rollouts(lens, rep, ids, mask, policy, tok.eos_token_id)

    def scoring_before():
        """The trainer's scoring before the one-scorer change (session 3): fwd_tokens scored the
        tokens itself (full log q + entropy), then the diagnostics sweep, then a third full
        tempered log-softmax for TRL's ratio."""
        with torch.no_grad():
            logits = dec.fwd_tokens(rep, ids, scores=False).logits
            log_q = policy.log_probs(logits)
            log_q.gather(-1, ids[..., None])
            (log_q.exp() * log_q.nan_to_num(neginf=0.0)).sum(-1)
            score_tokens(logits, ids, policy, diagnostics=True, mask=mask, eos_token_id=tok.eos_token_id)
            torch.log_softmax(logits.float() / policy.temperature, -1).gather(-1, ids[..., None])

    def bare():
        """The floor: the same forward + one log-softmax + gather."""
        with torch.no_grad():
            logits = dec.fwd_tokens(rep, ids, scores=False).logits
            torch.log_softmax(logits, -1).gather(-1, ids[..., None])

    def update():
        out = dec.fwd_tokens(rep, ids, policy=policy)
        (-(adv * out.logprobs).mean()).backward()
        opt.step()
        opt.zero_grad()

    split = {
        name: median_time(fn, args.repeats, warmup=True)
        for name, fn in (("rollout", rollout), ("scoring", scoring), ("update", update))
    }
    total = sum(split.values())
    report["step_split_s"] = split
    score_cmp = {
        name: median_time(fn, max(args.repeats, 5), warmup=True)
        for name, fn in (("bare", bare), ("before", scoring_before), ("after", scoring))
    }
    report["rollout_scoring_s"] = score_cmp
    report["rollout_scoring_speed_vs_bare"] = {
        "before": score_cmp["bare"] / score_cmp["before"],
        "after": score_cmp["bare"] / score_cmp["after"],
        "after_over_before": score_cmp["before"] / score_cmp["after"],
    }
    print(json.dumps(report["rollout_scoring_speed_vs_bare"]))
    report["step_split_fraction"] = {k: v / total for k, v in split.items()}
    print(json.dumps(report["step_split_fraction"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
