"""Spread of the quickstart's figures over base-model seeds and lens seeds.

The README's quickstart figures are what ``make demo`` prints; this measures how far they move
when the base model is pretrained with another seed (``--base_seed``) and when the lens is
trained with another seed (``--seed``). Each run is ``python -m lens_rl.cli demo`` in a fresh
process, exactly the quickstart, with its own output folder; bases are cached per seed (the
pretraining is bit-reproducible, see ``lens_rl.cli.pretrain``). The baseline in the same run is
the mean-activation predictor's FVE, which every quickstart run reports next to the lens's.

    python benchmarks/quickstart_spread.py --base_seeds 0 1 2 --lens_seeds 0 1 2 --jobs 2 \
        --out benchmarks/results/quickstart_spread.json

``--jobs N`` runs N quickstarts at once, each with ``OMP_NUM_THREADS = cores // N`` (the
thread count moves a lens's last digits: ``threads`` is recorded per run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from timing import run_logged, spread

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("fve", "baseline_mean_fve", "nmse", "kl_recon", "lm_kl")


def summarize(runs: list[dict], base_seeds: list[int]) -> dict:
    """Spread over all runs and per base; the lens's margin over the mean-activation baseline and
    GRPO's paired change (after - before, same lens) per run."""
    ok = [r for r in runs if r["returncode"] == 0 and "fve" in r]
    out: dict = {
        "runs": runs,
        "failed": [r for r in runs if r not in ok],
        "over_all_runs": {
            m: spread([r[m] for r in ok]) for m in (*METRICS, "fve_after_grpo") if ok and m in ok[0]
        },
        "per_base": {
            str(b): spread([r["fve"] for r in ok if r["base_seed"] == b])
            for b in base_seeds
            if any(r["base_seed"] == b for r in ok)
        },
        "lens_minus_baseline_fve": spread([r["fve"] - r["baseline_mean_fve"] for r in ok]) if ok else None,
    }
    gains = [r["fve_after_grpo"] - r["fve"] for r in ok if r.get("fve_after_grpo") is not None]
    if gains:
        out["grpo_fve_change"] = {**spread(gains), "runs_improved": sum(g > 0 for g in gains)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base_seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lens_seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rl_steps", type=int, default=None, help="passed to the demo (0 skips GRPO)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cache_dir", default=str(ROOT / ".cache" / "lens_rl"))
    ap.add_argument("--work_dir", default=str(ROOT / "outputs" / "quickstart_spread"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart_spread.json"))
    ap.add_argument("--summarize_only", action="store_true", help="recompute the summary of --out's runs")
    args = ap.parse_args()
    if args.summarize_only:
        prev = json.loads(Path(args.out).read_text())
        bases = sorted({r["base_seed"] for r in prev["runs"]})
        Path(args.out).write_text(
            json.dumps({"command": prev["command"], **summarize(prev["runs"], bases)}, indent=2)
        )
        print(json.dumps(summarize(prev["runs"], bases)["grpo_fve_change"], indent=2))
        return
    from lens_rl.cli.demo import base_model_dir

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    demo = [sys.executable, "-m", "lens_rl.cli", "demo", "--cache_dir", args.cache_dir]

    # Bases and their dumps first (one process per base), so no two runs build the same base
    # or write the same dump (a second concurrent dump is refused by its lock).
    def pretrain(b: int) -> tuple[int, float]:
        code = (
            "from lens_rl.cli.demo import prepare_base_and_dump; "
            f"prepare_base_and_dump({args.cache_dir!r}, {b})"
        )
        return run_logged([sys.executable, "-c", code], threads, work / f"pretrain_base{b}.log")

    with ThreadPoolExecutor(args.jobs) as pool:
        for b, (rc, _) in zip(args.base_seeds, pool.map(pretrain, args.base_seeds), strict=True):
            if rc != 0:
                raise SystemExit(f"pretraining base seed {b} failed; see {work / f'pretrain_base{b}.log'}")

    def one(bs: tuple[int, int]) -> dict:
        b, s = bs
        out = work / f"base{b}_seed{s}"
        cmd = demo + ["--base_seed", str(b), "--seed", str(s), "--output_dir", str(out)]
        if args.rl_steps is not None:
            cmd += ["--rl_steps", str(args.rl_steps)]
        rc, secs = run_logged(cmd, threads, work / f"base{b}_seed{s}.log")
        rec: dict = {
            "base_seed": b,
            "lens_seed": s,
            "returncode": rc,
            "seconds": round(secs, 1),
            "threads": threads,
        }
        if (out / "summary.json").exists():
            summary = json.loads((out / "summary.json").read_text())
            rec.update({k: round(float(summary["final"][k]), 4) for k in METRICS if k in summary["final"]})
            if "rl" in summary:
                rec["fve_after_grpo"] = summary["rl"]["fve_after"]
        recipe = base_model_dir(args.cache_dir, b) / "recipe.json"
        rec["base_weights_sha256"] = json.loads(recipe.read_text()).get("weights_sha256")
        print(json.dumps(rec), flush=True)
        return rec

    pairs = [(b, s) for b in args.base_seeds for s in args.lens_seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, pairs))
    result = {"command": " ".join(sys.argv), **summarize(runs, args.base_seeds)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["over_all_runs"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
