"""The docs hold together: README.md is a short front door, and every relative link in it and in
``docs/*.md`` reaches a file that exists and, with an ``#anchor``, a heading of that page.

Pure text checks (no network, no model): external ``http(s)``/``mailto`` links are not fetched.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from lens_rl.cli.demo import PLATEAU

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target), optionally with a "title"; the text may hold `code`.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
_LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")  # GitHub's line anchors into source files


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [README, *sorted((ROOT / "docs").glob("**/*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        m = _FENCE.match(line.lstrip())
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and emphasis unwrapped), lowercased,
    every character but letters, digits, spaces, '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor the headings of ``page`` produce (repeats get GitHub's -1, -2, ... suffixes)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link on ``page`` outside code."""
    out = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        ref = _REF_DEF.match(line)
        if ref:
            out.append((number, ref.group(1)))
            continue
        line = _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        out.extend((number, m.group(1)) for m in _LINK.finditer(line))
    return out


def _shown(page: Path) -> str:
    """``page`` relative to the repository when it is inside it."""
    try:
        return str(page.relative_to(ROOT))
    except ValueError:
        return str(page)


def broken_links(page: Path) -> list[str]:
    """What is wrong with each relative link on ``page``: a missing file or an unknown anchor."""
    problems = []
    for number, target in links(page):
        if _EXTERNAL.match(target):
            continue  # external: not fetched
        where = f"{_shown(page)}:{number}"
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not path_part and not anchor:
            problems.append(f"{where}: empty link target")
            continue
        if not dest.exists():
            problems.append(f"{where}: {target!r}: no file {dest}")
            continue
        if not anchor:
            continue
        if dest.suffix.lower() == ".md":
            if anchor not in anchors(dest):
                known = ", ".join(sorted(anchors(dest))) or "none"
                problems.append(f"{where}: {target!r}: no heading gives #{anchor} (anchors: {known})")
        elif not _LINE_ANCHOR.match(anchor):
            problems.append(f"{where}: {target!r}: #{anchor} into a non-Markdown file")
    return problems


def test_readme_is_a_short_front_door():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines; keep it to {MAX_README_LINES} (move text into docs/)"
    )


def test_docs_folder_has_an_index_linked_from_the_readme():
    assert (ROOT / "docs" / "README.md").is_file()
    targets = {t.partition("#")[0] for _, t in links(README)}
    assert "docs/README.md" in targets, "README.md should link the docs index docs/README.md"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Two commands on a fresh machine", "two-commands-on-a-fresh-machine"),
        ("The `lens-rl` command", "the-lens-rl-command"),
        (
            "Scale: memory-flat data, LoRA, the CUDA vLLM path, gpu-check",
            "scale-memory-flat-data-lora-the-cuda-vllm-path-gpu-check",
        ),
        ("`fwd_tokens(A, tokens, policy=None)`", "fwd_tokensa-tokens-policynone"),
        ("LoRA (peft)", "lora-peft"),
        ("What is guarded (both training stages)", "what-is-guarded-both-training-stages"),
        ("Trainer-vs-sampler mismatch", "trainer-vs-sampler-mismatch"),
    ],
)
def test_github_anchor(heading: str, anchor: str):
    assert github_anchor(heading) == anchor


def test_a_broken_link_is_caught(tmp_path: Path):
    """The checker itself fails on a missing file, a missing anchor and an anchor in a code block."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Real heading\n\n```\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Front\n\n"
        "[ok](docs/a.md) [ok anchor](docs/a.md#real-heading) [self](#front) [web](https://example.com/x#y)\n"
        "[missing file](docs/nope.md)\n"
        "[missing anchor](docs/a.md#no-such-heading)\n"
        "[fenced heading](docs/a.md#not-a-heading)\n"
        "`[in code](docs/nope.md)`\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "nope.md" in problems[0] and "no-such-heading" in problems[1] and "not-a-heading" in problems[2]


def test_demo_plateau_is_the_benchmark_figure():
    """The plateau the demo prints is the converged run of benchmarks/rl_vs_sft.py (its JSON)."""
    converged = json.loads((ROOT / "benchmarks" / "results" / "rl_vs_sft.json").read_text())["converged"]
    assert PLATEAU["steps"] == converged["steps"]
    assert PLATEAU["fve"] == round(converged["final"]["fve"], 3)
