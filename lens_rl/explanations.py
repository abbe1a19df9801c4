"""Read a lens: explain the activations of text, as JSONL, a rich table and an HTML page.

For every chosen position ``p`` of a text, ``A`` (the residual stream after block ``layer`` at
``p``) is decoded ``k`` times (the KV-cached rollout generator, one seeded generator per
text), each explanation is encoded back to ``Â``, and the samples are ranked by
reconstruction (best-of-``k``, as the original's analysis tools do). Scores per sample:

- ``rel_error``: ``||Â - A||² / ||A - mean||²`` with the lens's training mean (the per-sample
  term of the evaluation's FVE); ``fve = 1 - rel_error``;
- ``nmse``: ``mean((Â - A)²) / mean(train variance)`` (the training loss's normalisation);
- ``kl``: KL(P(next | A) || P(next | Â)) of the orig model at ``p`` (functional KL).

Both scores normalise by the statistics of the lens's training split (``train_mean`` and
``train_var`` in its sidecar's ``meta``, checked against the base's hidden size). A lens saved
without them (older versions) is refused, naming the file and how to record them: a fallback on
the explained activations' own mean made the scores depend on which positions were asked.

:func:`explain` (also ``ConsistencyLens.explain``) returns an :class:`Explanations`;
:func:`report_samples` explains held-out windows of an activation split (what the training
stages show at the end); :func:`main` is ``lens-rl explain``. The HTML page is self-contained
(inline CSS and JS, no network): tokens coloured by reconstruction quality, hovering, focusing
or clicking one shows its explanations and scores.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lens_rl.utils.files import atomic_write_text, decode_utf8, iter_jsonl, replace_on_success

JSONL_FILE = "explanations.jsonl"
HTML_FILE = "explanations.html"


# ---------------------------------------------------------------------- positions and inputs
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


# ---------------------------------------------------------------------- results
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
        from rich.table import Table

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


# ---------------------------------------------------------------------- the computation
def _stats(lens, acts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mean, variance) of the lens's training split, as it records them (checked: see
    :func:`~lens_rl.models.lens.activation_stats`), and the name of that normaliser.

    Raises:
        ValueError: the lens records no statistics (naming its sidecar and how to add them), or
            records values that cannot be right.
    """
    from lens_rl.models.lens import LENS_CONFIG, activation_stats

    meta = getattr(lens, "meta", {}) or {}
    source = getattr(lens, "source_dir", None)
    where = f"{source}/{LENS_CONFIG}" if source is not None else "the lens's meta"
    stats = activation_stats(meta, acts[0].shape[-1], where)
    if stats is None:
        raise ValueError(
            f"{where} records no activation statistics (meta.train_mean and meta.train_var: a lens "
            "saved by an older lens_rl lacks them); FVE and NMSE are normalised by them. Record "
            "those of the lens's training split and save the lens again: `from lens_rl.data.dataset "
            "import ActivationDataset; d = ActivationDataset(TRAIN_SPLIT_DIR); lens.meta.update("
            "train_mean=d.mean.tolist(), train_var=d.var.tolist()); lens.save_pretrained(LENS_DIR)`, "
            "or train the lens again."
        )
    return stats[0], stats[1], "train_mean"


