"""Explanations reach the trackers ``report_to`` names (W&B in offline mode, TensorBoard), and
each stage is its own W&B run (real wandb writing real offline run folders; nothing is sent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_rl import _cfg
from transformers import TrainerCallback

from lens_rl.testing.configs import tiny_sft_config
from lens_rl.training.rl_stage import run_rl
from lens_rl.training.sft_trainer import EXPLANATIONS_FILE, run_sft

wandb = pytest.importorskip("wandb", reason="wandb is not installed (`make setup` installs it)")


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch) -> Path:
    """W&B writes offline runs under the returned folder; no network, no login."""
    root = tmp_path / "wandb_root"
    root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_LOG_MODEL", raising=False)
    wandb.teardown()  # W&B caches its settings (WANDB_DIR) process-wide at the first run
    yield root
    if wandb.run is not None:  # a failed assertion must not leave a run to the next test
        wandb.finish()
    wandb.teardown()


def _runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def _tables(run: Path, key: str) -> list[dict]:
    """The W&B tables logged under ``key`` in an offline run, in logging order."""
    paths = sorted(
        (run / "files" / "media" / "table").glob(f"{key}_*.table.json"), key=lambda p: p.stat().st_mtime_ns
    )
    return [json.loads(p.read_text()) for p in paths]


def _tb_text(out: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for run_dir in sorted({ev.parent for ev in out.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
        if f"{tag}/text_summary" in acc.Tags()["tensors"]:
            for e in acc.Tensors(f"{tag}/text_summary"):
                texts.append(e.tensor_proto.string_val[0].decode())
    return texts


def test_each_stage_is_one_run_with_its_explanations(tiny_model_dir, tiny_dump, tmp_path, wandb_dir):
    """SFT then GRPO in one process: two W&B runs (not one run with both stages), each holding
    the evaluations' sample explanations as tables (the same rows the stage writes to its own
    files) and the end-of-run page; TensorBoard gets the same explanations as text."""
    sft_out = tmp_path / "sft"
    cfg = tiny_sft_config(
        tiny_model_dir,
        tiny_dump,
        sft_out,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=2,
        num_completions_to_print=3,
        explain_texts=1,
        explain_samples=2,
        report_to=["wandb", "tensorboard"],
    )
    run_sft(cfg)
    assert wandb.run is None  # the stage finished the run it started
    (sft_run,) = _runs(wandb_dir)
    # the evaluation at step 2 and the final one at step 3, in that order
    written = [json.loads(r) for r in (sft_out / EXPLANATIONS_FILE).read_text().splitlines()]
    assert [w["step"] for w in written] == [2, 2, 2, 3, 3, 3]
    tables = _tables(sft_run, "eval/explanations")
    assert len(tables) == 2
    assert tables[0]["columns"] == ["step", "context", "token", "explanation", "rel_error"]
    logged = [row for t in tables for row in t["data"]]
    assert [(r[0], r[1], r[2], r[3]) for r in logged] == [
        (w["step"], w["context"], w["token"], w["explanation"]) for w in written
    ]
    assert [r[4] for r in logged] == pytest.approx([w["rel_error"] for w in written], rel=1e-6)
    (page,) = (sft_run / "files" / "media" / "html").glob("explanations_page_*.html")
    assert page.read_text() == (sft_out / "explanations.html").read_text()  # self-contained, as written
    tb = _tb_text(sft_out, "eval/explanations")
    assert len(tb) == 2 and all(repr(w["explanation"]).replace("|", "\\|") in "".join(tb) for w in written)

    rl_out = tmp_path / "rl"
    rl_cfg = _cfg(
        tiny_model_dir,
        tiny_dump,
        rl_out,
        sft_lens=str(sft_out / "lens"),
        val_data=str(tiny_dump["val"]),
        eval_strategy="steps",
        eval_steps=2,
        log_completions="true",
        num_completions_to_print=3,
        explain_texts=1,
        explain_samples=2,
    )
    rl_cfg.report_to = ["wandb", "tensorboard"]
    run_rl(rl_cfg)
    assert wandb.run is None
    runs = _runs(wandb_dir)
    assert len(runs) == 2  # GRPO did not append to the supervised run
    (rl_run,) = [r for r in runs if r != sft_run]
    assert len(_tables(sft_run, "eval/explanations")) == 2  # unchanged
    completions = _tables(rl_run, "completions")  # TRL's own table, with our activation contexts
    assert completions and all(
        "[[" in row[completions[0]["columns"].index("prompt")] for row in completions[-1]["data"]
    )
    rl_tables = _tables(rl_run, "eval/explanations")
    assert len(rl_tables) == 1 and rl_tables[0]["data"][0][0] == 2 and len(rl_tables[0]["data"]) == 3
    assert list((rl_run / "files" / "media" / "html").glob("explanations_page_*.html"))
    assert _tb_text(rl_out, "completions") and _tb_text(rl_out, "eval/explanations")


class _FailAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise RuntimeError("stop here")


def test_a_callers_run_stays_open_and_a_failed_stage_closes_its_own(
    tiny_model_dir, tiny_dump, tmp_path, wandb_dir
):
    """A run the caller started receives the stage's logs and is left open; a stage that fails
    finishes the run it started, so the next stage does not log into it."""
    run = wandb.init(project="lens-rl-test")
    run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "a", report_to="wandb"))
    assert wandb.run is run
    run.finish()
    assert len(_runs(wandb_dir)) == 1

    with pytest.raises(RuntimeError, match="stop here"):
        run_sft(
            tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "b", report_to="wandb"),
            callbacks=[_FailAtStep()],
        )
    assert wandb.run is None
    assert len(_runs(wandb_dir)) == 2


def test_wandb_log_model_uploads_a_loadable_lens(tiny_model_dir, tiny_dump, tmp_path, wandb_dir, monkeypatch):
    """``WANDB_LOG_MODEL=end``: the run gets the saved lens folder as a ``lens`` artifact (W&B
    stages a copy of every file it will upload; each is byte-identical to ``<out>/lens``), and
    that folder loads with ``ConsistencyLens.from_pretrained``."""
    from lens_rl.models.lens import ConsistencyLens

    data_dir = tmp_path / "wandb_data"
    monkeypatch.setenv("WANDB_DATA_DIR", str(data_dir))
    monkeypatch.setenv("WANDB_LOG_MODEL", "end")
    wandb.teardown()
    out = tmp_path / "run"
    run_sft(
        tiny_sft_config(
            tiny_model_dir, tiny_dump, out, eval_strategy="steps", eval_steps=2, report_to="wandb"
        )
    )
    staged = {p.read_bytes() for p in (data_dir / "artifacts" / "staging").iterdir() if p.is_file()}
    lens_files = sorted(p for p in (out / "lens").rglob("*") if p.is_file())
    assert lens_files and all(p.read_bytes() in staged for p in lens_files)
    assert ConsistencyLens.from_pretrained(out / "lens").decoder is not None
