"""Lazy, memory-flat reading of safetensors shards: rows are read on demand with ``pread``.

A dump split is a list of shard files, each holding rows ``[start, start + count)`` of every
tensor. :class:`ShardedRows` is a read-only, row-indexable view of one tensor name across all
shards: ``view[i]``, ``view[a:b]``, ``view[idx]`` (a 1-D index tensor or list) and
``view[idx, cols]`` read only the rows asked for, so the process holds no more than the rows a
batch needs, however large the dump. Files are read with ``os.pread`` (no memory map, so
pages read once do not stay counted in the process's resident memory), through a small cache
of open descriptors that is reset in a forked or unpickled copy (DataLoader workers).

:func:`stream_shard` walks a shard's bytes in bounded chunks, for checks and checksums that
must see every value (the same digest as :func:`lens_rl.data.dump.tensors_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lens_rl.config import InputError

# safetensors dtype codes -> torch dtypes (the ones a dump or its statistics use).
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FORMAT_VERSION = 1  # of a dump split (metadata.json and shards)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # storage of A
CHUNK_BYTES = 1 << 20  # bytes per read when streaming a whole tensor
MAX_OPEN_FILES = 64


class ShardFormatError(InputError):
    """A file is not a readable safetensors file (truncated, corrupted header, unknown dtype)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (index along the first dimension)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


@dataclass(frozen=True)
class ShardHeader:
    """A parsed safetensors header: the tensors and the string metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the named tensors' bytes (sorted by name): the shard's content checksum."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_header(path: str | Path) -> ShardHeader:
    """Parse the header of a safetensors file and check that every tensor lies inside the file.

    Raises :class:`ShardFormatError` on a truncated or corrupted file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ShardFormatError(f"{path}: {size} bytes, shorter than a safetensors header.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ShardFormatError(f"{path}: header length {n} exceeds the file size {size}.")
        try:
            raw = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardFormatError(f"{path}: header is not valid JSON ({e}).") from e
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{path}: header is not a JSON object.")
    base = 8 + n
    meta = raw.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in raw.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFormatError(f"{path}: bad header entry for {name!r}: {info!r}.") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0 or base + end > size:
            raise ShardFormatError(
                f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) at bytes [{begin}, {end}) "
                f"does not fit the file of {size} bytes (truncated or corrupted)."
            )
        tensors[name] = TensorInfo(dtype, shape, base + begin, end - begin)
    return ShardHeader(path, tensors, dict(meta))


