"""GPU-only paths (marker `gpu`; skipped with a stated reason on machines without CUDA)."""

from __future__ import annotations

import os

import pytest
import torch

from lens_rl.models import Decoder, DecoderConfig
from lens_rl.testing.configs import tiny_sft_config

pytestmark = pytest.mark.gpu


def test_bf16_generators_agree_on_gpu(tiny_model_factory, tokenizer):
    """bf16 on CUDA: the three generators still draw identical tokens; kv vs soft logits agree
    to bf16 precision (tolerance 5e-2, to be tightened from measurement on a lent GPU)."""
    base = tiny_model_factory("llama", n_layers=3)
    dec = Decoder.from_base(base, tokenizer, DecoderConfig(patch_all_layers=True), share_weights=False)
    dec = dec.to("cuda", torch.bfloat16)
    a = (4 * torch.randn(3, 64, generator=torch.Generator().manual_seed(0))).to("cuda", torch.bfloat16)
    outs = [
        getattr(dec, name)(a, 12, generator=torch.Generator("cuda").manual_seed(0))
        for name in ("generate_soft", "generate_soft_kv_cached", "generate_soft_kv_cached_nondiff")
    ]
    assert torch.equal(outs[0].hard_token_ids, outs[2].hard_token_ids)
    assert (outs[0].raw_lm_logits - outs[1].raw_lm_logits).abs().max() < 5e-2


def test_sft_bf16_autocast_step(tiny_model_dir, tiny_dump, tmp_path):
    """A short supervised run with the default bf16=None picks bf16 on CUDA and stays finite."""
    from lens_rl.training.sft_trainer import run_sft

    cfg = tiny_sft_config(
        tiny_model_dir, tiny_dump, tmp_path / "o", max_steps=3, t_text=4, logging_steps=10, explain_texts=4
    )
    result = run_sft(cfg)
    assert cfg.bf16 and result["trainer"].accelerator.mixed_precision == "bf16"
    assert torch.isfinite(torch.tensor(result["final"]["fve"]))


# ----------------------------------------------------------------------------- issue 17
# Written without a GPU (none was lent to the session that wrote them): run by `make gpu-check`.


def test_vllm_cuda_engine_settings_and_in_process_sync(tiny_model_dir):
    """On CUDA the engine runs in-process in the requested dtype, with CUDA graphs, the given
    memory fraction and max length; sync_weights goes through the engine model's load_weights
    (no tmpfs folder): a changed LM head changes the samples' log-probs, the original weights
    restore them exactly (same seeds)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from lens_rl.generation.vllm_backend import VLLMBackend
    from lens_rl.ops.sampling import SamplingPolicy

    engine = VLLMBackend(tiny_model_dir, dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=128)
    try:
        vc = engine.llm.llm_engine.vllm_config
        assert engine.on_cuda and not vc.model_config.enforce_eager
        assert vc.model_config.max_model_len == 128 and vc.model_config.dtype == torch.bfloat16
        assert vc.cache_config.gpu_memory_utilization == 0.2
        policy = SamplingPolicy(temperature=1.0)
        ids = [[5, 6, 7, 8]]

        def sample():
            return engine.generate(
                policy=policy, n=4, max_new_tokens=8, seed=3, prompt_token_ids=ids
            ).logprobs

        first = sample()
        hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        sd = hf.state_dict()
        changed = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] * 3})
        assert engine.sync_weights(changed.items()) > 0
        assert getattr(engine, "_sync_dir", None) is None  # no tmpfs round trip on CUDA
        assert sample() != first
        engine.sync_weights(sd.items())
        assert sample() == first
    finally:
        engine.close()


def test_flash_attention_matches_sdpa(tiny_model_dir, tokenizer):
    """flash-attn 2 (when installed) gives the decoder the same logits as sdpa, to bf16 precision
    (tolerance 5e-2, to be tightened from measurement)."""
    pytest.importorskip("flash_attn")
    from lens_rl.models.families import load_causal_lm

    outs = []
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 128, generator=g).to("cuda", torch.bfloat16)
    toks = torch.randint(0, 500, (2, 12), generator=g).to("cuda")
    for impl in ("sdpa", "flash_attention_2"):
        base = load_causal_lm(str(tiny_model_dir), dtype=torch.bfloat16, attn_implementation=impl).to("cuda")
        dec = Decoder.from_base(base, tokenizer, DecoderConfig(), share_weights=True).to("cuda")
        outs.append(dec.fwd_tokens(a, toks).logits.float())
    assert (outs[0] - outs[1]).abs().max() < 5e-2


def test_deepspeed_zero2_one_sft_step(tiny_model_dir, tiny_dump, tmp_path):
    """One SFT optimizer step under `accelerate launch` with the repository's ZeRO-2 config."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ds"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "configs" / "accelerate" / "deepspeed_zero2.yaml"),
        "--num_processes",
        "1",
        str(root / "scripts" / "sft_lens.py"),
        *("--model_name_or_path", str(tiny_model_dir), "--train_data", str(tiny_dump["train"])),
        *("--output_dir", str(out), "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"),
        *("--per_device_train_batch_size", "8", "--t_text", "4", "--plot", "false", "--bf16", "true"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert (out / "lens" / "lens.safetensors").exists()


def _realistic_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("LENS_RL_GPU_MODEL_DIRS", "").split(os.pathsep) if d]
    if not dirs:
        pytest.skip("LENS_RL_GPU_MODEL_DIRS is unset (scripts/gpu_check.py sets it to its built models)")
    return dirs


