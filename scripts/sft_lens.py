"""Supervised consistency-lens training.

accelerate launch scripts/sft_lens.py --config configs/sft_quickstart.yaml
accelerate launch --config_file configs/accelerate/ddp.yaml scripts/sft_lens.py --config ... --resume
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse the config and train; returns the final evaluation metrics."""
    from lens_rl.config import parse_args
    from lens_rl.training.sft_config import SFTConfig
    from lens_rl.training.sft_trainer import SFTTrainer

    (cfg,) = parse_args([SFTConfig], argv)
    return SFTTrainer(cfg).train()


if __name__ == "__main__":
    main(sys.argv[1:])
