"""``lens-rl explain``: explain text with a saved lens: ``explanations.jsonl``, a table and
``explanations.html`` in ``--output_dir``. Every numeric flag is checked when parsed (argparse
names the flag); the folder is locked for the command's life and both files are written to
temporary names and renamed (see :func:`main`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console

from lens_rl.models.lens import ConsistencyLens
from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.reading.explain import explain
from lens_rl.reading.results import HTML_FILE, JSONL_FILE, Explanations, parse_positions, read_texts
from lens_rl.utils.files import replace_on_success
from lens_rl.utils.outputs import lock_output_dir, refuse_existing_outputs


def _int_at_least(low: int, none: bool = False):
    """An argparse ``type``: an integer >= ``low`` (or ``none`` -> None when ``none``); argparse
    prefixes the error with the flag."""

    def parse(text: str) -> int | None:
        if none and text.strip().lower() == "none":
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer{' or none' if none else ''}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{' (or none)' if none else ''}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool, high_open: bool):
    """An argparse ``type``: a finite float in the interval (``low_open``/``high_open`` exclude
    the ends)."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return value

    return parse


def _positions_arg(text: str) -> str:
    """An argparse ``type``: the syntax of ``--positions`` (ranges are checked per text)."""
    try:
        if text.strip().lower() not in ("all", "last"):
            parse_positions(text, sys.maxsize)  # the syntax (ranges are per text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def make_parser() -> argparse.ArgumentParser:
    """The ``lens-rl explain`` command line."""
    ap = argparse.ArgumentParser(
        prog="lens-rl explain",
        description="Explain the activations of text with a saved lens: JSONL, a table and an HTML page.",
    )
    ap.add_argument("--lens", required=True, help="Lens folder (lens_config.json + lens.safetensors).")
    ap.add_argument(
        "--model_name_or_path",
        default=None,
        help="Base model folder (default: the one the lens records; needed when it moved).",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="A text to explain (repeat for several).")
    src.add_argument(
        "--input",
        help="File of texts: .jsonl (objects with a 'text' field) or plain text (texts separated by blank lines).",
    )
    ap.add_argument(
        "--positions",
        type=_positions_arg,
        default="all",
        help="all | last | comma-separated token indices, negative from the end (default: all).",
    )
    ap.add_argument(
        "--num_samples",
        type=_int_at_least(1),
        default=8,
        help="Explanations sampled per position (best-of-k), >= 1.",
    )
    ap.add_argument(
        "--temperature",
        type=_float_in(0.0, math.inf, True, True),
        default=1.0,
        help="Sampling temperature of the decoder, > 0.",
    )
    ap.add_argument(
        "--top_p",
        type=_float_in(0.0, 1.0, True, False),
        default=1.0,
        help="Nucleus mass in (0, 1] (1 disables).",
    )
    ap.add_argument(
        "--t_text",
        type=_int_at_least(1),
        default=None,
        help="Explanation length in tokens, >= 1 (default: the lens's).",
    )
    ap.add_argument(
        "--max_length",
        type=_int_at_least(1, none=True),
        default=256,
        help="Tokens kept per text, >= 1, or 'none' for no cap (default 256).",
    )
    ap.add_argument(
        "--batch_size",
        type=_int_at_least(1),
        default=64,
        help="Rows (positions x samples) per decoder pass, >= 1.",
    )
    ap.add_argument("--seed", type=_int_at_least(0), default=0, help="Sampling seed, >= 0.")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    ap.add_argument(
        "--output_dir", required=True, help="Writes explanations.jsonl and explanations.html here."
    )
    ap.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace explanations.jsonl / explanations.html already in --output_dir.",
    )
    ap.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return ap


def main(argv: list[str] | None = None) -> Explanations:
    """``lens-rl explain``: load the lens, explain, write ``explanations.jsonl`` and
    ``explanations.html`` to ``--output_dir`` and print the table.

    The folder is locked for the command's life (as the training stages lock theirs: a second
    ``explain`` or a run into it is refused), and both files are written to temporary names and
    renamed at the end, the page first and the JSONL last: an interrupted run leaves neither
    under its final name, so a rerun is not refused, and ``explanations.jsonl`` means finished."""
    args = make_parser().parse_args(argv)
    texts = args.text if args.text else read_texts(args.input)
    out = Path(args.output_dir)
    lock = lock_output_dir(out)
    try:
        refuse_existing_outputs(
            out, (JSONL_FILE, HTML_FILE), args.overwrite_output_dir, "--overwrite_output_dir"
        )
        return _explain_claimed(args, texts, out)
    finally:
        lock.close()


def _explain_claimed(args: argparse.Namespace, texts: list[str], out: Path) -> Explanations:
    """The body of :func:`main` once ``out`` is locked and free."""
    policy = SamplingPolicy(temperature=args.temperature, top_p=args.top_p)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    console = Console()
    lens = ConsistencyLens.from_pretrained(args.lens, base=args.model_name_or_path).to(device)
    res = explain(
        lens,
        texts,
        positions=args.positions,
        k=args.num_samples,
        max_length=args.max_length,
        t_text=args.t_text,
        policy=policy,
        seed=args.seed,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    res.info = {"lens": str(Path(args.lens).resolve()), **res.info}
    with replace_on_success(out / HTML_FILE, out / JSONL_FILE) as (html_tmp, jsonl_tmp):
        res.write_html(html_tmp, title=f"lens explanations: {Path(args.lens).resolve().name}")
        res.write_jsonl(jsonl_tmp)
    console.print(res.table())
    s = res.summary()
    console.print(
        f"{s['positions']} positions; mean FVE of the best of {args.num_samples}: {s['best_fve']:.3f} "
        f"(all samples {s['sample_fve']:.3f}); mean KL of the best: {s['best_kl']:.4f}"
    )
    console.print(f"wrote {out / JSONL_FILE} and {out / HTML_FILE}")
    return res
