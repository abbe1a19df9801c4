"""The three stages on families beyond the quickstart's, in fp32 and in bf16 weights:
dump -> `accelerate launch scripts/sft_lens.py` -> `accelerate launch scripts/rl_lens.py` on a
tiny Qwen3 and a tiny Gemma-3-text (scaled embeddings, sliding-window layers, one KV head)."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file
from script_runner import accelerate_launch

from lens_rl.data.dump import run_dump
from lens_rl.testing.configs import tiny_dump_config
from lens_rl.testing.tiny_models import build_tiny_model

_PORTS = iter(range(29601, 29640))


# The default run covers both families and both dtypes once each (Gemma 3, tied with scaled
# embeddings, in bf16; Qwen3 in fp32); the other two pairs are opt-in (`slow`, ~40 s each).
@pytest.mark.parametrize(
    ("arch", "model_dtype"),
    [
        ("gemma3_text", "bfloat16"),
        ("qwen3", "float32"),
        pytest.param("gemma3_text", "float32", marks=pytest.mark.slow),
        pytest.param("qwen3", "bfloat16", marks=pytest.mark.slow),
    ],
)
def test_dump_sft_rl_on_family(arch, model_dtype, tokenizer, tmp_path):
    model_dir = tmp_path / arch
    build_tiny_model(arch, model_dir, len(tokenizer), seed=0, n_layers=2, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    splits = run_dump(
        tiny_dump_config(model_dir, tmp_path / "dump", num_train=64, num_val=16, model_dtype=model_dtype)
    )
    common = ["--model_name_or_path", model_dir, "--train_data", splits["train"], "--val_data", splits["val"]]
    common += ["--model_dtype", model_dtype, "--t_text", "4", "--per_device_train_batch_size", "8"]
    sft = tmp_path / "sft"
    accelerate_launch(
        "sft_lens.py",
        [*common, "--output_dir", sft, "--max_steps", "3", "--eval_strategy", "no", "--save_steps", "3"]
        + ["--kl_weight", "0.5", "--lm_weight", "0.1", "--logging_steps", "1", "--explain_texts", "1"]
        + ["--decoder", '{"trainable_base": true}', "--encoder", '{"trainable_base": true}'],
        port=next(_PORTS),
    )
    final = json.loads((sft / "final_metrics.json").read_text())
    assert math.isfinite(final["fve"]) and final["num_samples"] == 16
    explained = [json.loads(r) for r in (sft / "explanations_val.jsonl").read_text().splitlines()]
    assert len(explained) == 32 and all(math.isfinite(r["fve"]) and r["kl"] > -1e-6 for r in explained)
    weights = load_file(str(sft / "lens" / "lens.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {f"torch.{model_dtype}"}
    rl = tmp_path / "rl"
    accelerate_launch(
        "rl_lens.py",
        [
            *common,
            "--output_dir",
            rl,
            "--sft_lens",
            sft / "lens",
            "--max_steps",
            "2",
            "--num_generations",
            "4",
            "--encoder_mse_weight",  # the (trainable-base) encoder keeps training on the rollouts
            "1.0",
        ]
        + ["--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--rollout_backend", "hf"],
        port=next(_PORTS),
    )
    result = json.loads((rl / "final_metrics.json").read_text())
    rows = [r for r in result["log_history"] if "reward" in r]
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    assert all(math.isfinite(r["lens/encoder_mse"]) for r in rows)
    assert math.isfinite(result["after"]["fve"])
