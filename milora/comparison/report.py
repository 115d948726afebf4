"""The comparison's outputs: a Markdown table, CSV files and plots of company score
against world-knowledge retention (one curve per method, seeds as a band)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from milora.comparison.aggregate import Stat, Summary, at_level, grouped, mean_std, summarise
from milora.comparison.trajectory import RunRecord

PLOT_FORMATS = ("png", "svg")
LINESTYLES = (":", "-", "--", "-.")  # learning rates, lowest first


def markdown_table(summary: Summary, label: str = "method") -> str:
    """One row per group, every column as ``mean ± std``."""
    lines = [
        "| " + " | ".join([label, "runs", *summary.columns]) + " |",
        "|---|---:|" + "---:|" * len(summary.columns),
    ]
    for group, row in summary.rows.items():
        runs = max(stat.n for stat in row.values())
        cells = [row[c].show(2 if " s" in c else 3) for c in summary.columns]
        lines.append("| " + " | ".join([group, str(runs), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(summary: Summary, path: Path) -> Path:
    """Long format: group, step (blank = final / summary), column, mean, std, n."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "step", "column", "mean", "std", "n"])
        for group, row in summary.rows.items():
            for column in summary.columns:
                stat = row[column]
                writer.writerow([group, "", column, stat.mean, stat.std, stat.n])
        for group, step, column, stat in summary.by_step:
            writer.writerow([group, step, column, stat.mean, stat.std, stat.n])
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, out: Path) -> list[Path]:
    """Lay out, save as every format of PLOT_FORMATS, close."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(f".{fmt}") for fmt in PLOT_FORMATS]
    for path in paths:
        fig.savefig(path)
    _pyplot().close(fig)
    return paths


def _band(ax, xs: Sequence[float], stats: Sequence[Stat], colour: str, label: str, **style: object) -> None:
    """The mean as a line and +/- one std as a shaded band (points without a value skipped)."""
    kept = [(x, s) for x, s in zip(xs, stats, strict=True) if s.mean is not None]
    xs = [x for x, _ in kept]
    means = [s.mean for _, s in kept]
    stds = [s.std for _, s in kept]
    ax.plot(xs, means, color=colour, label=label, **style)
    ax.fill_between(
        xs, [m - d for m, d in zip(means, stds, strict=True)], [m + d for m, d in zip(means, stds, strict=True)],
        color=colour, alpha=0.2, linewidth=0,
    )  # fmt: skip


def plot_tradeoff(
    groups: Mapping[str, Sequence[RunRecord]],
    primary: str,
    level: float | None,
    out: Path,
    grid: int = 41,
    by_rate: bool = False,
) -> list[Path]:
    """Per retention suite, its score against the company score along training: per group
    the mean over seeds of each run's retention where it first reaches a company level
    (the matched-score reading), with +/- 1 std as a band and the seeds' snapshots as dots.
    ``by_rate``: groups are (method, rate): one colour per method, one line style per rate."""
    plt = _pyplot()
    first = next(iter(groups.values()))[0]
    retention = [name for name, info in first.suites.items() if info["retention"]]
    fig, axes = plt.subplots(1, len(retention), figsize=(5.5 * len(retention), 4.2), dpi=110, squeeze=False)
    methods = list(dict.fromkeys(run.method for group_runs in groups.values() for run in group_runs))
    rates = sorted({run.learning_rate for group_runs in groups.values() for run in group_runs})
    for ax, suite in zip(axes[0], retention, strict=True):
        for index, (group, runs) in enumerate(groups.items()):
            colour = f"C{methods.index(runs[0].method)}" if by_rate else f"C{index}"
            dashes = (
                {"linestyle": LINESTYLES[rates.index(runs[0].learning_rate) % len(LINESTYLES)]}
                if by_rate
                else {}
            )
            low = min(run.points[0].scores[primary] for run in runs)
            high = min(max(score for _, score in run.curve(primary)) for run in runs)
            levels = [low + (high - low) * i / (grid - 1) for i in range(grid)]
            stats = [mean_std(at_level(run, primary, suite, x) for run in runs) for x in levels]
            _band(ax, levels, stats, colour, f"{group} ({len(runs)} runs)", **dashes)
            for run in runs:
                ax.plot(
                    [p.scores[primary] for p in run.points], [p.scores[suite] for p in run.points],
                    "o", color=colour, markersize=2.5, alpha=0.45,
                )  # fmt: skip
        if level is not None:
            ax.axvline(
                level, color="grey", linestyle="--", linewidth=1, label=f"matched {primary} = {level:.3f}"
            )
        info = first.suites[suite]
        better = "lower is better" if info["lower_is_better"] else "higher is better"
        ax.set_xlabel(f"{primary} ({first.suites[primary]['metric']})")
        ax.set_ylabel(f"{suite} {info['metric']} ({better})")
        ax.set_title(f"learning vs keeping: {suite}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, out)


def plot_steps(groups: Mapping[str, Sequence[RunRecord]], primary: str, out: Path) -> list[Path]:
    """Company score and each retention suite against the step, mean +/- std over seeds."""
    plt = _pyplot()
    first = next(iter(groups.values()))[0]
    suites = [primary] + [name for name, info in first.suites.items() if info["retention"]]
    fig, axes = plt.subplots(1, len(suites), figsize=(4.5 * len(suites), 3.8), dpi=110, squeeze=False)
    for ax, suite in zip(axes[0], suites, strict=True):
        for index, (group, runs) in enumerate(groups.items()):
            steps = sorted({p.step for run in runs for p in run.points})
            stats = [
                mean_std(p.scores.get(suite) for run in runs for p in run.points if p.step == s)
                for s in steps
            ]
            _band(ax, steps, stats, f"C{index}", group, marker="o", markersize=3)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"{suite} {first.suites[suite]['metric']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, out)


def write_report(
    main: Sequence[RunRecord],
    sweep: Sequence[RunRecord],
    out_dir: Path,
    *,
    primary: str = "company",
    level: float | None = None,
    header: str = "",
) -> dict[str, object]:
    """``table.md`` (main protocol, then the learning-rate sweep), ``table.csv``,
    ``sweep.csv``, ``tradeoff.{png,svg}``, ``steps.{png,svg}`` and ``sweep_tradeoff.*``;
    returns the Markdown and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(main, primary, level)
    parts = [header] if header else []
    parts += [
        f"Main protocol, mean ± std over seeds; forgetting is the drop of a retention suite's score "
        f"(perplexity: its relative rise) at the last step and where each run first reaches "
        f"{primary} = {summary.level:.3f}.\n",
        markdown_table(summary),
    ]
    files = {"table_csv": write_csv(summary, out_dir / "table.csv")}
    plots = plot_tradeoff(grouped(main), primary, summary.level, out_dir / "tradeoff")
    plots += plot_steps(grouped(main), primary, out_dir / "steps")
    if sweep:
        swept = summarise(sweep, primary, summary.level, by_rate=True)
        parts += ["\nLearning-rate sweep (fairness check):\n", markdown_table(swept, "method, rate")]
        files["sweep_csv"] = write_csv(swept, out_dir / "sweep.csv")
        plots += plot_tradeoff(
            grouped(sweep, by_rate=True), primary, summary.level, out_dir / "sweep_tradeoff", by_rate=True
        )
    markdown = "\n".join(parts)
    (out_dir / "table.md").write_text(markdown)
    return {
        "markdown": markdown,
        "level": summary.level,
        "table_md": out_dir / "table.md",
        **files,
        "plots": plots,
    }
