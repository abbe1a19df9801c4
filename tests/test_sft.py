"""Supervised lens training on transformers.Trainer: real `accelerate launch` runs (1 and 2
processes over gloo, tied and untied bases, trainable decoder AND encoder bases), the LR
schedule under N processes, exact resume, checkpoints, learning signal and config errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_runner import accelerate_launch

from lens_rl.config import ConfigError
from lens_rl.data.dataset import ActivationDataset, DumpError
from lens_rl.models.lens import ConsistencyLens
from lens_rl.testing.configs import tiny_sft_config
from lens_rl.training.sft_config import LensSFTConfig
from lens_rl.training.sft_trainer import build_sft, run_sft

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, LR = 20, 3, 1e-3


def _args(model_dir, splits, out, **kw) -> list[str]:
    base = {
        "model_name_or_path": str(model_dir),
        "train_data": str(splits["train"]),
        "val_data": str(splits["val"]),
        "output_dir": str(out),
        "per_device_train_batch_size": "4",
        "gradient_accumulation_steps": "2",
        "max_steps": str(STEPS),
        "learning_rate": str(LR),
        "warmup_steps": str(WARMUP),
        "save_steps": "10",
        "eval_steps": "10",
        "logging_steps": "1",
        "save_total_limit": "3",
        "t_text": "4",
        "lm_weight": "0.1",
        "kl_weight": "1.0",
        "resample_ablation": "true",
        "decoder": '{"trainable_base": true}',
        "encoder": '{"trainable_base": true}',
        "explain_texts": "1",  # the end-of-run page on the main process only, under 1 and 2 processes
    } | {k: str(v) for k, v in kw.items()}
    return [x for k, v in base.items() for x in (f"--{k}", v)]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in _metrics(out) if "loss" in m}


_PORTS = iter(range(29541, 29600))


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, tiny_dump, tiny_tied_model_dir, tiny_tied_dump, tmp_path_factory):
    """``runs(base, n)``: the output folder of a 20-step run under `accelerate launch` with ``n``
    processes on the ``"tied"`` (Qwen2) or ``"untied"`` (Llama) base; launched once, cached."""
    sources = {"untied": (tiny_model_dir, tiny_dump), "tied": (tiny_tied_model_dir, tiny_tied_dump)}
    cache: dict[tuple[str, int], Path] = {}

    def runs(base: str, n: int) -> Path:
        if (base, n) not in cache:
            model_dir, splits = sources[base]
            out = tmp_path_factory.mktemp(f"sft-{base}-{n}p") / "run"
            res = accelerate_launch("sft_lens.py", _args(model_dir, splits, out), n, next(_PORTS))
            assert f"world size {n}" in res.stdout + res.stderr
            cache[base, n] = out
        return cache[base, n]

    return runs


@pytest.mark.parametrize("base", ["tied", "untied"])
def test_two_processes_follow_the_one_process_lr_schedule(straight_runs, base):
    """2-process DDP (gloo) with trainable decoder and encoder bases runs 20 optimizer steps;
    the learning rate logged at every step equals the 1-process run's (exact: same formula, same
    step count) and follows linear warm-up + cosine to 0 at step 20, computed here by hand
    (tolerance 1e-12: float rounding of the formula)."""
    one, two = _train_rows(straight_runs(base, 1)), _train_rows(straight_runs(base, 2))
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        t = step - 1  # the rate of the update taken at optimizer step `step`
        expect = LR * (
            t / WARMUP if t < WARMUP else 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (STEPS - WARMUP)))
        )
        assert one[step]["learning_rate"] == two[step]["learning_rate"], step
        assert abs(one[step]["learning_rate"] - expect) < 1e-12, (step, one[step]["learning_rate"], expect)
        # per-group rates: the multipliers (projection 1, base 0.1) ride on the same schedule
        assert abs(two[step]["lr/projection"] - expect) < 1e-12
        assert abs(two[step]["lr/base"] - 0.1 * expect) < 1e-12
    for out in (straight_runs(base, 1), straight_runs(base, 2)):
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
        assert all(math.isfinite(r["loss"]) for r in _train_rows(out).values())
        assert len((out / "explanations_val.jsonl").read_text().splitlines()) == 32  # 1 window, main process


def test_run_outputs_and_saved_lens(straight_runs, tiny_tied_model_dir):
    """A run leaves config, metrics, explanations, curves, checkpoints and a lens that reloads
    with from_pretrained; the tied base's shared embedding is neither saved twice nor dropped."""
    out = straight_runs("tied", 1)
    for name in (
        "config.json",
        "metrics.jsonl",
        "explanations.jsonl",
        "explanations.html",  # held-out windows explained at the end (explain_texts)
        "explanations_val.jsonl",
        "final_metrics.json",
        "training_curves.png",
        "lens/lens.safetensors",
        "lens/lens_config.json",
        "checkpoint-20/model.safetensors",
        "checkpoint-20/optimizer.pt",
        "checkpoint-20/trainer_state.json",
    ):
        assert (out / name).exists(), name
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(final) >= {"fve", "nmse", "kl_recon", "kl_train", "lm_kl", "baseline_mean_fve"}
    assert final["num_samples"] == 32
    assert any("eval_fve" in m and m["step"] == STEPS for m in _metrics(out))  # the final evaluation
    explanations = [json.loads(r) for r in (out / "explanations.jsonl").read_text().splitlines()]
    assert {"context", "position", "explanation", "step"} <= set(explanations[0])
    ckpt = load_file(str(out / "checkpoint-20" / "model.safetensors"))
    # trainable decoder base saved; the encoder's unused embedding/final norm are frozen, not saved
    assert any(k.startswith("lens.decoder.base.model.layers.0.") for k in ckpt)
    assert not any(k.startswith("lens.encoder.base.model.norm") for k in ckpt)
    assert "lens.encoder.base.model.embed_tokens.weight" not in ckpt
    lens = ConsistencyLens.from_pretrained(out / "lens")
    assert lens.lens_config.layer == 1 and len(lens.lens_config.train_mean) == 64
    lens_w = load_file(str(out / "lens" / "lens.safetensors"))
    for k, v in lens.state_dict().items():
        torch.testing.assert_close(v, lens_w[k], rtol=0, atol=0)


