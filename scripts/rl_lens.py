"""GRPO fine-tuning of a consistency lens on TRL.

    accelerate launch scripts/rl_lens.py --config configs/rl_quickstart.yaml \
        --model_name_or_path MODEL_DIR --sft_lens outputs/sft/lens \
        --train_data .../layer_1/train --val_data .../layer_1/val --output_dir outputs/rl
"""

from __future__ import annotations

import sys

from lens_rl.utils.launch import end_process_group


def main(argv: list[str] | None = None) -> dict:
    """Parse the config and run the RL stage; returns metrics before and after. (``lens-rl grpo`` runs the same function.)"""
    from lens_rl.cli.grpo import main as grpo

    return grpo(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
    end_process_group()  # every rank done before the group goes
