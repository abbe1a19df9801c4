"""Supervised consistency-lens training (``LensSFTConfig`` / ``LensSFTTrainer`` on transformers.Trainer).

accelerate launch scripts/sft_lens.py --config configs/sft_quickstart.yaml --model_name_or_path ... \
    --train_data .../layer_1/train --val_data .../layer_1/val --output_dir outputs/sft
accelerate launch --config_file configs/accelerate/ddp.yaml scripts/sft_lens.py ... \
    --resume_from_checkpoint true        # or a checkpoint-N folder
"""

from __future__ import annotations

import sys

from lens_rl.utils.launch import end_process_group


def main(argv: list[str] | None = None) -> dict:
    """Parse the config and train; returns the final evaluation metrics. (``lens-rl sft`` runs the same function.)"""
    from lens_rl.cli.sft import main as sft

    return sft(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
    end_process_group()  # every rank done before the group goes
