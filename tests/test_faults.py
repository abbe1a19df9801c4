"""Faults at the edges (issue #24): logs cut short by a full disk, outputs interrupted while
written, two commands in one folder, flags outside their range, and unreadable input files.
Every error names the file (and line or field) or the flag."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from lens_rl.config import ConfigError
from lens_rl.testing.configs import tiny_sft_config

TEXT = "The quick brown fox jumps over the lazy dog."


def _no_litter(folder: Path) -> list[str]:
    """Names in ``folder`` other than the output lock (temporary files must be gone)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lens_rl.lock")


# ---------------------------------------------------------------------- 1. JSONL logs cut short
def _metrics(folder: Path, tail: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path = folder / "metrics.jsonl"
    path.write_text("".join(r + "\n" for r in rows) + tail)
    return path


def test_resume_repairs_a_metrics_log_cut_short(tmp_path, caplog):
    """A full disk mid-append leaves a partial last line: the resume's trim drops it with a
    warning naming the file and keeps (and rewrites) the complete rows up to the step."""
    from lens_rl.training.sft_trainer import _trim_logs

    path = _metrics(tmp_path, '{"step": 4, "lo')
    (tmp_path / "explanations.jsonl").write_text('{"step": 2, "explanation": "x"}\n{"step": 3, "expl')
    with caplog.at_level(logging.WARNING):
        _trim_logs(tmp_path, 2)
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2]
    assert [json.loads(r)["step"] for r in (tmp_path / "explanations.jsonl").read_text().splitlines()] == [2]
    assert str(path) in caplog.text and "explanations.jsonl" in caplog.text
    assert _no_litter(tmp_path) == ["explanations.jsonl", "metrics.jsonl"]


def test_plot_reads_a_metrics_log_cut_short_and_names_a_bad_middle_line(tmp_path, caplog):
    from lens_rl.training.plots import plot_curves

    path = _metrics(tmp_path / "a", '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        assert plot_curves(path, tmp_path / "a" / "curves.png").stat().st_size > 0
    assert str(path) in caplog.text
    bad = tmp_path / "b" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: "):
        plot_curves(bad, tmp_path / "b" / "curves.png")


# ---------------------------------------------------------------------- 2. explain writes
@pytest.fixture(scope="module")
def saved_lens(tiny_model_dir, tiny_dump, tmp_path_factory):
    """An untrained lens saved by the supervised stage's own code."""
    from lens_rl.training.sft_trainer import build_sft

    out = tmp_path_factory.mktemp("faults-lens")
    trainer = build_sft(tiny_sft_config(tiny_model_dir, tiny_dump, out / "run"))
    trainer.lens.save_pretrained(out / "lens")
    return out / "lens"


def _explain_argv(lens: Path, out: Path, *extra: str) -> list[str]:
    return ["--lens", str(lens), "--text", TEXT, "--num_samples", "2", "--max_length", "4"] + [
        "--output_dir",
        str(out),
        "--no_progress",
        *extra,
    ]


@pytest.mark.parametrize("where", ["html", "jsonl_halfway"])
def test_explain_interrupted_while_writing_leaves_no_outputs(saved_lens, tmp_path, monkeypatch, where):
    """A failure while the outputs are written (the disk fills in the page, or halfway through
    the rows) leaves neither file under its final name, nor temporary files; a rerun is not
    refused as if a finished explain were there."""
    import lens_rl.reading.results as ex
    from lens_rl.cli.explain import main

    out = tmp_path / "explain"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "html":

        def broken_page(*args, **kwargs):
            raise full

        monkeypatch.setattr(ex, "write_html", broken_page)
    else:
        calls = []

        class HalfJson:
            @staticmethod
            def dumps(obj, **kwargs):
                calls.append(obj)
                if len(calls) == 2:
                    raise full
                return json.dumps(obj, **kwargs)

        monkeypatch.setattr(ex, "json", HalfJson)
    with pytest.raises(OSError, match="No space left"):
        main(_explain_argv(saved_lens, out))
    assert _no_litter(out) == []
    monkeypatch.undo()
    res = main(_explain_argv(saved_lens, out))
    assert _no_litter(out) == ["explanations.html", "explanations.jsonl"]
    assert len((out / "explanations.jsonl").read_text().splitlines()) == len(res) == 4


def test_explain_into_a_folder_another_run_holds_is_refused(saved_lens, tmp_path):
    from lens_rl.cli.explain import main
    from lens_rl.training.guards import claim_output_dir

    out = tmp_path / "busy"
    held = claim_output_dir(out, resume=False, overwrite=False)  # a run (or another explain) owns it
    try:
        with pytest.raises(ConfigError, match=rf"{out} is in use"):
            main(_explain_argv(saved_lens, out, "--overwrite_output_dir"))
        assert _no_litter(out) == []
    finally:
        held.close()
    main(_explain_argv(saved_lens, out))  # free again once the holder is gone
    assert (out / "explanations.jsonl").is_file()


def test_probe_interrupted_while_writing_leaves_no_outputs(tmp_path, monkeypatch):
    """The entropy probe's results.json / config.json / probe.png appear together or not at all."""
    import lens_rl.probe.runner as runner
    from lens_rl.probe.config import EntropyProbeConfig
    from lens_rl.testing.toy_policy import TOY_PROMPTS, build_toy_policy

    build_toy_policy(tmp_path / "toy", seed=0, initializer_range=0.2)
    (tmp_path / "prompts.txt").write_text("\n".join(TOY_PROMPTS))
    out = tmp_path / "probe"
    cfg = dict(
        model_name_or_path=str(tmp_path / "toy"),
        prompts_file=str(tmp_path / "prompts.txt"),
        batch_size_e=8,
        batch_size_u=2,
        num_generations=2,
        max_new_tokens=2,
        etas=[1e-4, 2e-4],
        resample_check=False,
        output_dir=str(out),
    )

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "plot_probe", full)
    with pytest.raises(OSError, match="No space left"):
        runner.run_entropy_probe(EntropyProbeConfig(**cfg), show_progress=False)
    assert not out.exists() or _no_litter(out) == []
    monkeypatch.undo()
    runner.run_entropy_probe(EntropyProbeConfig(**cfg), show_progress=False)  # not refused
    assert _no_litter(out) == ["config.json", "probe.png", "results.json"]


