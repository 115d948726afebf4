"""The company-score-against-forgetting figure the sweeps draw (profile_sweep, rank_sweep)."""

from __future__ import annotations

from pathlib import Path


def save_frontier(fig, ax, path: Path) -> Path:
    """Label, legend and grid the axes as every frontier figure has them, then save and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("world-probe forgetting (lower is better)")
    ax.set_ylabel("company score, current truth")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
