"""Reading a lens: the public API, the lens sidecar, `explain(lens, ...)`, `lens-rl explain` and its
HTML page (rendered in a real headless Chromium where one is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lens_rl.config import ConfigError
from lens_rl.models.lens import LENS_CONFIG, ConsistencyLens
from lens_rl.reading import explain
from lens_rl.testing.configs import tiny_sft_config

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog, and returns None."


def _env() -> dict[str, str]:
    """The environment of a subprocess: this checkout first on the path, offline, one thread."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def saved_lens(tiny_model_dir, tiny_dump, tmp_path_factory):
    """A lens built by the supervised stage's own code (`build_sft`) with the base given by a
    RELATIVE path (as a user in the model's parent folder would type it), saved untrained."""
    from lens_rl.training.sft_trainer import build_sft

    out = tmp_path_factory.mktemp("explain-lens")
    cwd = os.getcwd()
    os.chdir(tiny_model_dir.parent)
    try:
        cfg = tiny_sft_config(tiny_model_dir.name, tiny_dump, out / "run")
        trainer = build_sft(cfg)
        trainer.lens.save_pretrained(out / "lens")
    finally:
        os.chdir(cwd)
    return out / "lens"


def test_public_api_is_lazy_and_the_cli_lists_its_subcommands():
    """`import lens_rl` (and the CLI's help) imports no torch; `--help` lists every subcommand."""
    code = (
        "import sys, lens_rl, lens_rl.cli\n"
        "assert 'torch' not in sys.modules, 'import lens_rl imported torch'\n"
        "sys.exit(lens_rl.cli.main(sys.argv[1:]))\n"
    )
    res = _run(["-c", code, "--help"], cwd=ROOT)
    for sub in ("dump", "sft", "grpo", "probe", "explain", "demo"):
        assert f"  {sub} " in res.stdout
    assert "accelerate launch" in res.stdout and "-m lens_rl.cli" in res.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lens_rl.cli", "train"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown subcommand 'train'" in bad.stderr


def test_public_api_names_resolve_to_the_real_objects():
    import lens_rl
    from lens_rl import ConsistencyLens, LensGRPOConfig, LensSFTConfig, SamplingPolicy, SequenceProcessor
    from lens_rl.models.lens import ConsistencyLens as C
    from lens_rl.processing.sequence_processor import SequenceProcessor as S

    assert ConsistencyLens is C and SequenceProcessor is S and SamplingPolicy(top_p=0.9).truncates
    assert LensSFTConfig.__name__ == "LensSFTConfig" and LensGRPOConfig.__name__ == "LensGRPOConfig"
    assert set(lens_rl.__all__) == {"__version__", *lens_rl._EXPORTS}
    assert all(getattr(lens_rl, n) is not None for n in lens_rl.__all__)
    assert callable(lens_rl.explain) and callable(lens_rl.run_sft) and callable(lens_rl.run_rl)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lens_rl.nope  # noqa: B018


def test_sidecar_records_what_loading_needs(saved_lens, tiny_model_dir):
    meta = json.loads((saved_lens / LENS_CONFIG).read_text())
    assert meta["format_version"] == 2
    m = meta["meta"]
    assert m["model_name_or_path"] == tiny_model_dir.name  # as given (relative)
    assert m["base_resolved_path"] == str(tiny_model_dir.resolve())  # absolute
    assert m["tokenizer_resolved_path"] == str(tiny_model_dir.resolve())
    assert len(m["base_fingerprint"]) == 20 and m["layer"] == 1 and m["t_text"] == 3
    assert m["prompt"] == meta["decoder"]["prompt"] and "<embed>" in m["prompt"]
    assert len(m["train_mean"]) == len(m["train_var"]) == 128
    assert m["lens_rl_version"] and m["model_dtype"] == "float32"


