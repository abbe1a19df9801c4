"""Shared fixtures: an offline tokenizer and tiny models of several families.

Everything is built locally (no hub): the tokenizer is a byte-level BPE trained on the
``pydoc_data`` topics, and each model is created from a config under a fixed seed, saved
with ``save_pretrained`` and loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import os

# Never touch the network, even when pytest is run by hand outside `make test`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoTokenizer

from lens_rl.data.corpus import pydoc_topics
from lens_rl.data.dataset import ActivationDataset
from lens_rl.data.dump import run_dump
from lens_rl.models.orig import OrigWrapper
from lens_rl.models.tokenizer import train_bpe_tokenizer
from lens_rl.testing.configs import tiny_dump_config
from lens_rl.testing.tiny_models import FAMILY_ARCHS, TINY_ARCHS, build_tiny_model

VOCAB_SIZE = 512


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests with a stated reason on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Byte-level BPE (vocab 512) trained offline on the pydoc topics, loaded from disk."""
    return train_bpe_tokenizer(pydoc_topics(), tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """Build (and cache per session) a tiny model: ``factory(arch, n_layers=2, seed=0)``."""
    cache: dict[tuple[str, int, int], torch.nn.Module] = {}

    def factory(arch: str, n_layers: int = 2, seed: int = 0):
        key = (arch, n_layers, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{n_layers}-{seed}")
            cache[key] = build_tiny_model(
                arch, path, len(tokenizer), seed=seed, n_layers=n_layers, eos_token_id=tokenizer.eos_token_id
            )
            cache[key].name_or_path_on_disk = str(path)
        return cache[key]

    return factory


LENS_ARCHS: tuple[str, ...] = ("gpt2", "llama", "qwen2", *FAMILY_ARCHS)


@pytest.fixture(params=LENS_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    """The families every lens check runs on (``llama_vllm`` is ``llama`` with head size 64)."""
    return request.param


ALL_ARCHS = TINY_ARCHS


# ----------------------------------------------------------------------------- measured maxima
_MEASURED: dict[str, tuple[float, str]] = {}


@pytest.fixture
def record_max():
    """Record a measured discrepancy (``where``: e.g. the family); the worst value of each quantity,
    and where it occurred, is printed after the run."""

    def record(name: str, value: float, where: str = "") -> float:
        if name not in _MEASURED or float(value) > _MEASURED[name][0]:
            _MEASURED[name] = (float(value), where)
        return value

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the largest measured discrepancies next to their tolerances' names."""
    if not _MEASURED:
        return
    terminalreporter.section("measured maxima (alignment checks)")
    for name, (value, where) in sorted(_MEASURED.items()):
        terminalreporter.write_line(f"{name:60s} {value:.3e}  {where}")


def _model_dir(tmp_path_factory, tokenizer, arch: str, name: str):
    path = tmp_path_factory.mktemp(name)
    model = build_tiny_model(
        arch, path, len(tokenizer), seed=0, n_layers=2, eos_token_id=tokenizer.eos_token_id
    )
    tokenizer.save_pretrained(path)
    return path, model


def _dump(model_dir, tmp_path_factory, name: str):
    return run_dump(tiny_dump_config(model_dir, tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """A folder holding a tiny Llama (head size 64, untied embeddings) and its tokenizer, as scripts expect."""
    return _model_dir(tmp_path_factory, tokenizer, "llama_vllm", "tiny-llama-dir")[0]


@pytest.fixture(scope="session")
def tiny_model_other_weights_dir(tiny_model_dir, tmp_path_factory):
    """``tiny_model_dir`` with its embeddings scaled: same architecture and shapes, other weights
    (what a dump made from ``tiny_model_dir`` must not be trained against)."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other-weights") / "tiny-llama-other"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dump(tiny_model_dir, tmp_path_factory):
    """Activation dump of ``tiny_model_dir`` after block 1 (128 train / 32 val windows of 32
    tokens): ``{"train": dir, "val": dir}``. Read-only for tests."""
    return _dump(tiny_model_dir, tmp_path_factory, "tiny-dump")


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """A folder holding a tiny Qwen2 with TIED input/output embeddings and its tokenizer."""
    path, model = _model_dir(tmp_path_factory, tokenizer, "qwen2", "tiny-qwen2-tied-dir")
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return path


@pytest.fixture(scope="session")
def tiny_tied_dump(tiny_tied_model_dir, tmp_path_factory):
    """Activation dump of ``tiny_tied_model_dir`` after block 1 (128 train / 32 val windows)."""
    return _dump(tiny_tied_model_dir, tmp_path_factory, "tiny-tied-dump")


@pytest.fixture(scope="module")
def grpo_parts(tiny_model_dir, tiny_dump):
    """What a LensGRPOTrainer is built from in the GRPO unit tests: ``(tokenizer, original model,
    training store)`` of ``tiny_model_dir`` and its dump (one load per test module)."""
    return (
        AutoTokenizer.from_pretrained(tiny_model_dir),
        OrigWrapper.from_pretrained(tiny_model_dir),
        ActivationDataset(tiny_dump["train"]),
    )


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory, tokenizer):
    """A tiny Gemma-3 with TIED embeddings and its tokenizer, and its dump: ``(folder, splits)``."""
    path, model = _model_dir(tmp_path_factory, tokenizer, "gemma3_text", "tiny-gemma3-dir")
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return path, _dump(path, tmp_path_factory, "tiny-gemma3-dump")


@pytest.fixture(params=["llama-untied", "gemma3-tied"])
def stage_base(request, tiny_model_dir, tiny_dump):
    """``(model folder, dump splits)`` of an untied Llama and a tied Gemma-3 (the sharded-engine
    stage tests run on both)."""
    if request.param == "llama-untied":
        return tiny_model_dir, tiny_dump
    return request.getfixturevalue("tiny_gemma3_dir")
