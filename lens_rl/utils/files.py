"""Files that survive interruption: outputs replaced atomically, JSONL read back after a crash.

- :func:`replace_on_success` hands out temporary names in the destination folders (hidden,
  ``.NAME.tmp-<pid>-<random><suffix>``, keeping the suffix for writers that read it) and
  renames them onto the final names, in the order given, only once the whole block has
  finished; on an error the temporary files are removed. A partial file (kill -9, a full disk)
  therefore never carries a final name: naming the last file last makes "finished" mean
  "every file is there". :func:`atomic_write_text` is the one-file case.
- :func:`iter_jsonl` / :func:`read_jsonl` read JSON lines with errors that name ``file:line``.
  A log the stages append to (``metrics.jsonl``) may end in a line cut short by a full disk or
  a killed process: with ``partial_tail=True`` an unreadable LAST line is dropped with a
  warning naming the file; an unreadable line before it is always an error.
- :func:`write_jsonl` rewrites such a log atomically (the repair after a cut-short tail).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to disk, so that the rename never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_on_success(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield one temporary path per entry of ``paths`` (same folder, hidden); when the block
    finishes, rename each written temporary file onto its final name, in the order given; when
    it raises, delete them and leave the final names untouched. Parent folders are created."""
    finals = [Path(p) for p in paths]
    temps = [_temporary_name(p) for p in finals]
    for p in finals:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temps
        for tmp, final in zip(temps, finals, strict=True):
            if not tmp.exists():
                raise FileNotFoundError(f"{final} was not written (nothing at its temporary name {tmp}).")
            _fsync(tmp)
        for tmp, final in zip(temps, finals, strict=True):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary name (see :func:`replace_on_success`)."""
    with replace_on_success(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write one JSON value per line to ``path`` atomically."""
    with replace_on_success(path) as (tmp,), tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return Path(path)


def decode_utf8(data: bytes, path: str | Path) -> str:
    """``data`` (the content of ``path``) as text; raises ValueError naming ``file:line`` of the
    first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte {column} of the line); save the file as UTF-8."
        ) from None


def iter_jsonl(path: str | Path, *, partial_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSON-lines file.

    Args:
        path: the file.
        partial_tail: the file is a log that is appended to: an unreadable last line (cut short
            by a full disk or a killed process) is skipped with a warning naming the file.

    Raises:
        ValueError: a line is not UTF-8 or not JSON (``file:line: ...``); with ``partial_tail``,
            only for lines before the last.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 (byte {e.start + 1} of the line)"
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at column {e.colno})"
        else:
            yield i + 1, value
            continue
        if partial_tail and i == last:
            logger.warning(
                "%s: the last line (%d) is incomplete (%s), probably cut short when the disk filled or "
                "the process was killed; it is ignored.",
                path,
                i + 1,
                problem,
            )
            return
        raise ValueError(f"{path}:{i + 1}: {problem}.")


def read_jsonl(path: str | Path, *, partial_tail: bool = True) -> list[dict[str, Any]]:
    """The JSON objects of a log the stages append to (``metrics.jsonl``, ...): see
    :func:`iter_jsonl`; a line that is JSON but not an object is an error naming ``file:line``."""
    rows = []
    for n, value in iter_jsonl(path, partial_tail=partial_tail):
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(value).__name__}.")
        rows.append(value)
    return rows