@torch.no_grad()
def explain_ids(
    lens,
    orig,
    tokenizer,
    ids_list: Sequence[torch.Tensor],
    positions: str | int | Sequence[int] | Sequence[Any] = "all",
    *,
    k: int = 8,
    layer: int | None = None,
    t_text: int | None = None,
    policy=None,
    seed: int = 0,
    batch_size: int = 64,
    max_kl_tokens: int = 8192,
    show_progress: bool = False,
) -> Explanations:
    """:func:`explain` on token ids (one 1-D tensor per text). ``positions`` applies to every
    text, or is a list with one spec per text. ``batch_size`` rows (positions x ``k``) go
    through the decoder at once; the functional KL passes take at most ``max_kl_tokens`` tokens
    each (they compute full-vocabulary logits)."""
    from lens_rl.models.surgery import run_until
    from lens_rl.training.sft_losses import functional_kl
    from lens_rl.utils.progress import progress_bar

    meta = getattr(lens, "meta", {}) or {}
    layer = meta.get("layer") if layer is None else layer
    t_text = meta.get("t_text") if t_text is None else t_text
    if layer is None:
        raise ValueError("The lens records no layer; pass layer= (the block whose output A is).")
    if t_text is None:
        raise ValueError("The lens records no t_text; pass t_text= (explanation length in tokens).")
    if k < 1:
        raise ValueError(f"k (samples per position) must be >= 1, got {k}.")
    if t_text < 1:
        raise ValueError(f"t_text (explanation length in tokens) must be >= 1, got {t_text}.")
    per_text = (
        list(positions)
        if isinstance(positions, list | tuple) and positions and isinstance(positions[0], list | tuple | str)
        else [positions] * len(ids_list)
    )
    if len(per_text) != len(ids_list):
        raise ValueError(f"{len(per_text)} position specs for {len(ids_list)} texts.")
    device = next(lens.parameters()).device
    dtype = next(lens.decoder.parameters()).dtype
    was_training = lens.training
    lens.eval()
    try:
        orig.to(device)
        texts_pos: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
        for i, (ids, spec) in enumerate(zip(ids_list, per_text, strict=True)):
            ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
            pos = parse_positions(spec, ids.numel(), where=f"text {i}")
            hidden = run_until(orig.model, layer, input_ids=ids[None], use_cache=False)[0]  # (S, d)
            texts_pos.append((ids, pos, hidden[pos].to(dtype)))
        mean, var, normaliser = _stats(lens, [a.cpu() for _, _, a in texts_pos])
        mean, var_mean = mean.to(device), var.mean().to(device)
        chunk = max(1, batch_size // k)
        rows: list[dict[str, Any]] = []
        total = sum(len(p) for _, p, _ in texts_pos)
        with progress_bar("explaining", total, enabled=show_progress) as advance:
            for ti, (ids, pos, acts) in enumerate(texts_pos):
                g = torch.Generator(device).manual_seed(seed + 100_003 * ti)
                for c0 in range(0, len(pos), chunk):
                    p = torch.tensor(pos[c0 : c0 + chunk], device=device)
                    a = acts[c0 : c0 + chunk]  # (c, d)
                    gen = lens.decoder.generate_soft_kv_cached_nondiff(
                        a, t_text, generator=g, policy=policy, num_samples=k, return_logits=False
                    )  # rows b * k + j
                    p_rep = p.repeat_interleave(k)
                    a_hat = lens.encoder(
                        gen.generated_text_embeddings, current_token_ids=ids[p_rep]
                    )  # (c*k, d)
                    a_rep = a.repeat_interleave(k, 0).double()
                    sq = (a_hat.double() - a_rep).pow(2).sum(-1)
                    rel = sq / (a_rep - mean).pow(2).sum(-1).clamp(min=1e-12)
                    nmse = sq / a.shape[-1] / var_mean
                    # KL rows in groups of <= max_kl_tokens tokens of context (full-vocabulary logits)
                    ctx = int(p.max()) + 1
                    step = max(1, max_kl_tokens // ctx)
                    kl = torch.cat(
                        [
                            functional_kl(
                                orig,
                                {"input_ids": ids[None, :ctx].expand(len(sel), -1), "token_pos": p_rep[sel]},
                                layer,
                                a_hat[sel].to(dtype),
                            ).double()
                            for sel in torch.arange(p_rep.numel(), device=device).split(step)
                        ]
                    )
                    for b, position in enumerate(p.tolist()):
                        samples = []
                        for j in range(k):
                            r = b * k + j
                            samples.append(
                                {
                                    "explanation": tokenizer.decode(gen.hard_token_ids[r]),
                                    "token_ids": gen.hard_token_ids[r].tolist(),
                                    "rel_error": float(rel[r]),
                                    "fve": float(1 - rel[r]),
                                    "nmse": float(nmse[r]),
                                    "kl": float(kl[r]),
                                }
                            )
                        samples.sort(key=lambda s: s["rel_error"])
                        best = samples[0]
                        rows.append(
                            {
                                "text_index": ti,
                                "position": position,
                                "token": tokenizer.decode(ids[position : position + 1]),
                                "token_id": int(ids[position]),
                                "context": tokenizer.decode(ids[max(0, position - 15) : position]),
                                **best,
                                "normaliser": normaliser,
                                "samples": samples,
                            }
                        )
                    advance(int(p.numel()))
    finally:
        lens.train(was_training)
    tokens = [[tokenizer.decode(ids[i : i + 1]) for i in range(ids.numel())] for ids, _, _ in texts_pos]
    info = {"layer": layer, "t_text": t_text, "k": k, "seed": seed, "normaliser": normaliser}
    if policy is not None:
        info["policy"] = {n: getattr(policy, n) for n in ("temperature", "top_k", "top_p", "min_p")}
    return Explanations(rows, tokens, info)


def explain(
    lens,
    texts: str | Sequence[str],
    *,
    positions: str | int | Sequence[int] = "all",
    k: int = 8,
    orig=None,
    tokenizer=None,
    max_length: int | None = None,
    **kwargs: Any,
) -> Explanations:
    """Explain the activations of ``texts`` at ``positions`` with ``k`` samples each.

    Args:
        lens: a :class:`~lens_rl.models.lens.ConsistencyLens` (built or loaded: it knows its
            base model, tokenizer, layer and ``t_text``).
        texts: a string or a list of strings, tokenised without special tokens (as the
            activation dumps are).
        positions: ``"all"``, ``"last"``, token indices (negative from the end), or
            ``"i,j,..."``.
        k: samples per position; the best by reconstruction is the row's ``explanation``.
        orig: the frozen original model (default: an :class:`OrigWrapper` on the lens's base).
        tokenizer: default: the lens's.
        max_length: keep only the first ``max_length`` (>= 1) tokens of each text; None: all.
        kwargs: ``layer``, ``t_text``, ``policy`` (:class:`~lens_rl.ops.sampling.SamplingPolicy`),
            ``seed``, ``batch_size``, ``show_progress`` (see :func:`explain_ids`).
    """
    from lens_rl.models.orig import OrigWrapper

    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 (None: no cap), got {max_length}.")
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = tokenizer if tokenizer is not None else getattr(lens, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("This lens carries no tokenizer (it was not built or loaded here); pass tokenizer=.")
    if orig is None:
        base = getattr(lens, "base_model", None)
        if base is None:
            raise ValueError("This lens carries no base model; pass orig=OrigWrapper(base).")
        orig = OrigWrapper(base)
    ids_list = []
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"text {i} ({t!r}) has no tokens; nothing to explain.")
        ids_list.append(torch.tensor(ids if max_length is None else ids[:max_length]))
    return explain_ids(lens, orig, tokenizer, ids_list, positions, k=k, **kwargs)


# ---------------------------------------------------------------------- the HTML page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:14px 20px;background:#20232a;color:#f5f5f5}
header h1{margin:0 0 4px 0;font-size:20px}
header .info{font-size:13px;opacity:.85}
main{display:flex;gap:16px;padding:16px 20px;align-items:flex-start}
#texts{flex:3;min-width:0}
#panel{flex:2;position:sticky;top:12px;background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px;min-height:120px}
.text{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px;margin-bottom:12px;
 font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap;word-break:break-word}
.text h2{font-family:system-ui,sans-serif;font-size:13px;margin:0 0 6px 0;color:#666;font-weight:600}
.tok{border-radius:3px;padding:1px 0}
.tok[data-row]{cursor:pointer;outline:1px solid rgba(0,0,0,.08)}
.tok.sel{outline:2px solid #1a56db}
.nl{color:#999}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;margin:6px 0 0 0}
.legend .bar{width:160px;height:10px;border-radius:3px;background:linear-gradient(to right,hsl(0,75%,78%),hsl(60,75%,78%),hsl(120,75%,78%))}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:4px 6px;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.expl{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
tr.best td{background:#eef6ee;font-weight:600}
#panel h3{margin:0 0 6px 0;font-size:15px}
#panel .ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#555;white-space:pre-wrap;margin-bottom:8px}
#details{display:none}
"""

_JS = """
(function(){
  var panel=document.getElementById('panel');
  function show(el){
    var prev=document.querySelectorAll('.tok.sel');
    for(var i=0;i<prev.length;i++){prev[i].classList.remove('sel');}
    el.classList.add('sel');
    var d=document.getElementById('row-'+el.getAttribute('data-row'));
    if(d){panel.innerHTML=d.innerHTML;}
  }
  var toks=document.querySelectorAll('.tok[data-row]');
  for(var i=0;i<toks.length;i++){
    (function(el){
      el.addEventListener('mouseenter',function(){show(el);});
      el.addEventListener('click',function(){show(el);});
      el.addEventListener('focus',function(){show(el);});
    })(toks[i]);
  }
  if(toks.length){show(toks[0]);}
})();
"""


def _colour(fve: float) -> str:
    """Red (FVE <= 0) through yellow to green (FVE >= 1)."""
    q = min(max(fve, 0.0), 1.0)
    return f"hsl({120 * q:.0f},75%,78%)"


_CONTROL = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"} | {127: "\u2421"}


def visible(text: str) -> str:
    """``text`` with control characters (other than newline and tab) replaced by their Unicode
    control pictures (``\\x00`` -> ``␀``): browsers drop or replace them otherwise."""
    return text.translate(_CONTROL)


def esc(text: str) -> str:
    """HTML-escaped :func:`visible` text."""
    return html.escape(visible(text), quote=True)


def _token_html(tok: str) -> str:
    """A token's text, escaped, with newlines and tabs made visible."""
    s = esc(tok)
    return s.replace("\t", '<span class="nl">→</span>\t').replace("\n", '<span class="nl">↵</span>\n')


def _detail_html(r: dict[str, Any]) -> str:
    rows = []
    for j, s in enumerate(r["samples"]):
        rows.append(
            f'<tr class="{"best" if j == 0 else ""}"><td class="num">{j + 1}</td>'
            f'<td class="expl">{esc(s["explanation"])}</td>'
            f'<td class="num">{s["fve"]:.3f}</td><td class="num">{s["rel_error"]:.3f}</td>'
            f'<td class="num">{s["kl"]:.4f}</td></tr>'
        )
    return (
        f"<h3>text {r['text_index']}, position {r['position']}: "
        f"<code>{esc(repr(r['token']))}</code></h3>"
        f'<div class="ctx">…{esc(r["context"])}<b>{esc(r["token"])}</b></div>'
        f'<div>best: <b class="expl">{esc(r["explanation"])}</b> '
        f"(FVE {r['fve']:.3f}, KL {r['kl']:.4f})</div>"
        '<table><thead><tr><th class="num">#</th><th>explanation</th><th class="num">FVE</th>'
        '<th class="num">rel. error</th><th class="num">KL</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )


def write_html(result: Explanations, path: str | Path, title: str = "lens explanations") -> Path:
    """Write the self-contained page (inline CSS and JS, no network access): every text with its
    explained tokens coloured by the best sample's FVE; hovering, focusing or clicking a token
    shows its explanations (best first) with FVE, relative error and KL. Written to a temporary
    name and renamed, like :meth:`Explanations.write_jsonl`."""
    path = Path(path)
    by_pos = {(r["text_index"], r["position"]): i for i, r in enumerate(result.rows)}
    texts_html = []
    for ti, toks in enumerate(result.tokens):
        spans = []
        for p, tok in enumerate(toks):
            i = by_pos.get((ti, p))
            if i is None:
                spans.append(f'<span class="tok">{_token_html(tok)}</span>')
            else:
                r = result.rows[i]
                spans.append(
                    f'<span class="tok" tabindex="0" data-row="{i}" style="background:{_colour(r["fve"])}" '
                    f'title="FVE {r["fve"]:.2f} | KL {r["kl"]:.3f} | {esc(r["explanation"])}">'
                    f"{_token_html(tok)}</span>"
                )
        texts_html.append(f'<div class="text"><h2>text {ti}</h2>{"".join(spans)}</div>')
    details = "".join(f'<div id="row-{i}">{_detail_html(r)}</div>' for i, r in enumerate(result.rows))
    s = result.summary()
    info = " · ".join(f"{k}: {esc(str(v))}" for k, v in result.info.items())
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>"
        f'<div class="info">{info}</div>'
        f'<div class="info">{s["positions"]} positions · mean FVE of the best sample {s["best_fve"]:.3f} '
        f"(of all samples {s['sample_fve']:.3f}) · mean KL of the best {s['best_kl']:.4f}</div>"
        '<div class="legend"><span>FVE ≤ 0</span><span class="bar"></span><span>FVE 1</span>'
        "<span>· hover or click a token</span></div></header>"
        f'<main><section id="texts">{"".join(texts_html)}</section>'
        '<aside id="panel">Hover or click a coloured token to see its explanations.</aside></main>'
        f'<div id="details">{details}</div>'
        f"<script>{_JS}</script></body></html>"
    )
    return atomic_write_text(path, page)


# ---------------------------------------------------------------------- training reports
def end_of_run_report(
    cfg, lens, orig, dataset, tokenizer, layer: int, output_dir, title: str, trainer=None
) -> None:
    """What both training stages do at the end on the main process: explain ``cfg.explain_texts``
    held-out windows (best of ``cfg.explain_samples``), print the table, write the page
    (:class:`~lens_rl.training.explain_args.ExplainArguments`; nothing when ``explain_texts`` is 0)
    and, given the ``trainer``, send the page to its W&B run when ``report_to`` has one."""
    if dataset is None or cfg.explain_texts <= 0:
        return
    from rich.console import Console

    report_samples(
        lens,
        orig,
        dataset,
        tokenizer=tokenizer,
        layer=layer,
        t_text=cfg.t_text,
        num_texts=cfg.explain_texts,
        k=cfg.explain_samples,
        seed=cfg.seed,
        output_dir=output_dir,
        title=title,
        console=Console(),
    )
    if trainer is not None:
        from lens_rl.training.trackers import log_page

        log_page(trainer, Path(output_dir) / HTML_FILE, trainer.state.global_step)


def report_samples(
    lens,
    orig,
    dataset,
    *,
    tokenizer,
    layer: int | None = None,
    t_text: int | None = None,
    num_texts: int = 4,
    k: int = 4,
    seed: int = 0,
    output_dir: str | Path | None = None,
    html_name: str = HTML_FILE,
    jsonl_name: str | None = "explanations_val.jsonl",
    title: str = "held-out explanations",
    console=None,
    max_table_rows: int = 16,
) -> Explanations:
    """Explain every position of the first ``num_texts`` windows of an activation split
    (:class:`~lens_rl.data.dataset.ActivationDataset` or on-the-fly); print a table of the
    (first ``max_table_rows``) rows to ``console``, and write ``<output_dir>/<html_name>`` (and
    ``<output_dir>/<jsonl_name>``) when ``output_dir`` is given. Used by both training stages at
    the end of a run."""
    n = min(num_texts, len(dataset))
    ids_list = [dataset[i]["input_ids"] for i in range(n)]
    res = explain_ids(lens, orig, tokenizer, ids_list, "all", k=k, layer=layer, t_text=t_text, seed=seed)
    if console is not None:
        console.print(res.table(title=f"{title} (first {max_table_rows} positions)", max_rows=max_table_rows))
    if output_dir is not None:
        out = Path(output_dir)
        res.write_html(out / html_name, title=title)
        if jsonl_name:
            res.write_jsonl(out / jsonl_name)
        if console is not None:
            console.print(f"explanations page: {out / html_name}")
    return res


def evaluation_tables(metrics: dict[str, float], samples: list[dict[str, Any]], step: int | None = None):
    """Rich tables of an evaluation (``evaluate_lens``'s metrics and sample explanations)."""
    from rich.table import Table

    head = f"evaluation at step {step}" if step is not None else "evaluation"
    m = Table(title=head)
    m.add_column("metric")
    m.add_column("value", justify="right")
    for key, v in metrics.items():
        m.add_row(key, str(int(v)) if key.startswith("num_") else f"{v:.4f}")
    tables = [m]
    if samples:
        t = Table(title=f"sample explanations ({head})")
        for col in ("context", "token", "explanation", "rel. sq. error"):
            t.add_column(col, overflow="fold")
        for s in samples:
            t.add_row(
                repr(s["context"][-40:]), repr(s["token"]), repr(s["explanation"]), f"{s['sq_error']:.2f}"
            )
        tables.append(t)
    return tables


# ---------------------------------------------------------------------- `lens-rl explain`
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
    from lens_rl.utils.outputs import lock_output_dir, refuse_existing_outputs

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
    from rich.console import Console

    from lens_rl.models.lens import ConsistencyLens
    from lens_rl.ops.sampling import SamplingPolicy

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
