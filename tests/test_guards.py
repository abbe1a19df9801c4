"""Run guards: divergence stops (or skips) before a broken update or checkpoint, and an output
folder is owned by one run (no mixing with an earlier run, no concurrent writers)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from script_runner import accelerate_launch
from transformers import TrainerCallback

from lens_rl.config import ConfigError
from lens_rl.testing.configs import tiny_dump_config, tiny_sft_config
from lens_rl.training.guards import LOCK_FILE, TrainingDivergedError, claim_output_dir
from lens_rl.training.sft_config import LensSFTConfig
from lens_rl.training.sft_trainer import build_sft, run_sft


def _config(model_dir, splits, out, **kw) -> LensSFTConfig:
    return tiny_sft_config(model_dir, splits, out, **({"max_steps": 4} | kw))


class _PoisonGradient(TrainerCallback):
    """Writes a NaN into one gradient just before the optimizer step ``step`` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


def _poisoned_trainer(cfg, step: int):
    trainer = build_sft(cfg)
    trainer.callback_handler.callbacks.insert(0, _PoisonGradient(step))  # before the guard
    return trainer


def test_nonfinite_gradient_stops_before_the_update(tiny_model_dir, tiny_dump, tmp_path):
    trainer = _poisoned_trainer(_config(tiny_model_dir, tiny_dump, tmp_path / "o"), step=3)
    with pytest.raises(TrainingDivergedError, match="non-finite gradient at optimizer step 3"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.lens.parameters())


def test_nonfinite_gradient_skip_policy(tiny_model_dir, tiny_dump, tmp_path):
    """on_nonfinite=skip: the poisoned step leaves every weight exactly as it was; training goes on."""
    cfg = _config(tiny_model_dir, tiny_dump, tmp_path / "o", on_nonfinite="skip", max_nonfinite_skips=1)
    trainer = _poisoned_trainer(cfg, step=2)
    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = {k: v.clone() for k, v in trainer.lens.state_dict().items()}

    trainer.add_callback(Snap())
    trainer.train()
    assert trainer.state.global_step == 4
    for k, v in snapshots[1].items():
        torch.testing.assert_close(snapshots[2][k], v, rtol=0, atol=0, msg=k)  # step 2 skipped
    assert any(not torch.equal(snapshots[3][k], v) for k, v in snapshots[2].items())  # step 3 applied


def test_divergent_learning_rate_stops_nonzero_with_finite_checkpoints(tiny_model_dir, tiny_dump, tmp_path):
    """lr 1e6 (the reported divergence): the run exits non-zero naming the step; every kept
    checkpoint is finite and loads into a lens."""
    out = tmp_path / "diverge"
    args = {
        "model_name_or_path": tiny_model_dir,
        "train_data": tiny_dump["train"],
        "val_data": tiny_dump["val"],
        "output_dir": out,
        "learning_rate": "1e6",
        "max_steps": "30",
        "save_steps": "1",
        "save_total_limit": "2",
        "eval_strategy": "no",
        "per_device_train_batch_size": "8",
        "t_text": "3",
        "decoder": '{"trainable_base": true}',
        "encoder": '{"trainable_base": true}',
    }
    res = accelerate_launch(
        "sft_lens.py", [x for k, v in args.items() for x in (f"--{k}", str(v))], expect_success=False
    )
    assert "Training diverged: non-finite gradient at optimizer step" in res.stderr
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, "no checkpoint was kept"
    for ckpt in ckpts:
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values()), ckpt
    newest = ckpts[-1]
    trainer = build_sft(
        _config(
            tiny_model_dir,
            tiny_dump,
            tmp_path / "reload",
            decoder={"trainable_base": True},
            encoder={"trainable_base": True},
        )
    )
    trainer.model.load_state_dict(load_file(str(newest / "model.safetensors")))  # strict
    print(
        f"divergence stopped after {json.loads((newest / 'trainer_state.json').read_text())['global_step']} steps"
    )


def test_fresh_run_into_an_earlier_run_is_refused(tiny_model_dir, tiny_dump, tmp_path):
    out = tmp_path / "o"
    run_sft(_config(tiny_model_dir, tiny_dump, out, save_strategy="steps", save_steps=2))
    assert (out / "checkpoint-4").exists()
    with pytest.raises(ConfigError, match="already holds a run .*checkpoint-2"):
        run_sft(_config(tiny_model_dir, tiny_dump, out, max_steps=2))
    # resuming it is fine (nothing left to do: the run is complete), and so is overwriting it
    run_sft(_config(tiny_model_dir, tiny_dump, out, resume_from_checkpoint="true"))
    run_sft(_config(tiny_model_dir, tiny_dump, out, max_steps=2, overwrite_output_dir=True))
    assert not list(out.glob("checkpoint-*"))  # the earlier run's checkpoints are gone
    assert max(json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()) == 2


