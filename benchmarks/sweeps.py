"""What the demo-world sweeps share (profile_sweep, rank_sweep): their data and their figure."""

from __future__ import annotations

from pathlib import Path


def validated_dataset(settings, out: Path) -> Path:
    """The configured drops and replay data, ingested and validated once under ``out``."""
    from tasks.ingest import ingest
    from tasks.validate import validate

    dataset = out / "dataset"
    if not (dataset / "manifest.json").is_file():
        ingest(settings, out_dir=out / "ingested")
        validate(settings, out / "ingested", dataset, out / "reports")
    return dataset


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