def test_lens_loads_and_explains_from_another_working_directory(saved_lens, tmp_path):
    """A subprocess in an unrelated folder (where the relative base path means nothing) loads the
    lens through the recorded absolute path and explains text through the CLI module."""
    out = tmp_path / "out"
    res = _run(
        [
            "-m",
            "lens_rl.cli",
            "explain",
            "--lens",
            str(saved_lens),
            "--text",
            TEXT,
            "--positions",
            "0,3,-1",
            "--num_samples",
            "3",
            "--output_dir",
            str(out),
            "--no_progress",
        ],
        cwd=tmp_path,
    )
    rows = [json.loads(r) for r in (out / "explanations.jsonl").read_text().splitlines()]
    assert [r["position"] for r in rows][:2] == [0, 3] and len(rows) == 3
    assert all(len(r["samples"]) == 3 for r in rows)
    assert (out / "explanations.html").stat().st_size > 1000
    assert "explanation (best)" in res.stdout and "mean FVE" in res.stdout


def test_missing_base_folder_is_a_clear_error_and_base_overrides_it(tiny_model_dir, tiny_dump, tmp_path):
    """A lens whose base folder moved names the missing folder and the fix (never a Hub lookup);
    `base=` a folder with the same weights loads it."""
    from lens_rl.training.sft_trainer import build_sft

    moved = tmp_path / "base-copy"
    shutil.copytree(tiny_model_dir, moved)
    lens = build_sft(tiny_sft_config(moved, tiny_dump, tmp_path / "run")).lens
    lens.save_pretrained(tmp_path / "lens")
    shutil.rmtree(moved)
    with pytest.raises(
        FileNotFoundError, match=rf"base model folder {moved}.*does not exist.*base=MODEL_DIR"
    ):
        ConsistencyLens.from_pretrained(tmp_path / "lens")
    again = ConsistencyLens.from_pretrained(tmp_path / "lens", base=str(tiny_model_dir))
    assert again.lens_config.layer == 1


def test_different_base_folder_is_refused_naming_both(saved_lens, tiny_model_factory, tiny_model_dir):
    other = tiny_model_factory("llama_vllm", n_layers=2, seed=1)  # same shapes, other weights
    other_dir = other.name_or_path_on_disk
    with pytest.raises(ConfigError, match="a different model") as e:
        ConsistencyLens.from_pretrained(saved_lens, base=other_dir)
    assert str(tiny_model_dir.resolve()) in str(e.value) and other_dir in str(e.value)


def test_older_sidecar_with_fewer_fields_loads(saved_lens, tiny_model_dir, tmp_path, monkeypatch):
    """A lens saved before the sidecar recorded absolute paths, fingerprint, prompt, t_text,
    statistics and version still loads (its relative base path taken from the working directory);
    explaining it needs the training statistics (refused without them, naming the file: a
    fallback on the explained activations' own mean made the scores depend on the positions)."""
    old = tmp_path / "old-lens"
    shutil.copytree(saved_lens, old)
    cfg = json.loads((old / LENS_CONFIG).read_text())
    cfg.pop("format_version")
    for key in (
        "base_resolved_path",
        "tokenizer_resolved_path",
        "base_revision",
        "base_fingerprint",
        "prompt",
        "t_text",
        "train_mean",
        "train_var",
        "lens_rl_version",
        "model_dtype",
    ):
        cfg["meta"].pop(key, None)
    (old / LENS_CONFIG).write_text(json.dumps(cfg))
    monkeypatch.chdir(tiny_model_dir.parent)
    lens = ConsistencyLens.from_pretrained(old)
    with pytest.raises(ValueError, match=r"lens_config.json records no activation statistics.*train_mean"):
        explain(lens, TEXT, positions="last", k=2, t_text=3)
    saved = json.loads((saved_lens / LENS_CONFIG).read_text())["meta"]
    lens.lens_config.train_mean, lens.lens_config.train_var = saved["train_mean"], saved["train_var"]
    res = explain(lens, TEXT, positions="last", k=2, t_text=3)
    assert len(res) == 1 and res[0]["normaliser"] == "train_mean"
    with pytest.raises(ValueError, match="records no t_text"):
        explain(lens, TEXT, positions="last", k=2)


