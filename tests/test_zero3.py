"""DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator over gloo), both stages under
``accelerate launch --use_deepspeed --zero_stage 3``, 2 processes, trainable decoder and encoder
bases, on an untied Llama and a tied Gemma-3: the same run under DDP is the reference (same seeds,
same batches, so the same rollouts in RL), and a resumed run must equal the straight one.

Opt-in (``-m slow``) and only with DeepSpeed installed (``EXTRAS=deepspeed make setup``). The
DeepSpeed config sets ``stage3_param_persistence_threshold: 0`` so that every tensor, however
small, is partitioned (DeepSpeed's default keeps tensors under 1e5 elements whole, which would be
every tensor of these tiny bases): the test then exercises the gathering of each one.
Tolerances are measured here and stated at each assertion.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from script_runner import accelerate_launch

from lens_rl.testing.tiny_models import build_tiny_model
from lens_rl.utils.launch import resolve_resume

pytestmark = pytest.mark.slow

TRAINABLE = ["--decoder", '{"trainable_base": true}', "--encoder", '{"trainable_base": true}']
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
}


@pytest.fixture(autouse=True)
def _needs_deepspeed():
    """Skip, saying why, without DeepSpeed (a fixture: the default run deselects these instead)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (EXTRAS=deepspeed make setup)")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tokenizer):
    """A tiny Gemma-3 with tied embeddings and its tokenizer, and its dump."""
    from lens_rl.data.dump import run_dump
    from lens_rl.testing.configs import tiny_dump_config

    path = tmp_path_factory.mktemp("tiny-gemma3-dir")
    model = build_tiny_model(
        "gemma3_text", path, len(tokenizer), seed=0, n_layers=2, eos_token_id=tokenizer.eos_token_id
    )
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    tokenizer.save_pretrained(path)
    return path, run_dump(tiny_dump_config(path, tmp_path_factory.mktemp("tiny-gemma3-dump")))


@pytest.fixture(params=["llama-untied", "gemma3-tied"])
def base(request, tiny_model_dir, tiny_dump):
    """(model folder, dump splits) of each family."""
    if request.param == "llama-untied":
        return tiny_model_dir, tiny_dump
    return request.getfixturevalue("gemma3_dir")


def _ds_file(tmp_path) -> str:
    """The ZeRO-3 config as the ``--deepspeed`` flag takes it (inline JSON)."""
    return json.dumps(ZERO3)


def _sft_args(model_dir, splits, out, **kw) -> list[str]:
    args = {
        "model_name_or_path": model_dir,
        "train_data": splits["train"],
        "val_data": splits["val"],
        "output_dir": out,
        "max_steps": 4,
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 8,
        "t_text": 4,
        "plot": "false",
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "explain_texts": 0,
    } | kw
    return [x for k, v in args.items() for x in (f"--{k}", str(v))] + TRAINABLE


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lens" / "lens.safetensors"))


def _max_diff(a_dir, b_dir) -> float:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(out) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]


def test_sft_zero3_matches_ddp_and_resumes_exactly(base, tmp_path):
    """ZeRO-3 on 2 processes == DDP on 2 processes after 4 steps at lr 1e-2 (weights of
    magnitude ~1; bound 5e-6, as ZeRO-2's), the saved lens gathered whole from the partitions;
    2 steps + resume + 2 steps == 4 straight, bit for bit."""
    model_dir, splits = base
    ds_cfg = _ds_file(tmp_path)
    ds, ddp = tmp_path / "ds", tmp_path / "ddp"
    res = accelerate_launch(
        "sft_lens.py", _sft_args(model_dir, splits, ds, deepspeed=ds_cfg), num_processes=2, port=29661
    )
    assert "DistributedType.DEEPSPEED" in res.stdout
    accelerate_launch("sft_lens.py", _sft_args(model_dir, splits, ddp), num_processes=2, port=29662)
    diff = _max_diff(ds, ddp)
    print(f"ZeRO-3 vs DDP, SFT 4 steps: max |dw| = {diff:.2e}")
    assert diff < 5e-6
    assert _losses(ds) == pytest.approx(_losses(ddp), rel=1e-6)
    final = json.loads((ds / "final_metrics.json").read_text())
    assert final == {} or all(isinstance(v, float) for v in final.values())

    assert resolve_resume("true", ds) == str(ds / "checkpoint-4")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ds / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(ds / "metrics.jsonl", resumed / "metrics.jsonl")
    res = accelerate_launch(
        "sft_lens.py",
        _sft_args(model_dir, splits, resumed, deepspeed=ds_cfg, resume_from_checkpoint="true"),
        num_processes=2,
        port=29663,
    )
    assert "resuming from" in res.stdout
    assert _max_diff(ds, resumed) == 0.0
    assert _losses(resumed) == _losses(ds)
