"""``lens-rl probe``: the entropy probe (``EntropyProbeConfig``): predicted vs measured entropy
change of one GRPO update."""

from __future__ import annotations

from typing import Any

from lens_rl.cli.common import resolve_config
from lens_rl.config import parse_args
from lens_rl.probe.config import EntropyProbeConfig
from lens_rl.probe.runner import run_entropy_probe


def main(argv: list[str]) -> dict[str, Any]:
    """Parse the config and probe; returns the results."""
    (cfg,) = parse_args([EntropyProbeConfig], resolve_config(argv))
    return run_entropy_probe(cfg)
