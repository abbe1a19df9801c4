"""Benchmark the supervised stage (writes JSON; not a test).

1. Activation-dump throughput (samples/s) vs a plain no-grad forward over the same windows
   (the ratio shows the dumper's overhead: position gather, dtype cast, shard writing).
2. SFT step time split into decoder generation (kv-cached, forward + backward share), encoder,
   functional KL and optimizer step, measured by timing each part separately on the same batch.

    python benchmarks/bench_sft.py --out benchmarks/results/sft.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import median_time

from lens_rl.cli.pretrain import pretrain_small_lm
from lens_rl.data.dump import run_dump
from lens_rl.data.windows import build_windows, tokenize_corpus
from lens_rl.metrics import functional_kl, reconstruct
from lens_rl.models import DecoderConfig, EncoderConfig
from lens_rl.models.lens import ConsistencyLens
from lens_rl.models.orig import OrigWrapper
from lens_rl.testing.configs import tiny_dump_config


def main() -> None:
    """Run both benchmarks and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/sft.json")
    ap.add_argument("--cache_dir", default=".cache/lens_rl")
    ap.add_argument("--num_train", type=int, default=3584)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--t_text", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model_dir = pretrain_small_lm(Path(args.cache_dir) / "base-llama-d128")
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        }
    }

    # 1. dump throughput vs plain forward
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_dump_config(
            model_dir, tmp, num_train=args.num_train, num_val=0, shard_size=2048, batch_size=64
        )
        t0 = time.perf_counter()
        run_dump(cfg)
        dump_s = time.perf_counter() - t0
    orig = OrigWrapper.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    from lens_rl.data.corpus import pydoc_topics

    windows = build_windows(
        tokenize_corpus(pydoc_topics(), tok), 32, args.num_train, 0, min_pos=4, strategy="random", seed=0
    )["train"]
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, args.num_train, 64):
            orig.model(input_ids=windows.input_ids[b : b + 64])
    fwd_s = time.perf_counter() - t0
    report["dump"] = {
        "samples": args.num_train,
        "dump_s_including_model_load_and_tokenisation": dump_s,
        "dump_samples_per_s": args.num_train / dump_s,
        "plain_forward_s": fwd_s,
        "plain_forward_samples_per_s": args.num_train / fwd_s,
        "dump_over_forward_time": dump_s / fwd_s,
    }
    print(json.dumps(report["dump"]))

    # 2. SFT step split
    lens = ConsistencyLens.build(
        orig.model,
        tok,
        DecoderConfig(trainable_base=True),
        EncoderConfig(trainable_base=True),
        share_base=True,
    )
    opt = torch.optim.AdamW([p for p in lens.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator()
    ids = windows.input_ids[: args.batch]
    pos = windows.token_pos[: args.batch]
    a = orig.capture(ids, 1, pos)
    var = torch.ones(a.shape[1])
    batch = {"input_ids": ids, "token_pos": pos, "A": a}

    def gen_fb():
        gen = lens.decoder.generate_soft_kv_cached(a, args.t_text, generator=g.manual_seed(0))
        gen.generated_text_embeddings.pow(2).mean().backward()

    def enc_fb():
        emb = torch.randn(args.batch, args.t_text, a.shape[1], generator=g.manual_seed(1))
        reconstruct(lens.encoder(emb), a, train_var=var, dtype=torch.float32).nmse.mean().backward()

    def kl_fb():
        new = (a + 0.1).requires_grad_(True)
        functional_kl(orig, batch, 1, new).mean().backward()

    def full_step():
        gen = lens.decoder.generate_soft_kv_cached(a, args.t_text, generator=g.manual_seed(0))
        a_hat = lens.encoder(gen.generated_text_embeddings)
        (
            reconstruct(a_hat, a, train_var=var, dtype=torch.float32).nmse.mean()
            + functional_kl(orig, batch, 1, a_hat).mean()
        ).backward()
        opt.step()
        opt.zero_grad()

    def opt_step():
        for p in lens.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()

    parts = {
        "generation_fwd_bwd": gen_fb,
        "encoder_fwd_bwd": enc_fb,
        "functional_kl_fwd_bwd": kl_fb,
        "optimizer_step": opt_step,
        "full_step": full_step,
    }
    for fn in parts.values():
        fn()  # warm-up
    split = {name: median_time(fn, args.repeats) for name, fn in parts.items()}
    parts_sum = sum(v for k, v in split.items() if k != "full_step")
    split["fractions_of_parts_sum"] = {k: v / parts_sum for k, v in split.items() if k != "full_step"}
    split.update({"batch": args.batch, "t_text": args.t_text})
    report["sft_step"] = split
    print(json.dumps(split))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