class FileCache:
    """Open read-only descriptors, least recently used closed first; reset after fork/unpickle."""

    def __init__(self, capacity: int = MAX_OPEN_FILES) -> None:
        self.capacity = capacity
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._pid = os.getpid()

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # a forked copy: the parent's descriptors are not ours to cache
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self._fds) >= self.capacity:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def preadinto(self, path: Path, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes of ``path`` from ``offset`` (an error if the file is shorter)."""
        fd = self._fd(path)
        done, nbytes = 0, len(view)
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise ShardFormatError(f"{path}: ended after {offset + done} bytes (truncated).")
            done += got

    def pread(self, path: Path, nbytes: int, offset: int) -> bytearray:
        """``nbytes`` bytes of ``path`` from ``offset``, in a new buffer."""
        out = bytearray(nbytes)
        self.preadinto(path, memoryview(out), offset)
        return out

    def close(self) -> None:
        """Close every cached descriptor of this process."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _to_tensor(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Wrap ``buf`` (no copy) as a tensor of ``shape``."""
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class ShardedRows:
    """Read-only view of one tensor split by rows across shard files (see the module docstring).

    Attributes:
        name: the tensor's name in every shard.
        shape: ``(total rows, *row shape)``.
        dtype: storage dtype (values are returned as stored; callers upcast).
    """

    def __init__(
        self,
        name: str,
        headers: Sequence[ShardHeader],
        starts: Sequence[int],
        files: FileCache,
    ) -> None:
        if not headers:
            raise ValueError("ShardedRows needs at least one shard.")
        self.name = name
        self._infos = [h.tensors[name] for h in headers]
        self._paths = [h.path for h in headers]
        self._starts = torch.tensor(list(starts), dtype=torch.long)
        self._start_list = list(starts)
        self._counts = [i.shape[0] for i in self._infos]
        self._files = files
        first = self._infos[0]
        self.dtype = first.dtype
        self.row_shape = first.shape[1:]
        self.shape = torch.Size((sum(self._counts), *self.row_shape))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        """Number of dimensions of the whole tensor."""
        return len(self.shape)

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (1-D, already in range), in that order: read straight into the output
        tensor's memory, one read per run of consecutive rows of one shard."""
        n = rows.numel()
        out = torch.empty((n, *self.row_shape), dtype=self.dtype)
        rb = self._infos[0].row_bytes
        if n == 0 or rb == 0:
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        shard = (torch.searchsorted(self._starts, rows.contiguous(), right=True) - 1).tolist()
        rl = rows.tolist()
        k = 0
        while k < n:
            s, r0 = shard[k], rl[k]
            m = k + 1
            while m < n and shard[m] == s and rl[m] == rl[m - 1] + 1:
                m += 1
            offset = self._infos[s].offset + (r0 - self._start_list[s]) * rb
            self._files.preadinto(self._paths[s], view[k * rb : m * rb], offset)
            k = m
        return out

    def _rows(self, key) -> tuple[torch.Tensor, bool]:
        """The row indices ``key`` selects and whether the row dimension is kept."""
        n = len(self)
        if isinstance(key, int | torch.SymInt) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"{self.name}: row {i} out of range for {n} rows.")
            return torch.tensor([i % n]), False
        if isinstance(key, slice):
            return torch.arange(n)[key], True
        idx = torch.as_tensor(key)
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise IndexError(f"{self.name}: a boolean row mask must have shape ({n},).")
            return idx.nonzero().flatten(), True
        if idx.ndim != 1 or idx.is_floating_point():
            raise IndexError(f"{self.name}: rows must be an int, a slice or a 1-D integer index.")
        idx = idx.long().cpu()
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"{self.name}: row index out of range for {n} rows.")
        return idx % n if idx.numel() else idx, True

    def __getitem__(self, key) -> torch.Tensor:
        """Rows as a tensor; ``view[rows, cols]`` pairs a row index with a column index like
        tensor indexing does (``cols``: int, slice, or an index tensor as long as ``rows``)."""
        rest = ()
        if isinstance(key, tuple):
            if len(key) > 2:
                raise IndexError(f"{self.name}: at most (rows, cols) indexing is supported.")
            key, *rest = key
        rows, keep = self._rows(key)
        out = self._read(rows)
        if not keep:
            out = out[0]
        if not rest:
            return out
        (col,) = rest
        if not keep or isinstance(col, int | slice):
            return out[(slice(None), col)] if keep else out[col]
        col = torch.as_tensor(col).cpu()
        return out[torch.arange(out.shape[0]), col]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"ShardedRows({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self._paths)})"


def stream_shard(
    header: ShardHeader,
    on_chunk: Callable[[str, int, torch.Tensor], None] | None = None,
    digest: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
    names: Sequence[str] | None = None,
) -> str | None:
    """Read every tensor of a shard in row-aligned chunks of at most ``chunk_bytes``.

    Calls ``on_chunk(name, first_row, rows)`` for each chunk and returns the content digest
    (the one :func:`lens_rl.data.dump.tensors_digest` computes on the whole tensors) when
    ``digest``. ``names`` limits the walk to those tensors (no digest then). Memory use is one
    chunk, whatever the shard's size.
    """
    if names is not None:
        digest = False
    h = hashlib.sha256() if digest else None
    files = FileCache(capacity=1)
    try:
        for name in sorted(names if names is not None else header.tensors):
            info = header.tensors[name]
            if h is not None:
                h.update(f"{name}:{info.dtype}:{info.shape};".encode())
            rows = info.shape[0] if info.shape else 1
            row_bytes = info.nbytes // rows if rows else 0
            step = max(1, chunk_bytes // max(row_bytes, 1))
            for r in range(0, rows, step):
                k = min(step, rows - r)
                buf = files.pread(header.path, k * row_bytes, info.offset + r * row_bytes)
                if h is not None:
                    h.update(buf)
                if on_chunk is not None:
                    on_chunk(name, r, _to_tensor(buf, info.dtype, (k, *info.shape[1:])))
    finally:
        files.close()
    return h.hexdigest() if h is not None else None