def test_explain_rows_are_the_lens_own_computation(saved_lens):
    """Every score in a row is recomputed here from the sampled explanation tokens: A captured
    by the orig model, Â from the encoder on those tokens, the relative error against the
    recorded training mean, the functional KL; the best sample is the one with the lowest error.
    Same seed, same rows."""
    from lens_rl.metrics import functional_kl
    from lens_rl.models.families import embed_tokens
    from lens_rl.models.orig import OrigWrapper

    lens = ConsistencyLens.from_pretrained(saved_lens)
    res = explain(lens, [TEXT, "x = 1"], positions="all", k=4, seed=3)
    tok = lens.tokenizer
    n0 = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert len(res) == n0 + len(tok("x = 1", add_special_tokens=False)["input_ids"])
    orig = OrigWrapper(lens.base_model)
    mean = torch.tensor(lens.lens_config.train_mean, dtype=torch.float64)
    for r in (res[0], res[n0 - 1], res[-1]):
        assert r["token"] == res.tokens[r["text_index"]][r["position"]]
        rels = [s["rel_error"] for s in r["samples"]]
        assert rels == sorted(rels) and r["explanation"] == r["samples"][0]["explanation"]
        ids = torch.tensor(tok([TEXT, "x = 1"][r["text_index"]], add_special_tokens=False)["input_ids"])
        p = r["position"]
        a = orig.capture(ids[None], 1, torch.tensor([p]))
        for s in r["samples"]:
            expl = torch.tensor(s["token_ids"])[None]
            with torch.no_grad():
                a_hat = lens.encoder(embed_tokens(lens.decoder.base, expl), current_token_ids=ids[p : p + 1])
                kl = functional_kl(orig, {"input_ids": ids[None], "token_pos": torch.tensor([p])}, 1, a_hat)
            rel = float((a_hat.double() - a.double()).pow(2).sum() / (a.double() - mean).pow(2).sum())
            # measured agreement ~1e-7 (fp32 batched vs single-row passes); 1e-4 relative allows for BLAS order
            assert s["rel_error"] == pytest.approx(rel, rel=1e-4, abs=1e-6)
            assert s["fve"] == pytest.approx(1 - s["rel_error"])
            assert s["kl"] == pytest.approx(float(kl[0]), rel=1e-3, abs=1e-6) and s["kl"] > -1e-7
    again = explain(lens, [TEXT, "x = 1"], positions="all", k=4, seed=3)
    assert again.rows == res.rows
    # KL passes split into many small groups (at most 16 tokens each): the same values
    split = explain(lens, [TEXT, "x = 1"], positions="all", k=4, seed=3, max_kl_tokens=16)
    assert [r["explanation"] for r in split] == [r["explanation"] for r in res]
    got = torch.tensor([s["kl"] for r in split for s in r["samples"]])
    torch.testing.assert_close(
        got, torch.tensor([s["kl"] for r in res for s in r["samples"]]), rtol=1e-5, atol=1e-7
    )


