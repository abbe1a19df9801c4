"""Shared helpers of the benchmark scripts (run from the repository root): timing a function,
running a job with its log, and the spread of a metric over seeds."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn: Callable[[], object], repeats: int, warmup: bool = False) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (CUDA synchronised when present)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_logged(cmd: list[str], threads: int, log: Path) -> tuple[int, float]:
    """Run ``cmd`` from the repository root with ``threads`` OpenMP threads and offline, its
    output to ``log``; ``(exit code, wall seconds)``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return rc, time.perf_counter() - t0


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, range and count of ``values`` (rounded to 4 places)."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }
