"""What the training stages show about their lens: the evaluation's tables
(:func:`evaluation_tables`) and, at the end of a run, explanations of held-out windows as a
table, ``explanations.html`` (and a JSONL), sent to the run's W&B when it has one
(:func:`end_of_run_report`, :func:`report_samples`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lens_rl.reading.explain import explain_ids
from lens_rl.reading.results import HTML_FILE, Explanations
from lens_rl.training.trackers import log_page


def end_of_run_report(
    cfg, lens, orig, dataset, tokenizer, layer: int, output_dir, title: str, trainer=None
) -> None:
    """What both training stages do at the end on the main process: explain ``cfg.explain_texts``
    held-out windows (best of ``cfg.explain_samples``), print the table, write the page
    (:class:`~lens_rl.training.explain_args.ExplainArguments`; nothing when ``explain_texts`` is 0)
    and, given the ``trainer``, send the page to its W&B run when ``report_to`` has one."""
    if dataset is None or cfg.explain_texts <= 0:
        return
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
    head = f"evaluation at step {step}" if step is not None else "evaluation"
    m = Table(title=head)
    m.add_column("metric")
    m.add_column("value", justify="right")
    for key, v in metrics.items():
        m.add_row(key, str(int(v)) if key.startswith("num_") else f"{v:.4f}")
    tables = [m]
    if samples:
        t = Table(title=f"sample explanations ({head})")
        for col in ("context", "token", "explanation", "rel. error"):
            t.add_column(col, overflow="fold")
        for s in samples:
            t.add_row(
                repr(s["context"][-40:]), repr(s["token"]), repr(s["explanation"]), f"{s['rel_error']:.2f}"
            )
        tables.append(t)
    return tables
