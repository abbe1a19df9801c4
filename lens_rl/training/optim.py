"""The optimizer ``optim`` names, built on explicit parameter groups (each with its own ``lr``):
shared by both trainers (the supervised stage's per-owner rates, GRPO's ``encoder_learning_rate``)."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_on_groups(trainer, model, groups: list[dict[str, Any]], what: str) -> torch.optim.Optimizer:
    """Instantiate the Trainer's optimizer class (``optim``) on ``groups``; an ``optim`` that
    builds its own groups is refused, since it would drop ``what`` (the per-group rates)."""
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    kwargs = dict(kwargs)
    if {"params", "model", "optimizer_dict"} & set(kwargs) or not isinstance(cls, type):
        raise ValueError(
            f"optim={trainer.args.optim!r} builds its own parameter groups, which would drop {what}; "
            "use an AdamW/Adafactor/SGD-style optimizer."
        )
    kwargs.pop("lr", None)  # each group carries its own
    return cls(groups, **kwargs)
