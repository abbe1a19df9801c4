"""Foundation checks: offline tokenizer, tiny models through from_pretrained, config parsing."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Literal

import pytest
import torch

from lens_rl.config import ConfigError, ValidatedConfig, parse_args
from lens_rl.models.families import load_causal_lm
from lens_rl.testing.tiny_models import TINY_ARCHS, build_tiny_model, tiny_config


def test_runs_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tokenizer_roundtrip(tokenizer):
    text = "The with statement is used to wrap the execution of a block."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # BPE merged something
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    assert len(tokenizer) == 512


@pytest.mark.parametrize("name", TINY_ARCHS)
def test_tiny_model_loads_from_disk(name, tiny_model_factory, tokenizer):
    model = tiny_model_factory(name)
    expected_class = {
        "gpt2": "GPT2LMHeadModel",
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
        "olmo2": "Olmo2ForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "gpt_neox": "GPTNeoXForCausalLM",
    }
    assert type(model).__name__ == expected_class[name.removesuffix("_vllm")]
    # Reloading the saved folder gives bit-identical logits.
    # (load_causal_lm: plain from_pretrained would load Gemma 2 with sdpa, without attention soft-capping)
    again = load_causal_lm(model.name_or_path_on_disk).eval()
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)


def test_vllm_llama_head_size():
    cfg = tiny_config("llama_vllm", 512)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM's CPU kernel rejects 16


def test_seeded_build_is_deterministic(tmp_path):
    a = build_tiny_model("llama", tmp_path / "a", 64, seed=3)
    b = build_tiny_model("llama", tmp_path / "b", 64, seed=3)
    c = build_tiny_model("llama", tmp_path / "c", 64, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pa[name], pb[name])
    assert not torch.equal(pa[name], pc[name])


@dataclasses.dataclass
class _DemoConfig(ValidatedConfig):
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "number of steps"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode"})
    name: str | None = field(default=None, metadata={"help": "run name"})

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


def test_parse_yaml_then_cli_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 2\nsteps: 7\nmode: b\n")
    (cfg,) = parse_args([_DemoConfig], ["--config", str(cfg_file), "--steps", "9"])
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float)  # int in YAML coerced to float
    assert cfg.steps == 9 and cfg.mode == "b" and cfg.name is None


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("lr: 1e-3\nbogus: 1\n", "Unknown arguments from config file"),
        ("steps: 1.5\n", r"_DemoConfig.steps = 1.5 \(float\)"),
        ("name: [1, 2]\n", r"_DemoConfig.name = \[1, 2\]"),
        ("steps: many\n", "Invalid command-line or YAML value"),
        ("mode: c\n", r"_DemoConfig.mode = 'c'"),
        ("steps: 0\n", "steps must be positive"),
        ("- a\n- b\n", "must contain a YAML mapping"),
    ],
)
def test_parse_rejects_bad_yaml(tmp_path, yaml_text, match):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        parse_args([_DemoConfig], ["--config", str(cfg_file)])


def test_parse_rejects_unknown_flag():
    with pytest.raises(ConfigError, match="not used"):
        parse_args([_DemoConfig], ["--stepz", "3"])


def test_parse_rejects_bad_cli_choice():
    with pytest.raises(ConfigError, match="Invalid command-line"):
        parse_args([_DemoConfig], ["--mode", "c"])