# ---------------------------------------------------------------------- 3. flags out of range
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max_length", "-3"),
        ("--max_length", "0"),
        ("--t_text", "0"),
        ("--num_samples", "0"),
        ("--batch_size", "0"),
        ("--temperature", "0"),
        ("--temperature", "nan"),
        ("--top_p", "0"),
        ("--top_p", "1.5"),
        ("--positions", "first"),
    ],
)
def test_explain_flags_are_checked_when_parsed(flag, value, capsys):
    from lens_rl.cli.explain import make_parser

    argv = ["--lens", "L", "--text", "t", "--output_dir", "o", flag, value]
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(argv)
    assert e.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_explain_max_length_none_means_no_cap_and_explain_checks_it(saved_lens):
    from lens_rl.cli.explain import make_parser
    from lens_rl.models.lens import ConsistencyLens
    from lens_rl.reading import explain

    args = make_parser().parse_args(
        ["--lens", "L", "--text", "t", "--output_dir", "o", "--max_length", "none"]
    )
    assert args.max_length is None
    assert make_parser().parse_args(["--lens", "L", "--text", "t", "--output_dir", "o"]).max_length == 256
    lens = ConsistencyLens.from_pretrained(saved_lens)
    for bad in (-3, 0):
        with pytest.raises(ValueError, match=f"max_length must be >= 1 .*got {bad}"):
            explain(lens, TEXT, k=1, max_length=bad)


@pytest.mark.parametrize(
    "field, value",
    [
        ("pool_size", 0),
        ("pool_size", -3),
        ("temperature", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.0),
        ("n_bootstrap", 1),
        ("ridge", -1.0),
        ("adam_beta1", 1.0),
        ("adam_beta2", -0.1),
        ("adam_epsilon", 0.0),
        ("weight_decay", -0.1),
    ],
)
def test_probe_numeric_fields_are_checked(field, value):
    from lens_rl.config import parse_args
    from lens_rl.probe.config import EntropyProbeConfig

    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        parse_args([EntropyProbeConfig], ["--model_name_or_path", "m", f"--{field}", str(value)])


# ---------------------------------------------------------------------- 4. unreadable inputs
def test_explain_input_errors_name_file_and_line(tmp_path):
    from lens_rl.reading import read_texts

    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(ValueError, match=rf"{bad_json}:2: not valid JSON"):
        read_texts(bad_json)
    latin = tmp_path / "b.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{latin}:2: not UTF-8"):
        read_texts(latin)
    plain = tmp_path / "c.txt"
    plain.write_bytes(b"one\n\ntwo\ncaf\xe9\n")
    with pytest.raises(ValueError, match=rf"{plain}:4: not UTF-8"):
        read_texts(plain)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", b"", r"empty.txt is empty"),
        ("blank.txt", b"\n\n  \n", r"blank.txt.* no text"),
        (
            "ints.jsonl",
            b'{"text": 1}\n{"text": 2}\n',
            r"ints.jsonl: field 'text' holds int64 values, not text",
        ),
        ("nums.json", b'[{"text": 1.5}]', r"nums.json: field 'text' holds float64 values, not text"),
        ("nulls.jsonl", b'{"text": null}\n', r"nulls.jsonl.* no text"),
        ("empty.jsonl", b"", r"empty.jsonl is empty"),
        ("cut.jsonl", b'{"text": "a"}\n{"text": \n{"text": "b"}\n', r"cut.jsonl:2: not valid JSON"),
        ("latin.txt", b"ok\ncaf\xe9\n", r"latin.txt:2: not UTF-8"),
    ],
)
def test_dump_corpus_errors_name_the_file(tmp_path, name, content, match):
    from lens_rl.data.dump import CorpusConfig, load_texts

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_texts(CorpusConfig(data_files=[str(path)]))


def test_dump_corpus_missing_file_and_good_files_together(tmp_path):
    from lens_rl.data.dump import CorpusConfig, load_texts

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "one"}\n{"text": null}\n')
    b.write_text('{"text": "two"}\n')
    assert load_texts(CorpusConfig(data_files=[str(a), str(b)])) == ["one", None, "two"]
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'gone.jsonl'}: no such file"):
        load_texts(CorpusConfig(data_files=[str(a), str(tmp_path / "gone.jsonl")]))
    assert os.path.exists(a)


def test_the_command_reports_a_bad_input_without_a_traceback(tmp_path):
    """`lens-rl SUBCOMMAND` turns an input error (here a model folder that does not exist) into one
    line naming it and exit status 2, not a traceback (and never a Hub lookup)."""
    import os
    import subprocess
    import sys

    missing = tmp_path / "models" / "my-base"
    res = subprocess.run(
        [sys.executable, "-m", "lens_rl.cli", "dump", "--config", "dump_quickstart.yaml"]
        + ["--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"lens-rl dump: error: model_name_or_path '{missing}' is not an existing folder" in res.stderr