def test_concurrent_run_into_one_folder_is_refused(tiny_model_dir, tiny_dump, tmp_path):
    out = tmp_path / "o"
    held = claim_output_dir(out, resume=False, overwrite=False)  # another run owns the folder
    try:
        with pytest.raises(ConfigError, match=f"in use by another run .*{LOCK_FILE}"):
            run_sft(_config(tiny_model_dir, tiny_dump, out))
    finally:
        held.close()
    run_sft(_config(tiny_model_dir, tiny_dump, out))  # once released, the folder can be used


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(learning_rate=-1e-3), r"learning_rate \(-0.001\) and max_grad_norm"),
        (dict(max_grad_norm=-1.0), r"max_grad_norm \(-1.0\) must be >= 0"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_sft_config_refuses_negative_rates(kw, match):
    with pytest.raises(ConfigError, match=match):
        LensSFTConfig(model_name_or_path="m", train_data="x", eval_strategy="no", **kw)


def test_rl_config_refuses_negative_beta_and_rates():
    from lens_rl.training.grpo_config import LensGRPOConfig

    for kw in (dict(beta=-0.1), dict(learning_rate=-1.0), dict(max_grad_norm=-1.0)):
        with pytest.raises(ConfigError, match="must be >= 0"):
            LensGRPOConfig(model_name_or_path="m", train_data="x", output_dir="o", **kw)


def _corrupt_copy(splits, tmp_path, file: str, key: str, index: int, value: float):
    """Copy a dump split and set ``tensor[key].flatten()[index] = value`` in its shards
    (``file="shard"``) or in ``stats.safetensors``."""
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(splits["train"], bad)
    files = [bad / "stats.safetensors"] if file == "stats" else list(bad.glob("rank_*/*.safetensors"))
    for f in files:
        t = load_file(str(f))
        t[key].view(-1)[index] = value
        save_file(t, str(f), metadata=None if file == "stats" else {"layer": "1"})
    return bad


@pytest.mark.parametrize(
    ("file", "key", "index", "value", "match"),
    [
        ("shard", "A", 5, 3e37, r"\|A\| = 3e\+37"),  # a flipped exponent bit: finite but absurd
        ("shard", "token_pos", 0, 99, "token_pos 99 of sample 0 outside"),
        ("shard", "a_prime_index", 0, -1, "a_prime_index -1 of sample 0"),
        ("stats", "var", 3, 0.0, "zero or negative"),
        ("stats", "var", 3, -1.0, "zero or negative"),
    ],
)
def test_corrupted_dump_values_are_refused_with_the_file_named(
    tiny_dump, tmp_path, file, key, index, value, match
):
    from lens_rl.data.dataset import ActivationDataset, DumpError

    bad = _corrupt_copy(tiny_dump, tmp_path, file, key, index, value)
    with pytest.raises(DumpError, match=match) as err:
        ActivationDataset(bad)
    named = str(bad / "stats.safetensors") if file == "stats" else f"Shard {bad}/rank_0/shard_"
    assert named in str(err.value), str(err.value)


def test_token_ids_beyond_the_vocabulary_are_refused(tiny_dump, tmp_path):
    from lens_rl.data.dataset import ActivationDataset, DumpError

    ds = ActivationDataset(tiny_dump["train"])
    with pytest.raises(DumpError, match="outside the model's vocabulary of 100"):
        ds.check_compatible(ds.metadata["d_model"], vocab_size=100)


def _dump_cfg(model_dir, out, **kw):
    """32 train windows of 16 tokens in shards of 8, no val split."""
    return tiny_dump_config(
        model_dir, out, **({"seq_len": 16, "num_train": 32, "num_val": 0, "shard_size": 8} | kw)
    )


def test_interrupted_dump_rerun_with_another_config_is_refused(tiny_model_dir, tmp_path):
    """A dump killed part-way (metadata.json not yet written, some shards done) and rerun with
    another seed and position strategy is refused, naming the fields, before anything is written."""
    from lens_rl.data.dump import run_dump

    split = run_dump(_dump_cfg(tiny_model_dir, tmp_path))["train"]
    (split / "metadata.json").unlink()
    shards = sorted(split.glob("rank_0/*.safetensors"))
    shards[-1].unlink()  # the shard the kill interrupted
    before = {p.name: p.read_bytes() for p in shards[:-1]}
    with pytest.raises(
        ConfigError, match=r"differing fields: position_strategy: 'random' -> 'last', seed: 0 -> 1"
    ):
        run_dump(_dump_cfg(tiny_model_dir, tmp_path, seed=1, position_strategy="last"))
    assert {p.name: p.read_bytes() for p in sorted(split.glob("rank_0/*.safetensors"))} == before
    run_dump(_dump_cfg(tiny_model_dir, tmp_path))  # the same config resumes and finishes
    assert (split / "metadata.json").exists()


def test_concurrent_dump_into_one_folder_is_refused(tiny_model_dir, tmp_path):
    from lens_rl.data.dump import _lock_rank_dir, run_dump, split_dir

    rank_dir = split_dir(tmp_path, str(tiny_model_dir), 1, "train") / "rank_0"
    rank_dir.mkdir(parents=True)
    held = _lock_rank_dir(rank_dir)  # another dump is writing
    try:
        with pytest.raises(ConfigError, match="being written by another dump"):
            run_dump(_dump_cfg(tiny_model_dir, tmp_path))
    finally:
        held.close()


def test_shard_content_checksum_is_verified(tiny_model_dir, tmp_path):
    """A shard whose tensors change after writing (metadata kept) fails its sha256 on load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lens_rl.data.dataset import ActivationDataset, DumpError
    from lens_rl.data.dump import run_dump

    split = run_dump(_dump_cfg(tiny_model_dir, tmp_path))["train"]
    ActivationDataset(split)  # intact: loads
    shard = sorted(split.glob("rank_0/*.safetensors"))[1]
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["A"][3, 7] += 0.5  # a finite, in-range change no range check can see
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(DumpError, match=f"Shard {shard}: content checksum mismatch"):
        ActivationDataset(split)


def test_lens_refuses_another_base_of_the_same_width(tiny_model_dir, tiny_dump, tiny_model_factory, tmp_path):
    """A lens records its base (path, resolved path, fingerprint of the weights); loading it on a
    different model of the same shape is refused naming both, while its own base loads in fp32
    and in bf16 (the fingerprint ignores the dtype)."""
    from lens_rl.models.families import load_causal_lm
    from lens_rl.models.lens import ConsistencyLens

    out = tmp_path / "o"
    run_sft(_config(tiny_model_dir, tiny_dump, out, max_steps=1))
    meta = json.loads((out / "lens" / "lens_config.json").read_text())["meta"]
    assert meta["base_resolved_path"] == str(tiny_model_dir.resolve()) and meta["base_fingerprint"]
    other = tiny_model_factory("llama_vllm", n_layers=2, seed=1)  # same shapes, other weights
    with pytest.raises(ConfigError, match=r"was trained on the base .*fingerprint .*a different model"):
        ConsistencyLens.from_pretrained(out / "lens", base=other)
    ConsistencyLens.from_pretrained(out / "lens")
    ConsistencyLens.from_pretrained(out / "lens", base=load_causal_lm(tiny_model_dir, dtype=torch.bfloat16))


def test_resume_skips_a_half_written_checkpoint(tiny_model_dir, tiny_dump, tmp_path, caplog):
    """A kill during a save leaves checkpoint-4 truncated: `resume_from_checkpoint true` falls back
    to checkpoint-2 with a message; naming checkpoint-4 explicitly is an error naming the file."""
    from lens_rl.utils.launch import resolve_resume

    out = tmp_path / "o"
    run_sft(_config(tiny_model_dir, tiny_dump, out, save_strategy="steps", save_steps=2))
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        assert resolve_resume("true", out) == str(out / "checkpoint-2")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    with pytest.raises(ConfigError, match="not a complete checkpoint: model.safetensors cannot be read"):
        resolve_resume(str(out / "checkpoint-4"), out)
    result = run_sft(
        _config(
            tiny_model_dir, tiny_dump, out, save_strategy="steps", save_steps=2, resume_from_checkpoint="true"
        )
    )
    assert result["trainer"].state.global_step == 4


def test_finished_dump_of_an_older_version_is_reused(tiny_model_dir, tmp_path):
    """A finished dump written before shards carried their config (and before the newer config
    fields existed) is accepted by a rerun with the same settings; a changed field is still named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lens_rl.data.dump import run_dump

    split = run_dump(_dump_cfg(tiny_model_dir, tmp_path))["train"]
    md = json.loads((split / "metadata.json").read_text())
    for key in ("attn_implementation", "model_dtype"):
        md["config"].pop(key)
    (split / "metadata.json").write_text(json.dumps(md))
    for shard in split.glob("rank_0/*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k in ("layer", "start", "count", "format")}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(shard), metadata=meta)
    run_dump(_dump_cfg(tiny_model_dir, tmp_path))
    with pytest.raises(ConfigError, match=r"different config \(min_pos: 4 -> 5\)"):
        run_dump(_dump_cfg(tiny_model_dir, tmp_path, min_pos=5))
