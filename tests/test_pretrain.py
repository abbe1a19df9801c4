"""The quickstart's base-model recipe: bit-reproducible on CPU, cached by recipe, recorded.

An earlier quickstart measured held-out FVE 0.19 on one machine and 0.44 on another with the
same code, because the pretrained base depended on the thread count. The recipe now trains in a
pinned single-thread child process; these tests build a tiny recipe twice, from parents with
different thread settings, and require bit-identical weights (``weights_sha256``).
"""

from __future__ import annotations

import json

import pytest
import torch

from lens_rl.cli.pretrain import PretrainRecipe, _recipe_matches, pretrain_small_lm

TINY = PretrainRecipe(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=1,
    seq_len=64,
    stdlib_files=3,
    batch_size=8,
    max_steps=8,
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the pinned child process is the CPU path")
def test_pretraining_is_bit_reproducible_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    a = pretrain_small_lm(tmp_path / "a", TINY, log=lambda *_: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    b = pretrain_small_lm(tmp_path / "b", TINY, log=lambda *_: None)
    ra, rb = (json.loads((p / "recipe.json").read_text()) for p in (a, b))
    assert ra["weights_sha256"] == rb["weights_sha256"]
    assert ra["corpus_sha256"] == rb["corpus_sha256"]
    assert ra["threads"] == 1 and ra["mkl_cbwr"] == "AVX2" and ra["aten_cpu_capability"] == "avx2"
    assert ra["determinism"] == 2 and ra["max_steps"] == TINY.max_steps

    # Same recipe: reused as is (the weights file is not rewritten).
    weights = next(a.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    logs: list[str] = []
    pretrain_small_lm(a, TINY, log=logs.append)
    assert weights.stat().st_mtime_ns == mtime and "reusing" in logs[0]

    # A folder written by the older, unpinned recipe (no `determinism` field) is not reused.
    old = {k: v for k, v in ra.items() if k != "determinism"}
    (b / "recipe.json").write_text(json.dumps(old))
    assert _recipe_matches(a, TINY) and not _recipe_matches(b, TINY)
