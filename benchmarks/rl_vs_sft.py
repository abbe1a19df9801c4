"""Does RL improve a converged lens more than continued supervised training does, at equal wall-clock?

On the quickstart's base and dump (``make demo`` builds them), in one run on one machine:

1. **converge**: a supervised lens from scratch with the quickstart's recipe
   (``configs/sft_quickstart.yaml``) for ``--converge_steps`` steps, evaluated every
   ``--curve_every`` steps: the curve shows the plateau the later arms start from.
2. **arms**: from that lens, each arm trains for the same wall-clock budget (``--budget_s``; a
   callback stops the Trainer once the budget is spent, the learning rates are constant after a
   short warm-up so no schedule is cut short) with seeds ``--seeds``:
   - continued SFT (``init_lens``) at ``lm_weight`` 0, 0.02 (the recipe's) and 0.1, each at
     learning rate 1e-3 and 2e-4;
   - GRPO over the levers: the quickstart's RL (encoder frozen), with the direction reward,
     with a k3 KL 0.01 to the initial policy, NLA's recipe (encoder co-trained on every rollout
     at 5x the decoder's learning rate, KL to the initial policy, the direction reward, top_p 1;
     at the quickstart's learning rate and 5x lower) and EasyNLA's (encoder on each group's
     best rollout, CISPO, batch-scaled advantages, zero-variance groups filtered, KL to the
     initial policy).
3. Every arm's final lens is evaluated the same way on the whole val split: FVE, FVE under the
   encoder it started from (``fve_frozen_encoder``: the decoder's own gain), LM KL, functional KL.

Writes JSON (per run, per arm mean and spread over seeds, and the verdict of issue #26's test)
and a PNG of the FVE vs LM-KL front. Runs ``--jobs`` arms at once, each with
``OMP_NUM_THREADS = cores // jobs`` (every arm under the same conditions)::

    python benchmarks/rl_vs_sft.py --out benchmarks/results/rl_vs_sft.json \
        --png docs/img/rl_vs_sft.png --budget_s 120 --seeds 0 1 2 --jobs 2

The verdict: a GRPO arm "wins" when its mean point is beyond every continued-SFT arm's by the
issue's margins (>= +0.02 FVE over the best SFT arm at equal or lower LM KL, or >= 25% lower LM
KL than the least-KL SFT arm at equal or higher FVE), by more than the two arms' summed standard
deviations over seeds; "equal" also means within that summed spread. The starting lens counts as an SFT run (continued for zero steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from timing import run_logged, spread
from transformers import AutoTokenizer, TrainerCallback

from lens_rl.config import packaged_config, parse_args
from lens_rl.data.dataset import ActivationDataset
from lens_rl.models.lens import ConsistencyLens
from lens_rl.models.orig import OrigWrapper
from lens_rl.training.evaluate import evaluate_lens
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.rl_stage import run_rl
from lens_rl.training.sft_config import LensSFTConfig
from lens_rl.training.sft_trainer import run_sft

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "lens_rl"
MODEL = CACHE / "base-llama-d128"

# Continued SFT: the quickstart's losses, a constant learning rate after 10 warm-up steps.
# (typed values: they go into a YAML file; the GRPO arms' are command-line strings)
SFT_COMMON = {"learning_rate": 1e-3, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 10}
GRPO_COMMON = {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": "5", "max_steps": "100000"}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft_lm0": ("sft", SFT_COMMON | {"lm_weight": "0.0"}),
    "sft_lm0.02": ("sft", SFT_COMMON | {"lm_weight": "0.02"}),
    "sft_lm0.1": ("sft", SFT_COMMON | {"lm_weight": "0.1"}),
    "sft_lm0_lr2e-4": ("sft", SFT_COMMON | {"lm_weight": "0.0", "learning_rate": 2e-4}),
    "sft_lm0.02_lr2e-4": ("sft", SFT_COMMON | {"lm_weight": "0.02", "learning_rate": 2e-4}),
    "sft_lm0.1_lr2e-4": ("sft", SFT_COMMON | {"lm_weight": "0.1", "learning_rate": 2e-4}),
    "grpo_quickstart": ("grpo", GRPO_COMMON),
    "grpo_direction": ("grpo", GRPO_COMMON | {"reward_type": "direction"}),
    "grpo_kl_initial": (
        "grpo",
        GRPO_COMMON | {"beta": "0.01", "beta_reference": "initial_policy", "top_p": "1.0"},
    ),
    "grpo_nla": (
        "grpo",
        GRPO_COMMON
        | {
            "encoder_mse_weight": "1.0",
            "encoder_learning_rate": "5e-4",
            "beta": "0.01",
            "beta_reference": "initial_policy",
            "top_p": "1.0",
            "reward_type": "direction",
        },
    ),
    "grpo_nla_lowlr": (
        "grpo",
        GRPO_COMMON
        | {
            "learning_rate": "2e-5",
            "encoder_mse_weight": "1.0",
            "encoder_learning_rate": "1e-4",
            "beta": "0.01",
            "beta_reference": "initial_policy",
            "top_p": "1.0",
            "reward_type": "direction",
        },
    ),
    "grpo_easynla": (
        "grpo",
        GRPO_COMMON
        | {
            "encoder_mse_weight": "1.0",
            "encoder_rollouts": "best",
            "encoder_learning_rate": "5e-4",
            "loss_type": "cispo",
            "scale_rewards": "batch",
            "filter_zero_std_groups": "true",
            "beta": "0.01",
            "beta_reference": "initial_policy",
            "top_p": "1.0",
        },
    ),
}
METRICS = ("fve", "fve_frozen_encoder", "lm_kl", "kl_recon", "steps", "train_seconds")


def _splits() -> dict[str, Path]:
    """The quickstart's dump (``outputs/quickstart/summary.json`` names it)."""
    summary = ROOT / "outputs" / "quickstart" / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"{summary} is missing: run `make demo` first (it builds the base and the dump).")
    data = json.loads(summary.read_text())["data"]
    return {k: Path(v) for k, v in data.items()}