def test_positions_and_inputs_are_checked(tmp_path):
    from lens_rl.reading import parse_positions, read_texts

    assert parse_positions("all", 3) == [0, 1, 2] and parse_positions("last", 3) == [2]
    assert parse_positions("2,-3", 4) == [1, 2] and parse_positions(-1, 2) == [1]
    with pytest.raises(ValueError, match="position 5 is outside text 0"):
        parse_positions("5", 3, where="text 0")
    with pytest.raises(ValueError, match="comma-separated token indices"):
        parse_positions("first", 3)
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    assert read_texts(tmp_path / "a.txt") == ["one\ntwo", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "a b"}\n"c"\n')
    assert read_texts(tmp_path / "b.jsonl") == ["a b", "c"]
    (tmp_path / "c.jsonl").write_text('{"content": 1}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: expected an object with a 'text' string"):
        read_texts(tmp_path / "c.jsonl")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(
    _chromium() is None,
    reason="no Chromium on PATH (install with `apt-get install -y chromium`, or WITH_CHROMIUM=1 bash scripts/setup_env.sh as root)",
)
def test_html_page_renders_in_headless_chromium(saved_lens, tmp_path):
    """The page, opened from disk in a real headless Chromium: a non-blank screenshot with the
    tokens' colours, and a DOM (after its script ran) holding every explanation, with the first
    token selected and its explanations in the side panel. The page loads nothing from outside."""
    import colorsys
    import html as html_lib

    from matplotlib.image import imread

    from lens_rl.reading.page import visible

    lens = ConsistencyLens.from_pretrained(saved_lens)
    res = explain(lens, [TEXT, "def f(x):\n    return x"], positions="all", k=3)
    page = res.write_html(tmp_path / "explanations.html")
    source = page.read_text()
    assert "<link" not in source and "src=" not in source and "href=" not in source  # self-contained
    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,900",
    ]
    url = page.as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    img = imread(shot)  # (H, W, 3|4) floats in [0, 1]
    assert img.shape[0] >= 800 and img.shape[1] >= 1100
    rgb = (img[..., :3] * 255).round().astype(int).reshape(-1, 3)
    assert len({tuple(p) for p in rgb[::7].tolist()}) > 50  # text, colours, panel: not a blank page
    # The background of the first token: hsl(120 * clamp(FVE, 0, 1), 75%, 78%), as the page paints it.
    hue = round(120 * min(max(res.rows[0]["fve"], 0.0), 1.0)) / 360
    want = torch.tensor([round(255 * c) for c in colorsys.hls_to_rgb(hue, 0.78, 0.75)])
    assert (torch.tensor(rgb) - want).abs().max(1).values.le(2).sum() > 50  # > 50 pixels of it
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert 'class="tok sel"' in dom  # the script ran and selected the first token
    for r in res.rows:
        for s in r["samples"]:
            assert html_lib.escape(visible(s["explanation"]), quote=False) in dom
    panel = dom[dom.index('id="panel"') : dom.index('id="details"')]
    assert html_lib.escape(visible(res.rows[0]["explanation"]), quote=False) in panel


