"""Accuracy-versus-k plot of a retrieval run (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

__all__ = ["plot_topk"]


def plot_topk(curves: Dict[str, Dict[int, float]], path: str | os.PathLike, title: str = "") -> Optional[str]:
    """Plot accuracy (%) against k for each named curve; returns the path, or None without matplotlib.

    Args:
        curves: ``{label: {k: accuracy in [0, 1]}}``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the accuracy-vs-k plot")
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for label, acc in curves.items():
        ks: Sequence[int] = sorted(acc)
        ax.plot(ks, [100 * acc[k] for k in ks], marker="o", label=label)
        for k in ks:
            ax.annotate(f"{100 * acc[k]:.1f}", (k, 100 * acc[k]), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(sorted({k for acc in curves.values() for k in acc}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("k (nearest training videos)")
    ax.set_ylabel("top-k retrieval accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