def _flags(d: dict[str, str]) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", v)]


# ---------------------------------------------------------------- worker (one arm, one seed)
class WallClockBudget(TrainerCallback):
    """Stop training once ``budget_s`` seconds have passed since it began (checked after each
    optimizer step; ``seconds`` is the time the run actually trained)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        self.seconds = time.perf_counter() - self.t0
        if self.seconds >= self.budget_s:
            control.should_training_stop = True
        return control


def _worker(arm: str, seed: int, start_lens: Path, budget_s: float, out: Path) -> None:
    """Train one arm from ``start_lens`` for ``budget_s`` seconds, evaluate, write ``result.json``."""
    splits = _splits()
    kind, fields = ARMS[arm]
    common = {
        "model_name_or_path": str(MODEL),
        "train_data": str(splits["train"]),
        "output_dir": str(out),
        "seed": str(seed),
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        "logging_steps": "10",
    }
    budget = WallClockBudget(budget_s)
    if kind == "sft":
        # The quickstart's supervised fields without decoder/encoder: the saved lens brings its own.
        recipe = yaml.safe_load(packaged_config("sft_quickstart.yaml").read_text())
        recipe = {k: v for k, v in recipe.items() if k not in ("decoder", "encoder")}
        recipe |= common | {"init_lens": str(start_lens), "max_steps": 100000, "num_completions_to_print": 0}
        recipe |= fields
        config = out.parent / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump(recipe))
        (cfg,) = parse_args([LensSFTConfig], ["--config", str(config)], typecheck=False)
        run_sft(cfg, callbacks=[budget])
    else:
        argv = ["--config", str(packaged_config("rl_quickstart.yaml"))]
        argv += _flags(common | {"sft_lens": str(start_lens)} | fields)
        (cfg,) = parse_args([LensGRPOConfig], argv, typecheck=False)
        run_rl(cfg, callbacks=[budget])
    # One evaluation for every arm: the whole val split, the trainers' evaluation seed.
    lens = ConsistencyLens.from_pretrained(out / "lens")
    start = ConsistencyLens.from_pretrained(start_lens)
    frozen = {n: p.detach() for n, p in start.encoder.named_parameters()}
    train, val = ActivationDataset(splits["train"]), ActivationDataset(splits["val"])
    tok = AutoTokenizer.from_pretrained(MODEL)
    metrics, _ = evaluate_lens(
        lens,
        OrigWrapper.from_pretrained(MODEL),
        val,
        layer=train.layer,
        t_text=cfg.t_text,
        train_mean=train.mean,
        train_var=train.var,
        prefix_ids=torch.tensor([tok(cfg.lm_prefix, add_special_tokens=False)["input_ids"]]),
        tokenizer=tok,
        batch_size=64,
        seed=7919,
        resample_ablation=False,
        num_explanations=0,
        frozen_encoder=frozen,
    )
    history = json.loads((out / "final_metrics.json").read_text()) if kind == "grpo" else {}
    steps = max((h.get("step", 0) for h in history.get("log_history", [])), default=None)
    result = {"arm": arm, "kind": kind, "seed": seed, "train_seconds": round(budget.seconds, 1)}
    result |= {k: float(metrics[k]) for k in ("fve", "fve_frozen_encoder", "lm_kl", "kl_recon")}
    result["steps"] = steps if steps is not None else _sft_steps(out)
    (out / "result.json").write_text(json.dumps(result, indent=2))


def _sft_steps(out: Path) -> int:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(r["step"] for r in rows)


# ---------------------------------------------------------------- driver
def converge(work: Path, steps: int, every: int, threads: int) -> tuple[Path, list[tuple[int, float]], float]:
    """Phase 1: the supervised lens to its plateau (reused when complete); returns the lens, the
    (step, eval FVE) curve and the training seconds."""
    out = work / "converged"
    if not (out / "final_metrics.json").is_file():
        splits = _splits()
        fields = {
            "model_name_or_path": str(MODEL),
            "train_data": str(splits["train"]),
            "val_data": str(splits["val"]),
            "output_dir": str(out),
            "max_steps": str(steps),
            "eval_steps": str(every),
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": "true",
        }
        cmd = [sys.executable, "-m", "lens_rl.cli", "sft", "--config"]
        cmd += [str(ROOT / "lens_rl" / "configs" / "sft_quickstart.yaml"), *_flags(fields)]
        work.mkdir(parents=True, exist_ok=True)
        rc, seconds = run_logged(cmd, threads, work / "converged.log")
        if rc:
            raise SystemExit(f"the converging SFT run failed: see {work / 'converged.log'}")
        (out / "seconds.txt").write_text(f"{seconds:.1f}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(r["step"], r["eval_fve"]) for r in rows if "eval_fve" in r]
    final = json.loads((out / "final_metrics.json").read_text())
    curve.append((steps, final["final"]["fve"] if "final" in final else final["fve"]))
    return out / "lens", sorted(set(curve)), float((out / "seconds.txt").read_text())


def _spread(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    """The two arms' summed standard deviations of ``key`` over seeds."""
    return a[key]["std"] + b[key]["std"]


