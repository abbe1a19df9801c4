"""``lens-rl sft``: supervised lens training (``LensSFTConfig`` on transformers.Trainer; under
``accelerate launch -m lens_rl.cli sft`` for N processes)."""

from __future__ import annotations

from lens_rl.cli.common import resolve_config
from lens_rl.config import parse_args
from lens_rl.training.sft_config import LensSFTConfig
from lens_rl.training.sft_trainer import run_sft


def main(argv: list[str]) -> dict[str, float]:
    """Parse the config and train; returns the final evaluation."""
    (cfg,) = parse_args([LensSFTConfig], resolve_config(argv), typecheck=False)
    return run_sft(cfg)["final"]
