"""``lens-rl dump``: activations after block L over a corpus (``DumpConfig``; resumable, N processes)."""

from __future__ import annotations

from pathlib import Path

from lens_rl.cli.common import resolve_config
from lens_rl.config import parse_args
from lens_rl.data.dump import DumpConfig, run_dump


def main(argv: list[str]) -> dict[str, Path]:
    """Dump activations; print and return the split folders."""
    (cfg,) = parse_args([DumpConfig], resolve_config(argv))
    splits = run_dump(cfg)
    for split, path in splits.items():
        print(f"{split}: {path}")  # noqa: T201 - the command's output
    return splits
