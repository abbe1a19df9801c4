"""What explaining a lens returns and reads: :class:`Explanations` (rows, the decoded tokens, the
facts that produced them; JSONL, a rich table, the HTML page), the positions to explain
(:func:`parse_positions`) and the texts from a file (:func:`read_texts`).

Each row is one explained position: ``text_index``, ``position``, ``token``, ``context``,
``explanation`` (the best of ``k`` samples by reconstruction), its scores ``rel_error``,
``fve``, ``nmse``, ``kl`` (see :mod:`lens_rl.reading.explain`), ``normaliser``, and
``samples`` (all ``k``, best first, each with its own scores).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from lens_rl.reading.page import write_html
from lens_rl.utils.files import decode_utf8, iter_jsonl, replace_on_success

JSONL_FILE = "explanations.jsonl"
HTML_FILE = "explanations.html"


def parse_positions(spec: str | int | Sequence[int], n_tokens: int, where: str = "the text") -> list[int]:
    """Positions to explain in a text of ``n_tokens`` tokens.

    Args:
        spec: ``"all"``, ``"last"``, an int, a list of ints, or ``"i,j,..."``; negative indices
            count from the end (``-1`` is the last token).
        n_tokens: the text's length in tokens.
        where: how errors name the text.
    """
    if n_tokens < 1:
        raise ValueError(f"{where} has no tokens; nothing to explain.")
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n_tokens))
        if s == "last":
            return [n_tokens - 1]
        try:
            spec = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"positions must be 'all', 'last' or comma-separated token indices like '0,3,-1', got {spec!r}."
            ) from None
    elif isinstance(spec, int):
        spec = [spec]
    out = []
    for p in spec:
        q = p + n_tokens if p < 0 else p
        if not 0 <= q < n_tokens:
            raise ValueError(f"position {p} is outside {where} ({n_tokens} tokens: 0..{n_tokens - 1}).")
        out.append(q)
    if not out:
        raise ValueError(f"no positions given for {where}.")
    return sorted(set(out))


def read_texts(path: str | Path) -> list[str]:
    """Texts from a file: ``.jsonl`` (one object per line with a ``"text"`` field, or a JSON
    string per line) or any other file as plain text (texts separated by blank lines).

    Raises:
        ValueError: a line is not UTF-8, not JSON (``.jsonl``) or holds no text string; the
            message names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file.")
    if path.suffix == ".jsonl":
        texts = []
        for i, obj in iter_jsonl(path):
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                texts.append(obj["text"])
            elif isinstance(obj, str):
                texts.append(obj)
            else:
                raise ValueError(f"{path}:{i}: expected an object with a 'text' string, or a string.")
    else:
        raw = decode_utf8(path.read_bytes(), path)
        texts = [t.strip("\n") for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text.")
    return texts


@dataclass
class Explanations:
    """The result of :func:`explain`.

    Attributes:
        rows: one dict per explained position (see the module docstring for the scores):
            ``text_index``, ``position``, ``token``, ``context``, ``explanation`` (the best
            sample), ``rel_error``, ``fve``, ``nmse``, ``kl``, ``normaliser``, and ``samples``
            (all ``k``, best first, each with its own scores).
        tokens: per text, the decoded string of every token (for the page).
        info: what produced them (lens folder, layer, ``t_text``, ``k``, seed, ...).
    """

    rows: list[dict[str, Any]]
    tokens: list[list[str]]
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def summary(self) -> dict[str, float]:
        """Means over positions of the best sample's scores (and of every sample's)."""
        mean = lambda key, rows: sum(r[key] for r in rows) / max(len(rows), 1)  # noqa: E731
        every = [s for r in self.rows for s in r["samples"]]
        return {
            "positions": len(self.rows),
            "best_fve": mean("fve", self.rows) if self.rows else float("nan"),
            "best_kl": mean("kl", self.rows) if self.rows else float("nan"),
            "sample_fve": mean("fve", every) if every else float("nan"),
            "sample_kl": mean("kl", every) if every else float("nan"),
        }

    def write_jsonl(self, path: str | Path) -> Path:
        """One JSON object per explained position, written to a temporary name in the same folder
        and renamed: an interrupted write never leaves a partial file under ``path``."""
        path = Path(path)
        with replace_on_success(path) as (tmp,), tmp.open("w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path

    def write_html(self, path: str | Path, title: str = "lens explanations") -> Path:
        """The self-contained page (see :func:`write_html`)."""
        return write_html(self, path, title=title)

    def table(self, title: str = "explanations (best of k by reconstruction)", max_rows: int | None = None):
        """A ``rich`` table: position, context, token, best explanation, FVE, KL."""
        t = Table(title=title)
        for col, kw in (
            ("text", {"justify": "right"}),
            ("pos", {"justify": "right"}),
            ("context", {"overflow": "fold", "max_width": 30}),
            ("token", {}),
            ("explanation (best)", {"overflow": "fold"}),
            ("FVE", {"justify": "right"}),
            ("KL", {"justify": "right"}),
        ):
            t.add_column(col, **kw)
        for r in self.rows[:max_rows]:
            t.add_row(
                str(r["text_index"]),
                str(r["position"]),
                repr(r["context"][-30:]),
                repr(r["token"]),
                repr(r["explanation"]),
                f"{r['fve']:.2f}",
                f"{r['kl']:.3f}",
            )
        return t
