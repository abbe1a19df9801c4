"""Activation dumps: round trip, resume, multi-process, and clear errors on bad shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from script_runner import accelerate_launch

from lens_rl.config import ConfigError
from lens_rl.data.dataset import ActivationDataset, DumpError
from lens_rl.data.dump import DumpConfig, run_dump
from lens_rl.models.orig import OrigWrapper
from lens_rl.testing.configs import tiny_dump_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(model_dir, out, **kw) -> DumpConfig:
    """150 train / 40 val windows in shards of 64 (3 train shards), forwarded 32 at a time."""
    return tiny_dump_config(
        model_dir, out, **({"num_train": 150, "num_val": 40, "shard_size": 64, "batch_size": 32} | kw)
    )


@pytest.fixture(scope="module")
def dump(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    return run_dump(_cfg(tiny_model_dir, out)), out


def test_roundtrip_matches_the_model(dump, tiny_model_dir):
    splits, _ = dump
    ds = ActivationDataset(splits["train"])
    assert len(ds) == 150 and ds.layer == 1
    md = ds.metadata
    assert md["num_samples"] == 150 and md["seq_len"] == 32 and md["dtype"] == "float32"
    assert len(md["shards"]) == 3 and md["model_name_or_path"] == str(tiny_model_dir)
    orig = OrigWrapper.from_pretrained(tiny_model_dir)
    rows = torch.tensor([0, 70, 149])
    expected = orig.capture(ds.input_ids[rows].long(), 1, ds.token_pos[rows])
    got = torch.stack([ds[int(i)]["A"] for i in rows])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # batch shape differs from the dump
    assert ((ds.token_pos[:] >= 4) & (ds.token_pos[:] < 32)).all()
    assert (ds.a_prime_index[:] != torch.arange(150)).all()
    torch.testing.assert_close(ds[5]["A_prime"], ds.A[int(ds.a_prime_index[5])], rtol=0, atol=0)
    torch.testing.assert_close(ds.mean, ds.A[:].double().mean(0).float(), rtol=0, atol=1e-6)
    val = ActivationDataset(splits["val"])
    assert len(val) == 40
    # Train and val windows are disjoint.
    tr = {tuple(r.tolist()) for r in ds.input_ids}
    assert not any(tuple(r.tolist()) in tr for r in val.input_ids)


def _read(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_resume_rewrites_only_missing_shards(dump, tiny_model_dir):
    splits, out = dump
    train = Path(splits["train"])
    shard = train / "rank_0" / "shard_000000064.safetensors"
    before = {p.name: _read(p) for p in train.glob("rank_0/*.safetensors")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in train.glob("rank_0/*.safetensors")}
    shard.unlink()
    (train / "metadata.json").unlink()
    (train / "rank_0" / "shard_000000128.tmp").write_bytes(b"partial write")  # an interrupted write
    run_dump(_cfg(tiny_model_dir, out))
    after = {p.name: _read(p) for p in train.glob("rank_0/*.safetensors")}
    assert after.keys() == before.keys()
    for name in before:  # same tensors and metadata (safetensors orders metadata keys arbitrarily)
        assert before[name][1] == after[name][1]
        for k, v in before[name][0].items():
            assert torch.equal(v, after[name][0][k])
    assert {p.name: p.stat().st_mtime_ns for p in train.glob("rank_0/*.safetensors") if p != shard} == {
        k: v for k, v in mtimes.items() if k != shard.name
    }
    ActivationDataset(train)


def test_changed_config_is_refused(dump, tiny_model_dir):
    _, out = dump
    with pytest.raises(ConfigError, match="different config"):
        run_dump(_cfg(tiny_model_dir, out, seed=5))


def test_same_model_by_a_relative_path_reuses_the_dump(dump, tiny_model_dir, monkeypatch):
    """`./model` and `/abs/model` are one model: the finished dump is reused, not refused."""
    splits, out = dump
    train = Path(splits["train"])
    mtimes = {p: p.stat().st_mtime_ns for p in train.glob("rank_0/*.safetensors")}
    monkeypatch.chdir(tiny_model_dir.parent)
    again = run_dump(_cfg(tiny_model_dir.name, out))
    assert Path(again["train"]).resolve() == train.resolve()
    assert {p: p.stat().st_mtime_ns for p in train.glob("rank_0/*.safetensors")} == mtimes


@pytest.mark.parametrize("finished", [True, False])
def test_other_weights_at_the_same_path_are_refused(tiny_model_dir, tmp_path, finished):
    """A model folder retrained in place (same path, same config) must not reuse or extend the
    old dump: finished (metadata.json) and partial (shards only) dumps are both refused."""
    import shutil

    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / tiny_model_dir.name  # same basename: the dump lands in the same folder
    shutil.copytree(tiny_model_dir, model_dir)
    dump_out = tmp_path / "dump"
    run_dump(_cfg(model_dir, dump_out))
    if not finished:
        for meta in dump_out.rglob("metadata.json"):
            meta.unlink()
        next(dump_out.rglob("shard_000000064.safetensors")).unlink()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # "retrained"
    model.save_pretrained(model_dir)
    with pytest.raises(ConfigError, match="other weights at the same model path"):
        run_dump(_cfg(model_dir, dump_out))


def _copy_split(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", "cannot be read"),
        ("delete", "is missing"),
        ("layer", "layer 1"),
        ("count", "metadata implies"),
        ("no_metadata", "no metadata.json"),
    ],
)
def test_bad_shards_give_clear_errors(dump, tmp_path, damage, match):
    splits, _ = dump
    split = _copy_split(Path(splits["train"]), tmp_path / "train")
    shard = split / "rank_0" / "shard_000000000.safetensors"
    md_path = split / "metadata.json"
    md = json.loads(md_path.read_text())
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete":
        shard.unlink()
    elif damage == "layer":
        md["layer"] = 0
        md_path.write_text(json.dumps(md))
    elif damage == "count":
        md["shards"][0]["count"] = 63
        md_path.write_text(json.dumps(md))
    else:
        md_path.unlink()
    with pytest.raises(DumpError, match=match):
        ActivationDataset(split)


def test_incompatible_dump_is_refused(dump):
    splits, _ = dump
    with pytest.raises(DumpError, match="d_model 128 != the model's 64"):
        ActivationDataset(splits["train"]).check_compatible(64)


def test_dump_config_errors(tiny_model_dir):
    with pytest.raises(ConfigError, match="exactly one text source"):
        DumpConfig(model_name_or_path=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="min_pos"):
        _cfg(tiny_model_dir, "x", min_pos=40)
    with pytest.raises(ValueError, match="fewer than num_train"):
        run_dump(_cfg(tiny_model_dir, "unused", num_train=10**6))


def test_two_process_dump_equals_single_process(dump, tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 processes writes rank_0/rank_1 shards with identical content."""
    splits, _ = dump
    out = tmp_path / "dump2"
    args = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--corpus",
        "pydoc",
        "--layer",
        "1",
        "--seq_len",
        "32",
        "--min_pos",
        "4",
        "--num_train",
        "150",
        "--num_val",
        "40",
        "--shard_size",
        "64",
        "--batch_size",
        "32",
        "--output_dir",
        str(out),
    ]
    accelerate_launch("dump_activations.py", args, num_processes=2, port=29517, timeout=300)
    train2 = Path(str(splits["train"]).replace(str(Path(splits["train"]).parents[2]), str(out)))
    assert sorted(p.parent.name for p in train2.glob("rank_*/*.safetensors")) == [
        "rank_0",
        "rank_0",
        "rank_1",
    ]
    a, b = ActivationDataset(splits["train"]), ActivationDataset(train2)
    torch.testing.assert_close(a.A[:], b.A[:], rtol=0, atol=0)
    assert torch.equal(a.input_ids[:], b.input_ids[:])


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_local_files_as_corpus(tiny_model_dir, tmp_path, kind):
    """Local .txt and .jsonl files go through `datasets` (offline) into the same windows."""
    from lens_rl.data.corpus import pydoc_topics

    texts = pydoc_topics()[:200]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n".join(t.replace("\n", " ") for t in texts))
    else:
        path.write_text("\n".join(json.dumps({"body": t}) for t in texts))
    extra = {"text_column": "body"} if kind == "jsonl" else {}
    cfg = DumpConfig(
        model_name_or_path=str(tiny_model_dir),
        data_files=[str(path)],
        layer=0,
        seq_len=16,
        min_pos=2,
        num_train=40,
        num_val=8,
        output_dir=str(tmp_path / "out"),
        **extra,
    )
    splits = run_dump(cfg)
    ds = ActivationDataset(splits["train"])
    assert len(ds) == 40 and ds.metadata["config"]["data_files"] == [str(path)]
    with pytest.raises(ConfigError, match="Column 'nope'"):
        run_dump(DumpConfig(**{**cfg.to_dict(), "text_column": "nope"}))
