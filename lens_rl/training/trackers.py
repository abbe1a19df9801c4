"""Explanations in the experiment trackers that ``report_to`` turns on (W&B, TensorBoard).

transformers' tracker callbacks log scalars; a lens evaluation also produces text: sample
explanations at every evaluation and the explanations page at the end of a stage. These helpers
find the live W&B run and TensorBoard writer among a trainer's callbacks and write that text
there, on the main process only (a no-op when neither tracker is on):

- sample explanations: a W&B table ``eval/explanations`` and TensorBoard text of the same name;
- the end-of-run page: ``explanations_page`` as W&B HTML (not injected with W&B's stylesheet:
  the page stays self-contained);
- GRPO completions: TensorBoard text ``completions`` (TRL itself logs the W&B table);
- with ``WANDB_LOG_MODEL``, the saved lens folder as a W&B artifact of type ``lens``.

:func:`stage_run` makes one stage one W&B run: the run a stage's trainer started is finished
when the stage returns or fails, so the next stage in the same process (the quickstart, a
notebook) starts its own run instead of appending to this one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SAMPLE_COLUMNS = ("step", "context", "token", "explanation", "rel_error")


def _trackers(trainer) -> tuple[Any, Any, Any]:
    """(the ``wandb`` module when the trainer's W&B callback has a live run, that callback, the
    TensorBoard ``SummaryWriter`` when the trainer's TensorBoard callback has one open)."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    wandb, wandb_cb, writer = None, None, None
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
            writer = cb.tb_writer
        if (
            isinstance(cb, WandbCallback)
            and cb._initialized
            and cb._wandb is not None
            and cb._wandb.run is not None
        ):
            wandb, wandb_cb = cb._wandb, cb
    return wandb, wandb_cb, writer


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table for TensorBoard's text plugin; strings are shown with ``repr`` so
    newlines and ``|`` in explanations cannot break the table."""

    def cell(v: Any) -> str:
        s = repr(v) if isinstance(v, str) else (f"{v:.3f}" if isinstance(v, float) else str(v))
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_samples(trainer, samples: Sequence[dict[str, Any]], step: int) -> None:
    """An evaluation's sample explanations (:func:`~lens_rl.training.evaluate.evaluate_lens`'s
    ``samples``) as the W&B table and TensorBoard text ``eval/explanations``."""
    if not samples or not trainer.accelerator.is_main_process:
        return
    wandb, _, writer = _trackers(trainer)
    rows = [[step, s["context"], s["token"], s["explanation"], float(s["rel_error"])] for s in samples]
    if wandb is not None:
        table = wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)
        wandb.log({"eval/explanations": table, "train/global_step": step})
    if writer is not None:
        writer.add_text("eval/explanations", _markdown(SAMPLE_COLUMNS, rows), step)
        writer.flush()


def log_completions_text(trainer, rows: Sequence[tuple[str, str, float]], step: int) -> None:
    """GRPO completions (activation context, explanation, advantage) as TensorBoard text."""
    if not rows or not trainer.accelerator.is_main_process:
        return
    _, _, writer = _trackers(trainer)
    if writer is not None:
        header = ("activation context", "explanation", "advantage")
        writer.add_text("completions", _markdown(header, rows), step)


def log_page(trainer, path: str | Path, step: int) -> None:
    """The end-of-run explanations page as W&B HTML ``explanations_page``."""
    if not trainer.accelerator.is_main_process:
        return
    wandb, _, _ = _trackers(trainer)
    if wandb is not None:
        page = wandb.Html(Path(path).read_text(encoding="utf-8"), inject=False)
        wandb.log({"explanations_page": page, "train/global_step": step})


def log_lens_artifact(trainer, lens_dir: str | Path, metadata: dict[str, Any] | None = None) -> Any:
    """With ``WANDB_LOG_MODEL`` set (``end`` or ``checkpoint``, as transformers reads it), the
    saved lens folder as the W&B artifact ``lens-<run id>`` (type ``lens``, alias ``final``):
    what :meth:`~lens_rl.models.lens.ConsistencyLens.from_pretrained` loads. transformers' own
    ``model-<run id>`` artifact holds the trainer module's state dict, which is not a loadable
    lens. Returns the artifact (``None`` when nothing was logged)."""
    if not trainer.accelerator.is_main_process:
        return None
    wandb, cb, _ = _trackers(trainer)
    if wandb is None or not cb._log_model.is_enabled:
        return None
    numbers = {k: v for k, v in (metadata or {}).items() if isinstance(v, (int, float))}
    artifact = wandb.Artifact(name=f"lens-{wandb.run.id}", type="lens", metadata=numbers)
    artifact.add_dir(str(lens_dir))
    wandb.run.log_artifact(artifact, aliases=["final"])
    return artifact


@contextmanager
def stage_run() -> Iterator[None]:
    """Finish, on leaving, a W&B run started inside the block (exit code 1 when the block
    raised); a run the caller had started before stays open."""
    wandb = sys.modules.get("wandb")
    before = getattr(wandb, "run", None)
    failed = True
    try:
        yield
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None)
        if run is not None and run is not before:
            run.finish(exit_code=1 if failed else 0)
