"""Shared timing helper of the benchmark scripts (run from the repository root)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


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
