"""`make gpu-check` explains itself and runs nothing on a machine without CUDA; its table."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--out",
            str(out),
            "--cache_dir",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout and "Nothing was run" in res.stdout
    assert not out.exists() and not (tmp_path / "m").exists()  # no model built, no report written
    if shutil.which("nvidia-smi") is None:  # the Makefile's own guard: no driver, not even the venv is built
        make = subprocess.run(
            ["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert make.returncode == 0 and "Nothing was run" in make.stdout, make.stdout + make.stderr


def test_table_has_one_column_per_model_and_marks_failures():
    gc = _module()
    results = {
        "benchmarks": {
            "llama-1b": {
                "model": {"parameters": 1.24e9},
                "generation": [{"T": 32, "ratio_soft_over_kv": 2.5}, {"T": 128, "ratio_soft_over_kv": 7.0}],
                "rollouts": {
                    "hf_tokens_per_s": 1000.0,
                    "vllm_tokens_per_s": 9000.0,
                    "ratio_vllm_over_hf_tokens_per_s": 9.0,
                },
                "rl_step": {
                    "rollout_share": 0.5,
                    "score_old_share": 0.1,
                    "policy_fwd_bwd_share": 0.35,
                    "optimizer_share": 0.05,
                },
                "errors": {"dump": "RuntimeError: x"},
            },
            "gemma3-1b": {"failed": True, "returncode": 1},
        },
        "tests": {"counts": {"passed": 6}, "returncode": 0, "seconds": 12.0},
    }
    text = gc.table(results)
    lines = text.splitlines()
    assert lines[0] == "| figure | llama-1b | gemma3-1b |"
    assert "| soft / kv-cached time, T=128 | 7 | n/a |" in lines
    assert "| RL step: rollout / score / fwd+bwd / optim (%) | 50/10/35/5 | n/a/n/a/n/a/n/a |" in lines
    assert "| failed sections | dump | all |" in lines
    assert "{'passed': 6}" in lines[-1]
