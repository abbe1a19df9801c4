"""The tiny configs of the three stages, built in one place for tests and benchmarks.

Each factory fills in the values the test suite's fixtures and expected numbers were measured
with, and takes ``**overrides`` for any other field of the config (an override replaces a
default; a field named in neither keeps the config class's own default):

* :func:`tiny_dump_config`: block 1 of a tiny model, 128 train / 32 val windows of 32 tokens
  from the offline ``pydoc`` corpus (the ``tiny_dump`` fixture).
* :func:`tiny_sft_config`: 2 supervised steps of batch 8 with 3-token explanations, with no
  evaluation, checkpoints, plot or explanations page.
* :func:`tiny_grpo_config`: 2 GRPO steps of batch 8 (groups of 4) with 4-token explanations,
  HF rollouts, seed 0 and no checkpoints, trackers or progress bar.

Tests that check command-line parsing build the same GRPO values as ``--flag value`` pairs with
:func:`tiny_grpo_fields` and :func:`config_argv`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lens_rl.data.dump import DumpConfig
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.sft_config import LensSFTConfig

Splits = Mapping[str, str | Path]
"""Dump split folders by name, as ``run_dump`` returns them: ``{"train": dir, "val": dir}``."""


def tiny_dump_config(model_dir: str | Path, output_dir: str | Path, **overrides: Any) -> DumpConfig:
    """The activation dump of the ``tiny_dump`` fixture.

    Defaults: ``corpus="pydoc"``, ``layer=1``, ``seq_len=32``, ``min_pos=4``, ``num_train=128``,
    ``num_val=32``; everything else is :class:`~lens_rl.data.dump.DumpConfig`'s default.

    Args:
        model_dir: folder of the model (and tokenizer) to read activations from.
        output_dir: root folder of the dump.
        **overrides: any other :class:`~lens_rl.data.dump.DumpConfig` field, or a new value for
            one of the defaults above.
    """
    fields: dict[str, Any] = dict(
        model_name_or_path=str(model_dir),
        corpus="pydoc",
        layer=1,
        seq_len=32,
        min_pos=4,
        num_train=128,
        num_val=32,
        output_dir=str(output_dir),
    )
    return DumpConfig(**(fields | overrides))


def tiny_sft_config(
    model_dir: str | Path, splits: Splits, output_dir: str | Path, **overrides: Any
) -> LensSFTConfig:
    """A short in-process supervised run on a tiny dump.

    Defaults: ``train_data=splits["train"]``, ``val_data=splits["val"]`` (``None`` when
    ``splits`` has no ``"val"``), ``per_device_train_batch_size=8``, ``max_steps=2``,
    ``eval_strategy="no"``, ``save_strategy="no"``, ``logging_steps=1``, ``t_text=3``,
    ``plot=False``, ``explain_texts=0`` (no end-of-run explanations page); everything else is
    :class:`~lens_rl.training.sft_config.LensSFTConfig`'s default.

    Args:
        model_dir: folder of the base model (and tokenizer).
        splits: the dump's split folders (``"train"``, optionally ``"val"``).
        output_dir: the run's output folder.
        **overrides: any other :class:`~lens_rl.training.sft_config.LensSFTConfig` field, or a
            new value for one of the defaults above.
    """
    val = splits.get("val")
    fields: dict[str, Any] = dict(
        model_name_or_path=str(model_dir),
        train_data=str(splits["train"]),
        val_data=None if val is None else str(val),
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=2,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        t_text=3,
        plot=False,
        explain_texts=0,
    )
    return LensSFTConfig(**(fields | overrides))


def tiny_grpo_fields(
    model_dir: str | Path, splits: Splits, output_dir: str | Path, **overrides: Any
) -> dict[str, Any]:
    """The fields :func:`tiny_grpo_config` passes to :class:`LensGRPOConfig`, as a dict.

    Defaults: ``train_data=splits["train"]`` (``val_data`` stays unset, so there is no
    before/after evaluation unless it is passed), ``max_steps=2``,
    ``per_device_train_batch_size=8``, ``num_generations=4``, ``t_text=4``,
    ``rollout_backend="hf"``, ``logging_steps=1``, ``report_to="none"``, ``save_strategy="no"``,
    ``disable_tqdm=True``, ``seed=0``.

    Args:
        model_dir: folder of the base model (and tokenizer).
        splits: the dump's split folders; only ``"train"`` is read.
        output_dir: the run's output folder.
        **overrides: any other :class:`~lens_rl.training.grpo_config.LensGRPOConfig` field, or a
            new value for one of the defaults above.
    """
    fields: dict[str, Any] = dict(
        model_name_or_path=str(model_dir),
        train_data=str(splits["train"]),
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        t_text=4,
        rollout_backend="hf",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return fields | overrides


def tiny_grpo_config(
    model_dir: str | Path, splits: Splits, output_dir: str | Path, **overrides: Any
) -> LensGRPOConfig:
    """A short in-process GRPO run on a tiny dump (defaults: see :func:`tiny_grpo_fields`)."""
    return LensGRPOConfig(**tiny_grpo_fields(model_dir, splits, output_dir, **overrides))


def config_argv(fields: Mapping[str, Any]) -> list[str]:
    """``--name value`` pairs for ``parse_args`` or a script: booleans as ``true``/``false``,
    anything else through ``str`` (pass dicts as JSON strings)."""
    argv: list[str] = []
    for name, value in fields.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{name}", text]
    return argv