def test_supervised_training_shows_its_work(tiny_model_dir, tiny_dump, tmp_path, capsys):
    """run_sft prints the metrics and a table of sample explanations at every evaluation and at
    the end, and writes the explanations page (and its JSONL) for held-out windows."""
    from lens_rl.training.sft_trainer import run_sft

    out = tmp_path / "run"
    cfg = tiny_sft_config(
        tiny_model_dir,
        tiny_dump,
        out,
        eval_strategy="steps",
        eval_steps=1,
        num_completions_to_print=3,
        explain_texts=2,
        explain_samples=2,
    )
    final = run_sft(cfg)["final"]
    printed = capsys.readouterr().out
    # steps 1 and 2 would evaluate; the last step's evaluation runs once after the save
    assert printed.count("evaluation at step 1") == 2 and printed.count("evaluation at step 2") == 2
    assert "sample explanations" in printed and "held-out explanations after 2 supervised steps" in printed
    assert f"{final['fve']:.4f}" in printed
    rows = [json.loads(r) for r in (out / "explanations_val.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 32 and {r["text_index"] for r in rows} == {0, 1}  # 2 windows x 32 tokens
    assert all(len(r["samples"]) == 2 for r in rows)
    page = (out / "explanations.html").read_text()
    assert all(visible_html(r["explanation"]) in page for r in rows)


def visible_html(text: str) -> str:
    from lens_rl.reading.page import esc

    return esc(text)


def test_config_lookup_and_module_launch_parsing(tmp_path, monkeypatch):
    """`--config NAME.yaml` that is not a file here resolves to the shipped config (the README's
    commands work from any folder and from a wheel); a file here wins. The world-size check reads
    `accelerate launch ... -m lens_rl.cli` command lines up to the module."""
    from lens_rl.cli.common import resolve_config
    from lens_rl.config import packaged_config
    from lens_rl.utils.launch import _requested_processes

    monkeypatch.chdir(tmp_path)
    shipped = packaged_config("sft_quickstart.yaml")
    assert shipped.is_file() and shipped.read_text() == (ROOT / "configs" / "sft_quickstart.yaml").read_text()
    for given in ("sft_quickstart.yaml", "configs/sft_quickstart.yaml"):
        assert resolve_config(["--config", given, "--max_steps", "3"]) == [
            "--config",
            str(shipped),
            "--max_steps",
            "3",
        ]
    assert resolve_config(["--config=configs/rl_quickstart.yaml"]) == [
        f"--config={packaged_config('rl_quickstart.yaml')}"
    ]
    (tmp_path / "sft_quickstart.yaml").write_text("max_steps: 1\n")
    assert resolve_config(["--config", "sft_quickstart.yaml"]) == ["--config", "sft_quickstart.yaml"]
    assert resolve_config(["--config", "nope.yaml"]) == ["--config", "nope.yaml"]  # parse_args names it
    launch = ["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    assert _requested_processes([*launch, "-m", "lens_rl.cli", "sft", "--num_processes", "9"]) == 2
    assert (
        _requested_processes(["python", "-m", "accelerate.commands.launch", "-m", "lens_rl.cli", "sft"])
        is None
    )


@pytest.mark.slow
def test_accelerate_launch_of_the_module_trains(tiny_model_dir, tiny_dump, tmp_path):
    """`accelerate launch -m lens_rl.cli sft --config sft_quickstart.yaml` (the shipped config,
    from an unrelated folder) trains, evaluates and writes the lens and the explanations page."""
    cmd = [
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        "1",
        "-m",
        "lens_rl.cli",
        "sft",
        "--config",
        "sft_quickstart.yaml",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--train_data",
        str(tiny_dump["train"]),
        "--val_data",
        str(tiny_dump["val"]),
        "--output_dir",
        str(tmp_path / "run"),
        "--max_steps",
        "4",
        "--eval_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--explain_texts",
        "1",
    ]
    res = _run(cmd, cwd=tmp_path, timeout=600)
    assert "evaluation at step 2" in res.stdout and "world size 1" in res.stdout + res.stderr
    for name in (
        "lens/lens_config.json",
        "final_metrics.json",
        "explanations.html",
        "explanations_val.jsonl",
    ):
        assert (tmp_path / "run" / name).is_file(), name


def test_explain_refuses_to_replace_earlier_outputs(saved_lens, tmp_path):
    """`lens-rl explain` into a folder that already holds its files (e.g. a training run's own
    explanations.html) stops before any work and leaves the files as they were;
    --overwrite_output_dir replaces them."""
    from lens_rl.cli.explain import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "explanations.html").write_text("the training run's page")
    argv = ["--lens", str(saved_lens), "--text", TEXT, "--positions", "last", "--num_samples", "2"]
    argv += ["--output_dir", str(out), "--no_progress"]
    with pytest.raises(ConfigError, match=r"already holds explanations.html.*--overwrite_output_dir"):
        main(argv)
    assert (out / "explanations.html").read_text() == "the training run's page"
    assert not (out / "explanations.jsonl").exists()
    main([*argv, "--overwrite_output_dir"])
    assert "the training run's page" not in (out / "explanations.html").read_text()
    assert len((out / "explanations.jsonl").read_text().splitlines()) == 1


def test_the_lens_config_is_typed_and_keeps_what_a_caller_recorded(saved_lens, tmp_path):
    """The sidecar's ``meta`` is a typed LensConfig: the fields lens_rl reads are attributes,
    fields it does not read survive a save and a load unchanged, and a field of the wrong type
    is refused naming it."""
    from lens_rl.models.configuration import LensConfig, LensFileError

    lens = ConsistencyLens.from_pretrained(saved_lens)
    lc = lens.lens_config
    assert isinstance(lc, LensConfig) and isinstance(lc.layer, int) and isinstance(lc.train_var, list)
    lc.extra["experiment"] = {"note": "run 7", "tags": [1, 2]}
    lens.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / LENS_CONFIG).read_text())["meta"]
    assert saved["experiment"] == {"note": "run 7", "tags": [1, 2]} and saved["layer"] == lc.layer
    again = ConsistencyLens.from_pretrained(tmp_path / "again")
    assert again.lens_config.extra == {"experiment": {"note": "run 7", "tags": [1, 2]}}
    assert again.lens_config.to_dict() == saved
    with pytest.raises(LensFileError, match=r"here: field 'meta.t_text' must be an integer >= 1, got str"):
        LensConfig.from_dict({"t_text": "4"}, "here")