def verdict(arms: dict[str, dict[str, Any]], start: dict[str, float]) -> dict[str, Any]:
    """Issue #26's test on the arms' means, each margin beyond the summed standard deviations.
    The starting lens counts as a supervised run (continued SFT for zero steps)."""
    sft = {k: v for k, v in arms.items() if v["kind"] == "sft"}
    sft["start"] = {"kind": "sft", **{k: {"mean": start[k], "std": 0.0} for k in ("fve", "lm_kl")}}
    out: dict[str, Any] = {}
    for name, g in arms.items():
        if g["kind"] != "grpo":
            continue
        fve, kl = g["fve"]["mean"], g["lm_kl"]["mean"]

        # "equal" is within the two arms' summed standard deviations: an SFT arm whose FVE is
        # below the GRPO arm's by less than their spread is at equal FVE (and likewise for LM KL)
        below = [s for s in sft.values() if s["lm_kl"]["mean"] <= kl + _spread(g, s, "lm_kl")]
        best = max(below, key=lambda s: s["fve"]["mean"], default=None)
        fve_gain = None if best is None else fve - best["fve"]["mean"]
        fve_ok = best is None or (fve_gain >= 0.02 and fve_gain > g["fve"]["std"] + best["fve"]["std"])
        above = [s for s in sft.values() if s["fve"]["mean"] >= fve - _spread(g, s, "fve")]
        least = min(above, key=lambda s: s["lm_kl"]["mean"], default=None)
        kl_cut = None if least is None else 1 - kl / least["lm_kl"]["mean"]
        kl_ok = (
            least is not None
            and kl_cut >= 0.25
            and (least["lm_kl"]["mean"] - kl) > g["lm_kl"]["std"] + least["lm_kl"]["std"]
        )
        out[name] = {
            "fve_gain_over_best_sft_at_equal_or_lower_lm_kl": None
            if fve_gain is None
            else round(fve_gain, 4),
            "lm_kl_cut_vs_least_sft_at_equal_or_higher_fve": None if kl_cut is None else round(kl_cut, 4),
            # no SFT run at or below its LM KL nor at or above its FVE: it dominates them all
            "wins": bool((best is not None and fve_ok) or kl_ok or (best is None and least is None)),
        }
    return {"per_grpo_arm": out, "any_grpo_arm_wins": any(v["wins"] for v in out.values())}


