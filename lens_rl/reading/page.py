"""The self-contained HTML page of an :class:`~lens_rl.reading.results.Explanations` (inline CSS
and JS, no network): tokens coloured by reconstruction quality; hovering, focusing or clicking
one shows its explanations and scores. Every text from the lens or the input is escaped."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_rl.utils.files import atomic_write_text

if TYPE_CHECKING:  # results imports this module for Explanations.write_html
    from lens_rl.reading.results import Explanations


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
