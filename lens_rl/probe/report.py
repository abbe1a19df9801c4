"""What the probe reports: ``probe.png`` (predicted vs measured entropy change over the eta
sweep, :func:`plot_probe`), the summary tables and how close each estimate came to the truth."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

NORMALIZATIONS = ("per_token", "per_sequence")


def plot_probe(results: dict[str, Any], out_path: str | Path) -> Path:
    """Save :func:`probe_figure` as a PNG; return its path."""
    import matplotlib.pyplot as plt

    fig = probe_figure(results)
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def probe_figure(results: dict[str, Any]):
    """Predicted vs true deltaH over eta (one panel per normalisation), with CI error bars; the
    first-order prediction, the covariance baseline and a dotted line at ``eta = lr``. The eta
    axis is logarithmic with one label per probed eta (at most 6) and no minor labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    entries = results["entries"]
    etas = [e["eta"] for e in entries]
    lr = results.get("learning_rate")
    for ax, norm in zip(axes, NORMALIZATIONS, strict=True):
        series = (
            ("truth", "o-", "truth (SNIS)"),
            ("prediction", "s--", f"first order ({results['best_baseline'][norm]} baseline)"),
            ("covariance", "d-.", "covariance (Cui et al. 2025)"),
            ("resample", "^:", "resample"),
        )
        for key, style, label in series:
            if key not in entries[0][norm]:
                continue
            vals = [e[norm][key]["value"] for e in entries]
            err = [
                [v - e[norm][key]["ci"][0] for v, e in zip(vals, entries, strict=True)],
                [e[norm][key]["ci"][1] - v for v, e in zip(vals, entries, strict=True)],
            ]
            ax.errorbar(etas, vals, yerr=err, fmt=style, capsize=3, label=label)
        ax.axhline(0.0, color="grey", lw=0.5)
        if lr:
            ax.axvline(lr, color="black", ls=":", lw=1, label=f"eta = lr = {lr:.2g}")
        ax.set_xscale("log")
        # one labelled tick per probed eta (at most 6, evenly thinned), no minor labels: no overlap
        step = max(1, math.ceil(len(etas) / 6))
        ticks = etas[::step]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{t:.2g}" for t in ticks], rotation=35, ha="right", fontsize=8)
        ax.set_xlabel("eta (step size; eta = lr is the real step)")
        ax.set_ylabel("deltaH")
        ax.set_title(f"entropy change, {norm.replace('_', '-')}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def closeness(results: dict[str, Any], norm: str) -> dict[str, float]:
    """Mean over the eta sweep of ``|truth - estimate|``, for the first-order prediction and
    the covariance baseline (``first_order``, ``covariance``), and the ratio of the two."""
    entries = results["entries"]
    fo = sum(abs(e[norm]["difference"]["value"]) for e in entries) / len(entries)
    cov = sum(abs(e[norm]["covariance_difference"]["value"]) for e in entries) / len(entries)
    return {"first_order": fo, "covariance": cov, "covariance_over_first_order": cov / max(fo, 1e-300)}


def summary_table(results: dict[str, Any], norm: str = "per_token"):
    """A rich table: truth, first order, covariance baseline, paired differences, resample, ESS."""

    def fmt(e: dict | None) -> str:
        return "-" if e is None else f"{e['value']:+.3e} ± {e['se']:.1e}"

    def in_ci(d: dict) -> str:
        return "yes" if d["ci"][0] <= 0 <= d["ci"][1] else "NO"

    level = results["entries"][0][norm]["truth"]["level"]
    table = Table(title=f"Entropy probe ({norm.replace('_', '-')}; ± SE, CI level {level})")
    for col in (
        "eta",
        "deltaH true (SNIS)",
        "first order",
        "true - first order",
        "0 in CI",
        "covariance (Cui)",
        "true - cov",
        "0 in CI ",
        "resample",
        "ESS/N",
    ):
        table.add_column(col, justify="right")
    for e in results["entries"]:
        d, dc = e[norm]["difference"], e[norm]["covariance_difference"]
        table.add_row(
            f"{e['eta']:.2e}",
            fmt(e[norm]["truth"]),
            fmt(e[norm]["prediction"]),
            fmt(d),
            in_ci(d),
            fmt(e[norm]["covariance"]),
            fmt(dc),
            in_ci(dc),
            fmt(e[norm].get("resample")),
            f"{e['weights']['ess_fraction']:.3f}",
        )
    return table
