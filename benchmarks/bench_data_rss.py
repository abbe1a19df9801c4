"""Peak resident memory of training over a dump 1x and 8x the size (writes JSON; not a test).

Two synthetic dump splits in the real on-disk format (:mod:`lens_rl.testing.synthetic_dump`)
are written, the second 8x the first; then, in a fresh process for each, either a real SFT run
(``--mode sft``: ``run_sft`` on the small pretrained Llama, ``--steps`` optimizer steps) or the
data path alone (``--mode iterate``: open the dataset, then draw ``--steps`` shuffled batches
through a ``DataLoader`` as the SFT trainer does). Each child reports its peak RSS
(``VmHWM``); with lazily read shards the two peaks should be equal up to noise, whereas
holding the split in memory would add the split's size. Both numbers and their difference are
reported next to the dump sizes (the ratio ``(rss_8x - rss_1x) / (bytes_8x - bytes_1x)`` is
the fraction of the extra data that became resident: ~1 when eager, ~0 when flat).

What remains O(records) is bookkeeping, reported per extra record: the ``DataLoader``'s
``RandomSampler`` holds the epoch's permutation as a Python list (~40 bytes a record), against
``d_model * 2`` bytes a record of ``A`` alone in fp16 (8 KB at d=4096).

    python benchmarks/bench_data_rss.py --out benchmarks/results/data_rss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` of ``/proc/self/status`` (Linux),
    which, unlike ``ru_maxrss``, does not inherit the parent's peak across fork + exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(args: argparse.Namespace) -> None:
    """Run one measured job and print ``{"peak_rss_mb": ..., "seconds": ...}`` as JSON."""
    import torch

    t0 = time.perf_counter()
    if args.mode == "iterate":
        from torch.utils.data import DataLoader

        from lens_rl.data.dataset import ActivationDataset

        ds = ActivationDataset(args.data)
        loader = DataLoader(
            ds, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        it = iter(loader)
        check = 0.0
        for _ in range(args.steps):
            batch = next(it)
            check += float(batch["A"].sum()) + float(batch["A_prime"].sum())
    else:
        from lens_rl.training.sft_config import LensSFTConfig
        from lens_rl.training.sft_trainer import run_sft

        cfg = LensSFTConfig(
            model_name_or_path=args.model_dir,
            train_data=args.data,
            output_dir=args.run_dir,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=max(1, args.steps),
            t_text=4,
            plot=False,
            report_to=[],
        )
        run_sft(cfg)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}))


def measure(
    mode: str, data: Path, steps: int, batch: int, model_dir: str | None = None, run_dir: str | None = None
) -> dict:
    """Run :func:`child` in a fresh interpreter and return its report."""
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--data", str(data)]
    cmd += ["--steps", str(steps), "--batch", str(batch)]
    if model_dir:
        cmd += ["--model_dir", model_dir, "--run_dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(
    root: Path,
    mode: str,
    num_samples: int,
    d_model: int,
    vocab_size: int,
    steps: int,
    batch: int,
    dtype: str = "float32",
    model_dir: str | None = None,
) -> dict:
    """Write the 1x and 8x dumps under ``root`` and measure a child on each."""
    from lens_rl.testing.synthetic_dump import write_synthetic_dump

    rows = {}
    for scale in (1, 8):
        data = write_synthetic_dump(
            root / f"x{scale}",
            num_samples * scale,
            d_model,
            vocab_size=vocab_size,
            shard_size=8192,
            dtype=dtype,
        )
        r = measure(mode, data, steps, batch, model_dir, root / f"run{scale}")
        r["dump_mb"] = _dir_bytes(data) / 2**20
        r["num_samples"] = num_samples * scale
        rows[f"x{scale}"] = r
    grow = rows["x8"]["peak_rss_mb"] - rows["x1"]["peak_rss_mb"]
    extra = rows["x8"]["dump_mb"] - rows["x1"]["dump_mb"]
    return {
        "mode": mode,
        "d_model": d_model,
        "dtype": dtype,
        "steps": steps,
        "batch": batch,
        **rows,
        "rss_growth_mb": grow,
        "dump_growth_mb": extra,
        "resident_fraction_of_extra_data": grow / extra,
        "rss_growth_bytes_per_extra_record": grow * 2**20 / (7 * num_samples),
        "data_bytes_per_record": rows["x8"]["dump_mb"] * 2**20 / (8 * num_samples),
    }


def main() -> None:
    """Measure both modes and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/data_rss.json")
    ap.add_argument("--cache_dir", default=".cache/lens_rl")
    ap.add_argument("--num_samples", type=int, default=65536, help="Samples of the 1x dump.")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["sft", "iterate"], default="iterate", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", help=argparse.SUPPRESS)
    ap.add_argument("--run_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch
    from transformers import AutoConfig

    from lens_rl.cli.pretrain import pretrain_small_lm

    model_dir = str(pretrain_small_lm(Path(args.cache_dir) / "base-llama-d128"))
    mc = AutoConfig.from_pretrained(model_dir)
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "command": " ".join(sys.argv),
        "results": [],
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("LENS_RL_BENCH_TMP")) as tmp:
        for mode, dtype in (("sft", "float32"), ("iterate", "float32"), ("iterate", "bfloat16")):
            root = Path(tmp) / f"{mode}-{dtype}"
            res = compare(
                root,
                mode,
                args.num_samples,
                mc.hidden_size,
                mc.vocab_size,
                args.steps,
                args.batch,
                dtype=dtype,
                model_dir=model_dir if mode == "sft" else None,
            )
            report["results"].append(res)
            print(
                f"{mode:8s} {dtype:9s} dump {res['x1']['dump_mb']:7.1f} MB -> {res['x8']['dump_mb']:7.1f} MB: "
                f"peak RSS {res['x1']['peak_rss_mb']:7.1f} MB -> {res['x8']['peak_rss_mb']:7.1f} MB "
                f"(+{res['rss_growth_mb']:.1f} MB, {100 * res['resident_fraction_of_extra_data']:.1f}% of the "
                f"extra data; {res['rss_growth_bytes_per_extra_record']:.0f} B per extra record of "
                f"{res['data_bytes_per_record']:.0f} B)"
            )
            import shutil

            shutil.rmtree(root)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
