"""Training-curve PNG from a run's ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

from lens_rl.utils.files import read_jsonl


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot train losses and eval FVE/KL against the optimizer step; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)  # a last line cut short (full disk, kill) is dropped with a warning
    panels = [
        ("train losses", ["loss", "mse", "lm", "kl"]),
        ("eval reconstruction", ["eval_fve", "eval_baseline_mean_fve", "eval_nmse"]),
        ("eval KL", ["eval_kl_recon", "eval_kl_train", "eval_lm_kl"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=key.removeprefix("eval_"))
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
