"""Training: supervised lens training (sft_*) and, later, the GRPO stage."""