@pytest.mark.parametrize(("base", "n"), [("tied", 1), ("untied", 1), ("untied", 2)])
def test_resume_is_bit_exact(
    straight_runs, tiny_model_dir, tiny_dump, tiny_tied_model_dir, tiny_tied_dump, tmp_path, base, n
):
    """10 steps, interruption, `--resume_from_checkpoint true`, 10 more == 20 straight.

    Tolerance: exact (0) for every lens tensor and every logged loss, measured on CPU fp32: the
    Gumbel noise is seeded from the optimizer step, and data order, optimizer, scheduler and RNG
    state come back from checkpoint-10 (the runs cross epoch boundaries at steps 8 and 16)."""
    straight = straight_runs(base, n)
    model_dir, splits = {
        "untied": (tiny_model_dir, tiny_dump),
        "tied": (tiny_tied_model_dir, tiny_tied_dump),
    }[base]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(straight / "checkpoint-10", out / "checkpoint-10")
    rows = [r for r in (straight / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= 10]
    (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    res = accelerate_launch(
        "sft_lens.py", [*_args(model_dir, splits, out), "--resume_from_checkpoint", "true"], n, next(_PORTS)
    )
    assert "resuming from" in res.stdout + res.stderr and "checkpoint-10" in res.stdout + res.stderr
    a = load_file(str(straight / "lens" / "lens.safetensors"))
    b = load_file(str(out / "lens" / "lens.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    sa, sb = _train_rows(straight), _train_rows(out)
    assert sorted(sb) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "mse", "kl", "lm", "learning_rate"):
            assert sa[step][key] == sb[step][key], (step, key)


def test_resume_without_a_checkpoint_is_an_error(tiny_model_dir, tiny_dump, tmp_path):
    cfg = tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "empty", resume_from_checkpoint="true")
    with pytest.raises(ConfigError, match="no complete checkpoint-N folder"):
        run_sft(cfg)


def test_learning_signal(tiny_model_dir, tiny_dump, tmp_path):
    """On a fixed small problem, 100 steps halve the MSE loss and raise held-out FVE by >= 0.5.

    Measured (seed 0, CPU): held-out FVE -1.68 untrained -> -0.19 after 100 steps; the
    random tiny model's activations carry little that 4 generated tokens can express, so the lens
    approaches (but does not pass) the mean predictor here. Beating the mean baseline is shown on
    the pretrained quickstart model (README, and the `slow` quickstart test).
    """
    cfg = tiny_sft_config(
        tiny_model_dir,
        tiny_dump,
        tmp_path / "learn",
        per_device_train_batch_size=16,
        max_steps=100,
        logging_steps=5,
        t_text=4,
        learning_rate=1e-2,
        encoder={"trainable_base": True},
        decoder={"trainable_base": True},
        lr_base=0.5,
    )
    trainer = build_sft(cfg)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    rows = [m for m in trainer.state.log_history if "mse" in m]
    assert rows[-1]["mse"] < 0.5 * rows[0]["mse"], (rows[0]["mse"], rows[-1]["mse"])
    print(f"held-out FVE before {before['eval_fve']:.3f}, after {after['eval_fve']:.3f}")
    assert after["eval_fve"] >= before["eval_fve"] + 0.5, (before["eval_fve"], after["eval_fve"])


def test_on_the_fly_matches_dump_statistics(tiny_model_dir, tiny_dump, tmp_path):
    """on_the_fly computes the same activations the dump stored (same windows and positions)."""
    dump_yaml = tmp_path / "dump.yaml"
    dump_yaml.write_text(
        "corpus: pydoc\nlayer: 1\nseq_len: 32\nmin_pos: 4\nnum_train: 128\nnum_val: 32\nseed: 0\n"
    )
    cfg = tiny_sft_config(
        tiny_model_dir, tiny_dump, tmp_path / "o", train_data=None, val_data=None, on_the_fly=str(dump_yaml)
    )
    result = run_sft(cfg)
    trainer = result["trainer"]
    dumped = ActivationDataset(tiny_dump["train"])
    assert torch.equal(trainer.train_dataset.windows.input_ids[:5], dumped.input_ids[:5].long())
    torch.testing.assert_close(trainer.train_mean, dumped.A[:].double().mean(0).float(), rtol=0, atol=1e-5)
    assert result["final"]["num_samples"] == 32


def test_bad_dump_fails_before_training(tiny_model_dir, tiny_dump, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(tiny_dump["train"], bad)
    shard = next(bad.glob("rank_0/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:64])
    cfg = tiny_sft_config(tiny_model_dir, {"train": bad, "val": tiny_dump["val"]}, tmp_path / "o")
    with pytest.raises(DumpError, match="cannot be read"):
        run_sft(cfg)
    assert not list((tmp_path / "o").glob("checkpoint-*"))


def test_out_of_range_layer_is_an_error(tiny_model_dir, tiny_dump, tmp_path):
    """`layer: 2` on a 2-block model is refused (it used to wrap silently to block 0)."""
    from lens_rl.data.dump import DumpConfig, run_dump

    with pytest.raises(ConfigError, match=r"DumpConfig.layer=2 is out of range for a model with 2 blocks"):
        run_dump(
            DumpConfig(
                model_name_or_path=str(tiny_model_dir),
                corpus="pydoc",
                layer=2,
                num_train=8,
                num_val=0,
                output_dir=str(tmp_path),
            )
        )
    dump_yaml = tmp_path / "dump.yaml"
    dump_yaml.write_text("corpus: pydoc\nlayer: -3\nseq_len: 32\nnum_train: 32\nnum_val: 8\n")
    cfg = tiny_sft_config(
        tiny_model_dir, tiny_dump, tmp_path / "o", train_data=None, val_data=None, on_the_fly=str(dump_yaml)
    )
    with pytest.raises(ConfigError, match=r"layer=-3 \(in .*dump.yaml\) is out of range"):
        build_sft(cfg)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(), "exactly one of train_data"),
        (dict(train_data="x", on_the_fly="y"), "exactly one of train_data"),
        (dict(train_data="x", eval_strategy="no", mse_weight="0"), "nothing would be trained"),
        (dict(train_data="x", eval_strategy="no", gumbel_tau="linear:1->0@10"), "gumbel_tau must stay > 0"),
        (dict(train_data="x", eval_strategy="no", lm_weight="sometimes"), "cannot parse schedule"),
        (
            dict(train_data="x", eval_strategy="no", decoder={"bogus": 1}),
            r"Unknown decoder option\(s\) \['bogus'\]",
        ),
        (
            dict(train_data="x", eval_strategy="no", decoder={"per_layer_projections": True}),
            "needs patch_all_layers",
        ),
        (dict(train_data="x", eval_strategy="no", max_steps=0), "max_steps must be >= 1"),
        (dict(train_data="x"), "eval_strategy='steps' needs a validation split"),
        (dict(train_data="x", eval_strategy="no", t_text="8"), r"t_text = '8' \(str\)"),
        (dict(train_data="x", eval_strategy="no", push_to_hub=True), "push_to_hub=True is not supported"),
        (dict(train_data="x", eval_strategy="no", remove_unused_columns=True), "remove_unused_columns"),
        (
            dict(train_data="x", eval_strategy="no", load_best_model_at_end=True),
            "load_best_model_at_end needs metric_for_best_model",
        ),
        (dict(train_data="x", eval_strategy="no", lr_base=-1.0), "lr_base must be >= 0"),
        (dict(train_data="x", eval_strategy="no", model_dtype="fp8"), "model_dtype = 'fp8'"),
        (
            dict(train_data="x", eval_strategy="no", attn_implementation="flash_attention_2"),
            "flash_attention_2' needs the flash-attn package and a CUDA",
        ),
        (dict(train_data="x", eval_strategy="no", save_strategy="best"), "needs metric_for_best_model"),
        (
            dict(train_data="x", eval_strategy="no", metric_for_best_model="loss"),
            "not a lens evaluation metric",
        ),
        (
            dict(train_data="x", eval_strategy="no", metric_for_best_model="nmse", greater_is_better=True),
            "contradicts metric_for_best_model='nmse'",
        ),
        (
            dict(train_data="x", eval_strategy="no", save_strategy="best", metric_for_best_model="fve"),
            "set eval_strategy",
        ),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        LensSFTConfig(model_name_or_path="m", **kw)


@pytest.mark.parametrize(("metric", "higher"), [("nmse", False), ("eval_fve", True)])
def test_save_strategy_best_keeps_the_best_evaluation(tiny_model_dir, tiny_dump, tmp_path, metric, higher):
    """save_strategy='best': a checkpoint is written exactly at the evaluations that improve the
    metric, in its own direction (lower nmse, higher fve: never transformers' "loss"-suffix guess),
    and ``best_model_checkpoint`` is the step with the best evaluated value."""
    out = tmp_path / "run"
    cfg = tiny_sft_config(
        tiny_model_dir,
        tiny_dump,
        out,
        max_steps=12,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="best",
        metric_for_best_model=metric,
        save_total_limit=None,  # keep every save, to see where they happened
    )
    assert cfg.greater_is_better is higher
    result = run_sft(cfg)
    name = metric.removeprefix("eval_")
    evals = {m["step"]: m[f"eval_{name}"] for m in _metrics(out) if f"eval_{name}" in m}
    assert sorted(evals) == [3, 6, 9, 12]
    best_step = (max if higher else min)(evals, key=evals.get)
    assert result["trainer"].state.best_model_checkpoint == str(out / f"checkpoint-{best_step}")
    improved, best = [], None
    for step in sorted(evals):
        if best is None or (evals[step] > best if higher else evals[step] < best):
            improved.append(step)
            best = evals[step]
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == improved


@pytest.mark.parametrize("base", ["untied_frozen", "tied_trainable"])
def test_load_best_model_at_end_saves_and_evaluates_the_best_lens(request, tmp_path, base):
    """load_best_model_at_end: the last step is evaluated too (it competes for best), the best
    checkpoint's weights are what ``lens/`` holds (every tensor, including trainable decoder and
    encoder bases over tied embeddings), and the final evaluation (seeded like every evaluation)
    repeats the best one's value exactly. lm_kl rises from the first evaluation on here (measured
    untied Llama 0.0441, 0.0460, 0.0465, 0.0467; tied Qwen2 with trainable bases 0.0269, 0.0307,
    0.0326, 0.0329), so the best is not the last step."""
    tied = base == "tied_trainable"
    model_dir = request.getfixturevalue("tiny_tied_model_dir" if tied else "tiny_model_dir")
    dump = request.getfixturevalue("tiny_tied_dump" if tied else "tiny_dump")
    extra = dict(decoder={"trainable_base": True}, encoder={"trainable_base": True}) if tied else {}
    out = tmp_path / "run"
    cfg = tiny_sft_config(
        model_dir,
        dump,
        out,
        **extra,
        max_steps=12,
        learning_rate=3e-2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        metric_for_best_model="lm_kl",
        load_best_model_at_end=True,
        save_total_limit=None,
    )
    result = run_sft(cfg)
    evals = [(m["step"], m["eval_lm_kl"]) for m in _metrics(out) if "eval_lm_kl" in m]
    periodic, final = dict(evals[:-1]), evals[-1][1]
    assert sorted(periodic) == [3, 6, 9, 12]
    best_step = min(periodic, key=periodic.get)
    assert best_step != 12
    best = out / f"checkpoint-{best_step}"
    assert result["trainer"].state.best_model_checkpoint == str(best)
    assert final == periodic[best_step] == result["final"]["lm_kl"]
    ckpt = {k.removeprefix("lens."): v for k, v in load_file(str(best / "model.safetensors")).items()}

    def lens_is_best() -> bool:
        saved = load_file(str(out / "lens" / "lens.safetensors"))
        return saved.keys() <= ckpt.keys() and all(torch.equal(saved[k], ckpt[k]) for k in saved)

    assert lens_is_best()
    # A run stopped after its last checkpoint, before the lens was saved: resuming it trains
    # nothing and still saves the best lens, not the last step's.
    shutil.rmtree(out / "lens")
    run_sft(dataclasses.replace(cfg, resume_from_checkpoint=str(out / "checkpoint-12")))
    assert lens_is_best()


@pytest.mark.parametrize(
    "metric, mode, expected_lrs", [("fve", "max", [3e-3] * 4), ("lm_kl", "min", [3e-3, 3e-3, 1.5e-3, 7.5e-4])]
)
def test_plateau_schedule_follows_the_metric_direction(
    tiny_model_dir, tiny_dump, tmp_path, metric, mode, expected_lrs
):
    """reduce_lr_on_plateau (patience 0, factor 0.5) steps on the lens metric in its own
    direction. Here FVE rises and LM KL rises at every evaluation (steps 3, 6, 9; measured in
    test_load_best_model_at_end_*), so the rate never drops on FVE and halves after each
    evaluation that is not a new low of LM KL. transformers' default mode ("min") would cut the
    rate while FVE improves."""
    cfg = tiny_sft_config(
        tiny_model_dir,
        tiny_dump,
        tmp_path / "run",
        max_steps=10,
        learning_rate=3e-3,
        lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"patience": 0, "factor": 0.5},
        eval_strategy="steps",
        eval_steps=3,
        metric_for_best_model=metric,
        logging_steps=1,
    )
    assert cfg.lr_scheduler_kwargs["mode"] == mode
    run_sft(cfg)
    lrs = {m["step"]: m["lr/projection"] for m in _metrics(tmp_path / "run") if "lr/projection" in m}
    assert [lrs[s] for s in (1, 4, 7, 10)] == pytest.approx(expected_lrs, rel=1e-9)
    with pytest.raises(ConfigError, match="mode='min' contradicts metric_for_best_model='fve'"):
        tiny_sft_config(
            tiny_model_dir,
            tiny_dump,
            tmp_path / "x",
            lr_scheduler_type="reduce_lr_on_plateau",
            lr_scheduler_kwargs={"mode": "min"},
            eval_strategy="steps",
            metric_for_best_model="fve",
        )


def test_resume_at_the_end_of_the_schedule_trains_nothing(tiny_model_dir, tiny_dump, tmp_path, capsys):
    """A run stopped after its last checkpoint (lens not yet written) is finished by resuming:
    checkpoint-4 of a 4-step run is loaded, no step 5 runs (transformers alone would take one
    more step at the constant LR and write checkpoint-5), and the lens equals the straight run's."""
    out = tmp_path / "run"
    kw = dict(
        max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="constant", learning_rate=1e-2
    )
    run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, out, **kw))
    straight = load_file(str(out / "lens" / "lens.safetensors"))
    shutil.rmtree(out / "lens")  # stopped after checkpoint-4 was written
    capsys.readouterr()
    res = run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, out, resume_from_checkpoint="true", **kw))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert res["trainer"].state.global_step == 4
    assert "the end of the schedule (max_steps=4): nothing left to train" in capsys.readouterr().out
    assert max(m["step"] for m in _metrics(out)) == 4
    finished = load_file(str(out / "lens" / "lens.safetensors"))
    assert finished.keys() == straight.keys()
    for k in straight:
        assert torch.equal(finished[k], straight[k]), k


