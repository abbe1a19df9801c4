"""`make gpu-check`: every GPU figure and GPU test in one command.

On a machine without CUDA it says so and exits 0 without running anything. On a CUDA machine:

1. builds seeded random models of realistic shape locally (no hub; default ``llama-1b`` and
   ``gemma3-1b``, see :mod:`lens_rl.testing.gpu_models`) under ``--cache_dir``;
2. runs the ``gpu``-marked tests (``pytest -m gpu``; ``LENS_RL_GPU_MODEL_DIRS`` points them at the
   built models);
3. runs ``benchmarks/bench_gpu.py`` on each model (kv vs soft generation at T=32/128, vLLM vs HF
   rollout tokens/s at G=8, dump samples/s, RL step split, scoring ratio);
4. writes ``benchmarks/results/gpu_check.json`` (everything, plus the table below as Markdown) and
   prints the table.

    python scripts/gpu_check.py [--models llama-1b,qwen3-1b,gemma3-1b] [--skip_tests]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def no_cuda_message() -> str | None:
    """Why nothing will run here, or None when a CUDA device is usable."""
    import torch

    if torch.cuda.is_available():
        return None
    build = torch.version.cuda or "none (a CPU build of torch)"
    return (
        "gpu-check: no CUDA device here (torch.cuda.is_available() is False; torch "
        f"{torch.__version__}, CUDA build: {build}). Nothing was run.\n"
        "On a machine with an NVIDIA GPU, `make gpu-check` builds ~1B-parameter random models "
        "locally, runs the `gpu` tests and the GPU benchmarks, and writes "
        "benchmarks/results/gpu_check.json and a table for docs/benchmarks.md."
    )


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for pkg in ("transformers", "trl", "vllm", "flash-attn", "deepspeed", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run_gpu_tests(model_dirs: list[Path]) -> dict:
    """``pytest -m gpu`` in a subprocess; the summary counts and the output's tail."""
    env = os.environ | {"LENS_RL_GPU_MODEL_DIRS": os.pathsep.join(map(str, model_dirs))}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = res.stdout + res.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    return {
        "returncode": res.returncode,
        "seconds": time.perf_counter() - t0,
        "counts": counts,
        "tail": out[-6000:],
    }


def run_benchmark(model_dir: Path, out: Path, extra: list[str]) -> dict:
    """``benchmarks/bench_gpu.py`` on one model; its JSON report (or the failure)."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_gpu.py"),
            "--model_dir",
            str(model_dir),
            "--out",
            str(out),
            *extra,
        ],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
    )
    if res.returncode != 0 or not out.exists():
        return {"failed": True, "returncode": res.returncode, "tail": (res.stdout + res.stderr)[-6000:]}
    report = json.loads(out.read_text())
    report["seconds"] = time.perf_counter() - t0
    return report


def _fmt(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def table(results: dict) -> str:
    """The docs table (docs/benchmarks.md): one column per model."""
    names = list(results["benchmarks"])

    def get(name, *path):
        cur = results["benchmarks"][name]
        for p in path:
            if isinstance(cur, list):
                cur = next((r for r in cur if r.get("T") == p), None)
            elif isinstance(cur, dict):
                cur = cur.get(p)
            if cur is None:
                return None
        return cur

    rows = [
        ("parameters (B)", lambda n: _fmt((get(n, "model", "parameters") or 0) / 1e9, ".2f")),
        ("soft / kv-cached time, T=32", lambda n: _fmt(get(n, "generation", 32, "ratio_soft_over_kv"))),
        ("soft / kv-cached time, T=128", lambda n: _fmt(get(n, "generation", 128, "ratio_soft_over_kv"))),
        ("HF rollout tokens/s (G=8)", lambda n: _fmt(get(n, "rollouts", "hf_tokens_per_s"), ".0f")),
        ("vLLM rollout tokens/s (G=8)", lambda n: _fmt(get(n, "rollouts", "vllm_tokens_per_s"), ".0f")),
        ("vLLM / HF tokens/s", lambda n: _fmt(get(n, "rollouts", "ratio_vllm_over_hf_tokens_per_s"))),
        ("vLLM weight sync (s)", lambda n: _fmt(get(n, "rollouts", "vllm_sync_s"))),
        ("dump samples/s (seq 128)", lambda n: _fmt(get(n, "dump", "samples_per_s"), ".0f")),
        (
            "RL step: rollout / score / fwd+bwd / optim (%)",
            lambda n: "/".join(
                _fmt(100 * v, ".0f") if (v := get(n, "rl_step", f"{k}_share")) is not None else "n/a"
                for k in ("rollout", "score_old", "policy_fwd_bwd", "optimizer")
            ),
        ),
        (
            "scoring+diagnostics / plain log-softmax",
            lambda n: _fmt(get(n, "scoring", "ratio_full_over_plain")),
        ),
        (
            "failed sections",
            lambda n: ", ".join(get(n, "errors") or {}) or ("all" if get(n, "failed") else "none"),
        ),
    ]
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fn(n) for n in names) + " |" for label, fn in rows]
    t = results.get("tests") or {}
    if t:
        lines.append("")
        lines.append(
            f"`pytest -m gpu`: {t.get('counts')} (exit {t.get('returncode')}, {t.get('seconds', 0):.0f} s)"
        )
    return "\n".join(lines)


def main() -> int:
    """Run the check; 0 when there is no CUDA device or when everything ran (failures are in the JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-1b,gemma3-1b")
    ap.add_argument("--cache_dir", default=str(ROOT / ".cache" / "lens_rl" / "gpu_models"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--skip_tests", action="store_true")
    ap.add_argument("--skip_bench", action="store_true")
    ap.add_argument("--bench_args", default="", help="Extra arguments for bench_gpu.py (one string).")
    args = ap.parse_args()
    message = no_cuda_message()
    if message is not None:
        print(message)
        return 0

    import torch

    from lens_rl.testing.gpu_models import build_realistic_model

    results: dict = {
        "machine": {"gpu": torch.cuda.get_device_name(), "platform": platform.platform(), **_versions()},
        "command": " ".join(sys.argv),
        "models": {},
        "benchmarks": {},
    }
    dirs = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        path = build_realistic_model(name, Path(args.cache_dir) / name)
        results["models"][name] = {"dir": str(path), "build_s": time.perf_counter() - t0}
        dirs.append(path)
        torch.cuda.empty_cache()
    print(f"gpu-check: models {', '.join(args.models.split(','))} under {args.cache_dir}", flush=True)
    if not args.skip_tests:
        results["tests"] = run_gpu_tests(dirs)
        print(f"gpu-check: pytest -m gpu -> {results['tests']['counts']}", flush=True)
    if not args.skip_bench:
        out_dir = Path(args.out).parent
        for name, path in zip(args.models.split(","), dirs, strict=True):
            print(f"gpu-check: benchmarks on {name}", flush=True)
            results["benchmarks"][name] = run_benchmark(
                path, out_dir / f"gpu_{name}.json", args.bench_args.split()
            )
    results["table_markdown"] = table(results) if results["benchmarks"] else ""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(results["table_markdown"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
