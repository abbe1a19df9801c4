"""A small in-process supervised-stage config shared by the SFT and guard tests."""

from __future__ import annotations

from lens_rl.training.sft_config import LensSFTConfig


def small_sft_config(model_dir, splits, out, **kw) -> LensSFTConfig:
    """2 steps of batch 8, 3-token explanations, no evaluation, checkpoints, plot or explanations
    page; ``kw`` overrides."""
    base = dict(
        model_name_or_path=str(model_dir),
        train_data=str(splits["train"]),
        val_data=str(splits["val"]),
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=2,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        t_text=3,
        plot=False,
        explain_texts=0,  # the end-of-run explanations page is tested in test_explain.py
    )
    return LensSFTConfig(**(base | kw))
