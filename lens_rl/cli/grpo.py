"""``lens-rl grpo``: GRPO fine-tuning of a lens on TRL (``LensGRPOConfig``; under
``accelerate launch -m lens_rl.cli grpo`` for N processes)."""

from __future__ import annotations

from typing import Any

from lens_rl.cli.common import resolve_config
from lens_rl.config import parse_args
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.rl_stage import run_rl


def main(argv: list[str]) -> dict[str, Any]:
    """Parse the config and train; returns metrics before and after."""
    (cfg,) = parse_args([LensGRPOConfig], resolve_config(argv), typecheck=False)
    return run_rl(cfg)