def plot(arms: dict[str, dict[str, Any]], start: dict[str, float], runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    colours = {"sft": "tab:blue", "grpo": "tab:red"}
    for r in runs:
        ax.scatter(r["lm_kl"], r["fve"], s=10, alpha=0.35, color=colours[r["kind"]])
    for i, (name, a) in enumerate(arms.items()):
        ax.errorbar(
            a["lm_kl"]["mean"],
            a["fve"]["mean"],
            xerr=a["lm_kl"]["std"],
            yerr=a["fve"]["std"],
            fmt="o",
            color=colours[a["kind"]],
            capsize=3,
        )
        ax.annotate(
            name,
            (a["lm_kl"]["mean"], a["fve"]["mean"]),
            fontsize=7,
            xytext=(6, 6 - 10 * (i % 3)),  # staggered: close arms' labels do not overlap
            textcoords="offset points",
        )
    ax.scatter(
        [start["lm_kl"]], [start["fve"]], marker="*", s=160, color="black", label="converged SFT lens (start)"
    )
    ax.scatter([], [], color="tab:blue", label="continued SFT (init_lens)")
    ax.scatter([], [], color="tab:red", label="GRPO")
    ax.set_xlabel("LM KL of the explanations (nats/token, lower = more LM-like)")
    ax.set_ylabel("held-out FVE")
    ax.set_title("Equal wall-clock from a converged lens: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl_vs_sft.json")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "rl_vs_sft.png")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "rl_vs_sft")
    p.add_argument("--converge_steps", type=int, default=3000)
    p.add_argument("--curve_every", type=int, default=250)
    p.add_argument("--budget_s", type=float, default=120.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("ARM", "SEED", "START_LENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        arm, seed, start = a.worker
        _worker(arm, int(seed), Path(start), a.budget_s, a.work / f"{arm}-seed{seed}")
        return
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    start_lens, curve, converge_s = converge(a.work, a.converge_steps, a.curve_every, os.cpu_count() or 1)
    print(f"converged lens: {start_lens} (curve {curve})", flush=True)
    start_metrics = json.loads((start_lens.parent / "final_metrics.json").read_text())
    start_metrics = start_metrics.get("final", start_metrics)

    def one(job: tuple[str, int]) -> dict[str, Any] | None:
        arm, seed = job
        out = a.work / f"{arm}-seed{seed}"
        if not (out / "result.json").is_file():
            cmd = [sys.executable, __file__, "--work", str(a.work), "--budget_s", str(a.budget_s)]
            cmd += ["--worker", arm, str(seed), str(start_lens)]
            out.parent.mkdir(parents=True, exist_ok=True)
            rc, wall = run_logged(cmd, threads, a.work / f"{arm}-seed{seed}.log")
            print(f"{arm} seed {seed}: rc {rc}, {wall:.0f} s", flush=True)
            if rc:
                return None
        return json.loads((out / "result.json").read_text())

    jobs = [(arm, seed) for seed in a.seeds for arm in a.arms]
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = [r for r in pool.map(one, jobs) if r is not None]
    if len(runs) < len(jobs):
        failed = sorted(
            {f"{arm}-seed{seed}" for arm, seed in jobs} - {f"{r['arm']}-seed{r['seed']}" for r in runs}
        )
        print(f"failed runs (logs in {a.work}): {failed}", flush=True)
    arms: dict[str, dict[str, Any]] = {}
    for name in a.arms:
        rs = [r for r in runs if r["arm"] == name]
        if rs:
            arms[name] = {"kind": rs[0]["kind"], "seeds": len(rs), "flags": ARMS[name][1]}
            arms[name] |= {m: spread([float(r[m]) for r in rs]) for m in METRICS}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "threads_per_arm": threads, "jobs": a.jobs},
        "budget_s": a.budget_s,
        "converged": {
            "steps": a.converge_steps,
            "seconds": converge_s,
            "curve": curve,
            "final": {
                k: start_metrics[k] for k in ("fve", "lm_kl", "kl_recon", "nmse") if k in start_metrics
            },
        },
        "arms": arms,
        "verdict": verdict(arms, start_metrics),
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    plot(arms, start_metrics, runs, a.png)
    print(json.dumps({k: result[k] for k in ("converged", "verdict")}, indent=2))
    print(markdown_table(arms, start_metrics))


def markdown_table(arms: dict[str, dict[str, Any]], start: dict[str, float]) -> str:
    """The arms as the docs page's table (mean ± std over seeds)."""

    def cell(a: dict[str, Any], key: str, digits: int) -> str:
        return f"{a[key]['mean']:.{digits}f} ± {a[key]['std']:.{digits}f}"

    lines = [
        "| arm | held-out FVE | FVE, starting encoder | LM KL | functional KL | steps in the budget |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| start (converged SFT lens) | {start['fve']:.3f} | {start['fve']:.3f} | {start['lm_kl']:.2f} | "
        f"{start['kl_recon']:.3f} | |",
    ]
    for name, a in arms.items():
        lines.append(
            f"| `{name}` | {cell(a, 'fve', 3)} | {cell(a, 'fve_frozen_encoder', 3)} | {cell(a, 'lm_kl', 2)} | "
            f"{cell(a, 'kl_recon', 3)} | {a['steps']['mean']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