def test_a_dump_of_another_model_is_refused(tiny_model_other_weights_dir, tiny_dump, tmp_path):
    """Same shapes, other weights: training on another model's activations is refused, naming both."""
    with pytest.raises(DumpError, match="not from the model given"):
        build_sft(tiny_sft_config(tiny_model_other_weights_dir, tiny_dump, tmp_path / "o"))


def test_bf16_on_cpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal; this machine has CUDA")
    with pytest.raises(ConfigError, match="needs a GPU"):
        LensSFTConfig(model_name_or_path="m", train_data="x", eval_strategy="no", bf16=True)


def test_world_size_mismatch_is_detected():
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process on a CPU
    machine; the launcher's command line is parsed to refuse that."""
    from lens_rl.utils.launch import _requested_processes

    launcher = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "s.py"]
    assert _requested_processes(launcher) == 2
    assert (
        _requested_processes(["python", "-m", "accelerate.commands.launch", "--num_processes=4", "s.py"]) == 4
    )
    assert _requested_processes(["python", "train.py", "--num_processes", "2"]) is None
    assert _requested_processes(["accelerate", "launch", "s.py"]) is None
    assert (
        _requested_processes(["accelerate", "launch", "s.py", "--num_processes", "3"]) is None
    )  # the script's


def test_tensorboard_tracking(tiny_model_dir, tiny_dump, tmp_path):
    """report_to=tensorboard writes event files; metrics.jsonl gets the loss parts."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, out, report_to="tensorboard"))
    assert list(out.rglob("events.out.tfevents.*")), "no tensorboard event file"
    assert any("loss" in m and "mse" in m for m in _metrics(out))


ZERO3 = {"zero_optimization": {"stage": 3}}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(
    "kw, env, message",
    [
        (dict(fsdp="full_shard"), {}, r"FSDP \(fsdp='full_shard'\) is not supported"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, r"FSDP \(accelerate launch --use_fsdp"),
        (
            dict(deepspeed=ZERO3, peft_config=LORA),
            {},
            r"LensSFTConfig.peft_config: not supported under DeepSpeed ZeRO-3 \(deepspeed\)",
        ),
        (
            dict(peft_config=LORA),
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            r"peft_config: not supported under DeepSpeed ZeRO-3 \(accelerate launch --zero_stage",
        ),
        (
            dict(lens_fsdp2=True, peft_config=LORA),
            {},
            r"LensSFTConfig.peft_config: not supported under FSDP2 \(lens_fsdp2\)",
        ),
        (
            dict(lens_fsdp2=True, deepspeed=ZERO3),
            {},
            r"lens_fsdp2: FSDP2 and DeepSpeed \(deepspeed\) are two engines",
        ),
        (
            dict(
                lens_fsdp2=True,
                load_best_model_at_end=True,
                metric_for_best_model="fve",
                eval_strategy="steps",
            ),
            {},
            r"load_best_model_at_end: not supported under FSDP2",
        ),
        (
            dict(peft_config=LORA),
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ZERO3"},
            "ZeRO-3 \\(the DeepSpeed config file",
        ),
    ],
)
def test_sharded_parameters_are_refused_from_config_or_launcher(
    tiny_model_dir, tiny_dump, tmp_path, monkeypatch, kw, env, message
):
    """accelerate's FSDP (measured: FSDP's RAM-efficient loading leaves rank 1's frozen original
    model unloaded, and on CPU accelerate runs DDP instead) and what ZeRO-3 and lens_rl's FSDP2
    cannot run (LoRA keeps the frozen base the lens shares with the original model; both engines
    at once) are refused when parsed, whether the config or `accelerate launch` (its
    ACCELERATE_* environment) asks for them; ZeRO-3 itself parses (tests/test_zero3.py runs it,
    tests/test_fsdp2_stages.py runs FSDP2)."""
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps(ZERO3))
    for k, v in env.items():
        monkeypatch.setenv(k, str(zero3) if v == "ZERO3" else v)
    with pytest.raises(ConfigError, match=message):
        tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "run", **kw)
    if "peft_config" in kw and ("deepspeed" in kw or env.get("ACCELERATE_USE_DEEPSPEED")):
        kw.pop("peft_config")
        if importlib.util.find_spec("deepspeed") is not None:
            assert tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "run", **kw).output_dir
        else:  # CI: DeepSpeed is an opt-in extra
            with pytest.raises(ConfigError, match=r"ZeRO-3 .* needs DeepSpeed, which is not installed"):
                tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "run", **kw)


def test_sharding_refuses_a_lens_sharing_the_original_models_weights(tiny_model_dir, tiny_dump, tmp_path):
    """A frozen base is the original model's own tensors; ZeRO-3 (or FSDP2) would shard them, so the
    trainer refuses at start (before any engine is built), naming a shared tensor; FSDP2 with one
    process (nothing to shard over) is refused too. Checked here
    with an accelerator that reports ZeRO-3; the runs themselves are tests/test_zero3.py."""
    from types import SimpleNamespace

    from lens_rl.models.lens import LensModule
    from lens_rl.training.sharded import prepare_sharding
    from lens_rl.training.stage import load_stage_inputs, stage_lens

    cfg = tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "run")
    inputs = load_stage_inputs(cfg)
    lens = stage_lens(cfg, inputs)
    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(
        ConfigError, match=r"ZeRO-3 needs lens bases of their own: \d+ lens tensors \(e.g. lens\."
    ):
        prepare_sharding(zero3, LensModule(lens), inputs.orig)
    ddp = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), num_processes=2)
    with pytest.raises(ConfigError, match=r"FSDP2 needs lens bases of their own"):
        prepare_sharding(ddp, LensModule(lens), inputs.orig, fsdp2=True)
    alone = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), num_processes=1)
    with pytest.raises(
        ConfigError, match=r"lens_fsdp2 shards the lens over the run's processes, and this run has one"
    ):
        prepare_sharding(alone, LensModule(lens), inputs.orig, fsdp2=True)
    prepare_sharding(ddp, LensModule(lens), inputs.orig)  # nothing to do, nothing refused


def test_init_lens_warm_starts_from_a_saved_lens(tiny_model_dir, tiny_dump, tmp_path):
    """``init_lens`` (continued supervised training) starts from the saved lens: its weights, and
    its decoder/encoder configs (a trainable decoder base here, though the new run sets no
    decoder option), with a fresh optimizer and schedule; decoder/encoder options beside it would
    be ignored, so they are refused."""
    trainable = {"decoder": {"trainable_base": True}}
    run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "first", max_steps=3, **trainable))
    init = tmp_path / "first" / "lens"
    saved = load_file(str(init / "lens.safetensors"))
    assert any(k.startswith("decoder.base.") for k in saved)
    # learning rate 0: nothing moves, so the lens the warm run saves is exactly the one it loaded
    run_sft(
        tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "still", init_lens=str(init), learning_rate=0.0)
    )
    still = load_file(str(tmp_path / "still" / "lens" / "lens.safetensors"))
    assert set(still) == set(saved)
    assert all(torch.equal(still[k], saved[k]) for k in saved)
    # a fresh schedule: the warm run logs the first run's learning rates, step for step
    run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "warm", init_lens=str(init), max_steps=3))
    lrs = {
        name: [m["learning_rate"] for m in _metrics(tmp_path / name) if "learning_rate" in m]
        for name in ("first", "warm")
    }
    assert len(lrs["warm"]) == 3 and lrs["warm"] == lrs["first"]
    warm = load_file(str(tmp_path / "warm" / "lens" / "lens.safetensors"))
    assert any(not torch.equal(warm[k], saved[k]) for k in saved)  # and it trained
    with pytest.raises(ConfigError, match=r"init_lens=.* brings the lens's own decoder and encoder configs"):
        tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "bad", init_lens=str(init), **trainable)
    with pytest.raises(ConfigError, match=r"init_lens=.* share_base=False would be ignored"):
        tiny_sft_config(tiny_model_dir, tiny_dump, tmp_path / "bad", init_lens=str(init), share_base=False)