def test_realistic_shapes_bf16_generators_agree():
    """~1B random models (Llama-, Qwen3-, Gemma-3-shaped) in bf16: the kv-cached generator
    draws the same tokens as full recompute for 16 steps and its logits agree to bf16
    precision (tolerance 0.25 on logits of std ~1, to be tightened from measurement)."""
    from transformers import AutoTokenizer

    from lens_rl.models.families import load_causal_lm

    for path in _realistic_dirs():
        tok = AutoTokenizer.from_pretrained(path)
        base = load_causal_lm(path, dtype=torch.bfloat16).to("cuda").eval()
        dec = Decoder.from_base(base, tok, DecoderConfig(), share_weights=True).to("cuda")
        d = base.get_input_embeddings().weight.shape[1]
        a = torch.randn(4, d, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
        with torch.no_grad():
            soft = dec.generate_soft(a, 16, generator=torch.Generator("cuda").manual_seed(0))
            kv = dec.generate_soft_kv_cached(a, 16, generator=torch.Generator("cuda").manual_seed(0))
        same = (soft.hard_token_ids == kv.hard_token_ids).float().mean().item()
        diff = (soft.raw_lm_logits - kv.raw_lm_logits).abs().max().item()
        print(f"{path}: same tokens {same:.3f}, max |logit diff| {diff:.3g}")
        assert same == 1.0 and diff < 0.25, (path, same, diff)
        del dec, base
        torch.cuda.empty_cache()


@pytest.mark.parametrize("case", ["sft", "grpo", "rollout"])
def test_fsdp2_lens_modules_on_cuda(case):
    """FSDP2 (``fully_shard_lens``) on CUDA over NCCL, one process per GPU (up to 2), against the
    unsharded lens (lens_rl.testing.fsdp2_check): the same bounds as the CPU test
    (tests/test_fsdp2.py: gradients within 1e-6 of the largest entry, rollouts bit-identical);
    with one GPU the sharding is trivial but the CUDA code path of every unit runs."""
    from lens_rl.testing.fsdp2_check import fsdp2_vs_unsharded

    world = min(2, torch.cuda.device_count())
    r = fsdp2_vs_unsharded("llama", case, world=world, device="cuda")
    print(f"FSDP2 on CUDA, {world} process(es), {case}: {r}")
    if case == "rollout":
        assert r["tokens_equal"] and r["logq_err"] < 1e-5
    else:
        assert r["grads_compared"] == r["grads_in_reference"] > 0
        assert r["grad_rel_err"] < 1e-6 and r["step_rel_err"] < 1e-6 and r["state_dict_equal"]


def _sharded_sft_and_grpo_steps(
    model_dir, dump, tmp_path, launch_flags: list[str], extra: list[str], nproc: int
):
    """2 bf16 supervised steps with a checkpoint at step 1, then 1 bf16 GRPO step from the saved
    lens, both under ``accelerate launch`` with ``launch_flags`` (``nproc`` processes, one per GPU)
    and trainable bases (each launch must exit 0). Returns the two runs' stdout and the tensors
    of the checkpoint's model.safetensors and of both saved lenses."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_flags,
        "--num_processes",
        str(nproc),
    ]
    trainable = ["--decoder", '{"trainable_base": true}', "--encoder", '{"trainable_base": true}']
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    runs = [
        (
            "sft_lens.py",
            [
                *("--model_name_or_path", str(model_dir), "--train_data", str(dump["train"])),
                *("--output_dir", str(sft), "--max_steps", "2", "--eval_strategy", "no"),
                *("--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "8"),
                *("--t_text", "4", "--plot", "false", "--bf16", "true", "--explain_texts", "0", *trainable),
                *extra,
            ],
        ),
        (
            "rl_lens.py",
            [
                *("--model_name_or_path", str(model_dir), "--sft_lens", str(sft / "lens")),
                *("--train_data", str(dump["train"]), "--output_dir", str(rl), "--max_steps", "1"),
                *("--per_device_train_batch_size", "8", "--num_generations", "4", "--t_text", "4"),
                *("--report_to", "none", "--save_strategy", "no", "--bf16", "true", "--explain_texts", "0"),
                *extra,
            ],
        ),
    ]
    stdouts = []
    for script, args in runs:
        res = subprocess.run(
            [*launch, str(root / "scripts" / script), *args],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=root,  # the accelerate config names its DeepSpeed JSON relative to the repository
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        stdouts.append(res.stdout)
    saved = {
        "checkpoint-1": load_file(str(sft / "checkpoint-1" / "model.safetensors")),
        "sft lens": load_file(str(sft / "lens" / "lens.safetensors")),
        "rl lens": load_file(str(rl / "lens" / "lens.safetensors")),
    }
    return stdouts, saved


def _nonfinite(saved: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """``file/tensor`` names holding NaN/inf, and ``file`` names holding no tensor."""
    bad = [f for f, tensors in saved.items() if not tensors]
    return bad + [
        f"{f}/{k}" for f, ts in saved.items() for k, t in ts.items() if not torch.isfinite(t.float()).all()
    ]


def test_deepspeed_zero3_sft_and_grpo_steps(tiny_model_dir, tiny_dump, tmp_path):
    """ZeRO-3 with bf16 under the repository's ZeRO-3 accelerate config, one process per GPU (up to
    2; see :func:`_sharded_sft_and_grpo_steps`): both runs say they run ZeRO-3, and every saved
    tensor (the checkpoint's gathered model.safetensors, both lenses) is finite. The CPU tests
    (tests/test_zero3.py) check equality with DDP."""
    pytest.importorskip("deepspeed")
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    nproc = min(2, torch.cuda.device_count())
    stdouts, saved = _sharded_sft_and_grpo_steps(
        tiny_model_dir, tiny_dump, tmp_path, ["--config_file", str(config)], [], nproc
    )
    assert all("ZeRO-3: " in out and "DistributedType.DEEPSPEED" in out for out in stdouts)
    assert _nonfinite(saved) == []


def test_fsdp2_stage_sft_and_grpo_steps(tiny_model_dir, tiny_dump, tmp_path):
    """lens_rl's FSDP2 (``lens_fsdp2``) on 2 GPUs over NCCL with bf16 autocast (see
    :func:`_sharded_sft_and_grpo_steps`): both runs say they sharded, and every saved tensor is
    finite. ``lens_fsdp2`` refuses a single process, so this needs 2 GPUs. The CPU tests
    (tests/test_fsdp2_stages.py) check equality with DDP."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"lens_fsdp2 needs 2 processes, one per GPU; {torch.cuda.device_count()} GPU here")
    stdouts, saved = _sharded_sft_and_grpo_steps(
        tiny_model_dir,
        tiny_dump,
        tmp_path,
        ["--multi_gpu", "--mixed_precision", "bf16"],
        ["--lens_fsdp2", "true"],
        2,
    )
    assert all("FSDP2: the lens is sharded over 2 processes" in out for out in stdouts)
    assert _nonfinite(saved) == []
