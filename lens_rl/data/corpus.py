"""Offline text corpora that every Python installation carries.

No hub is reachable on the project's machines, so tokenizers and small base models are
trained on text that ships with CPython: the English documentation strings in
``pydoc_data/topics.py`` and the standard library's own ``.py`` sources. Both are read from
the running interpreter, so the corpus is reproducible for a given Python version.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def pydoc_topics() -> list[str]:
    """Return the documentation topics shipped in ``pydoc_data.topics`` (English prose)."""
    from pydoc_data import topics

    return [text for _, text in sorted(topics.topics.items())]


def stdlib_sources(max_files: int | None = None, min_chars: int = 200) -> list[str]:
    """Return the text of standard-library ``.py`` files in sorted path order.

    Args:
        max_files: stop after this many files (``None``: all of them).
        min_chars: skip files shorter than this (mostly empty ``__init__`` files).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in {"site-packages", "test", "idlelib", "lib2to3"} or "tests" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= min_chars:
            out.append(text)
        if max_files is not None and len(out) >= max_files:
            break
    return out


def iter_corpus(kind: str = "pydoc", max_files: int | None = None) -> Iterator[str]:
    """Yield documents of the named offline corpus: ``pydoc``, ``stdlib`` or ``both``."""
    if kind not in {"pydoc", "stdlib", "both"}:
        raise ValueError(f"Unknown corpus {kind!r}; choose one of 'pydoc', 'stdlib', 'both'.")
    if kind in {"pydoc", "both"}:
        yield from pydoc_topics()
    if kind in {"stdlib", "both"}:
        yield from stdlib_sources(max_files=max_files)
