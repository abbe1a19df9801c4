"""Lazy dump reading: row views agree with the stored tensors, checks stream shard by shard,
and resident memory does not grow with the size of the dump."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens_rl.data.dataset import ActivationDataset, DumpError
from lens_rl.data.shards import read_header, stream_shard, tensors_digest
from lens_rl.testing.synthetic_dump import write_synthetic_dump

ROOT = Path(__file__).resolve().parents[1]


def _full(split: Path, key: str) -> torch.Tensor:
    """The whole tensor ``key`` of a split, loaded eagerly (the reference)."""
    files = sorted(split.glob("rank_*/shard_*.safetensors"))
    return torch.cat([load_file(str(f))[key] for f in files])


@pytest.fixture(scope="module")
def bf16_split(tmp_path_factory) -> Path:
    """30 records over 5 shards of 7 (the last one short), A stored in bf16."""
    out = tmp_path_factory.mktemp("synthetic") / "train"
    return write_synthetic_dump(out, 30, 16, seq_len=8, vocab_size=50, shard_size=7, dtype="bfloat16")


def test_row_views_index_like_tensors(bf16_split):
    ds = ActivationDataset(bf16_split)
    a, ids, pos = _full(bf16_split, "A"), _full(bf16_split, "input_ids"), _full(bf16_split, "token_pos")
    assert len(ds) == 30 and ds.A.shape == a.shape and ds.A.dtype == torch.bfloat16
    idx = torch.tensor([29, 3, 3, 7, 6, 14, 0, 28])  # unordered, repeated, across shard borders
    assert torch.equal(ds.A[idx], a[idx])
    assert torch.equal(ds.A[[5, 1]], a[[5, 1]])
    assert torch.equal(ds.A[4:23:3], a[4:23:3])
    assert torch.equal(ds.A[-1], a[-1]) and torch.equal(ds.A[torch.tensor(9)], a[9])
    assert torch.equal(ds.A[:], a)
    mask = torch.arange(30) % 4 == 1
    assert torch.equal(ds.A[mask], a[mask])
    # what the GRPO trainer reads: the token at each record's position
    assert torch.equal(ds.input_ids[idx, ds.token_pos[idx]], ids[idx, pos[idx]])
    assert torch.equal(ds.input_ids[idx, 2], ids[idx, 2]) and torch.equal(ds.input_ids[3, 1:4], ids[3, 1:4])
    assert torch.equal(ds.A[torch.tensor([], dtype=torch.long)], a[:0])
    with pytest.raises(IndexError, match="out of range"):
        ds.A[30]
    with pytest.raises(IndexError, match="out of range"):
        ds.A[torch.tensor([0, 31])]
    # records upcast A to fp32 and pair it with A' by index
    rec = ds[12]
    j = int(ds.a_prime_index[12])
    assert rec["A"].dtype == torch.float32 and torch.equal(rec["A"], a[12].float())
    assert torch.equal(rec["A_prime"], a[j].float()) and torch.equal(rec["prime_input_ids"], ids[j].long())
    # statistics of the stored values, computed at dump time
    torch.testing.assert_close(ds.mean, a.double().mean(0).float(), rtol=0, atol=1e-6)
    # a DataLoader batch (__getitems__, one read per tensor) holds exactly the per-record values
    batch = ds.__getitems__([12, 0, 29, 12])
    for got, k in zip(batch, [12, 0, 29, 12], strict=True):
        want = ds[k]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[f], want[f]) and got[f].dtype == want[f].dtype for f in want)
    # a copy in another process (DataLoader workers) reopens its own files
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.A[idx], a[idx])


def test_streamed_digest_equals_the_dump_checksum(bf16_split):
    shard = sorted(bf16_split.glob("rank_0/*.safetensors"))[1]
    header = read_header(shard)
    whole = tensors_digest(load_file(str(shard)))
    assert stream_shard(header, chunk_bytes=40) == whole == header.metadata["sha256"]


def test_changed_bytes_fail_the_checksum_naming_the_shard(bf16_split, tmp_path):
    import shutil

    split = Path(shutil.copytree(bf16_split, tmp_path / "train"))
    shard = sorted(split.glob("rank_0/*.safetensors"))[2]
    info = read_header(shard).tensors["input_ids"]
    raw = bytearray(shard.read_bytes())
    raw[info.offset] ^= 1  # a token id changes; the header and every range check still pass
    shard.write_bytes(bytes(raw))
    with pytest.raises(DumpError, match="checksum mismatch") as err:
        ActivationDataset(split)
    assert str(shard) in str(err.value)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_data_rss", ROOT / "benchmarks" / "bench_data_rss.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_memory_is_flat_in_the_dump_size(tmp_path):
    """Open a dump and draw 20 shuffled batches of 32 records (the SFT trainer's data path) in a
    fresh process, on a dump of 4,096 records (8.6 MB) and one 8x larger (+60 MB). Holding the
    split in memory would add >= 60 MB; reading rows lazily adds nothing that scales. Measured on
    the project's CPU machine: +1.7 MB (d=512, 8,192 vs 65,536 records, +120 MB of data); the bound
    is 12 MB (20% of the extra data), above the allocator's noise."""
    res = _bench().compare(tmp_path, "iterate", 4096, 512, 512, steps=20, batch=32)
    assert res["dump_growth_mb"] > 55
    assert res["rss_growth_mb"] < 12, res
