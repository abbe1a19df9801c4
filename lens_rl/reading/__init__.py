"""Reading a lens: explain the activations of text (:func:`explain`), the result
(:class:`Explanations`: JSONL, a rich table) and its self-contained HTML page (:func:`write_html`)."""

from lens_rl.reading.explain import explain, explain_ids
from lens_rl.reading.page import write_html
from lens_rl.reading.results import HTML_FILE, JSONL_FILE, Explanations, parse_positions, read_texts

__all__ = [
    "HTML_FILE",
    "JSONL_FILE",
    "Explanations",
    "explain",
    "explain_ids",
    "parse_positions",
    "read_texts",
    "write_html",
]
