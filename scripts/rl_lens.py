"""GRPO fine-tuning of a consistency lens on TRL.

    accelerate launch scripts/rl_lens.py --config configs/rl_quickstart.yaml \
        --model_name_or_path MODEL_DIR --sft_lens outputs/sft/lens \
        --train_data .../layer_1/train --val_data .../layer_1/val --output_dir outputs/rl
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse the config and run the RL stage; returns metrics before and after."""
    from lens_rl.config import parse_args
    from lens_rl.training.grpo_config import LensGRPOConfig
    from lens_rl.training.rl_stage import run_rl

    (cfg,) = parse_args([LensGRPOConfig], argv, typecheck=False)
    return run_rl(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
