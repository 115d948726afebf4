"""The report's plots: matplotlib figures turned into inline SVG (no files, no network).

Figures are made with matplotlib's object API (``Figure``), not pyplot: no global figure
state, no GUI backend, safe in a worker thread."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from milora.records import Decision
from milora.reporting.data import Spectrum, VersionPoint

COLORS = {"base": "#9e9e9e", "adapter": "#1f77b4", "champion": "#ff7f0e", "limit": "#d62728"}


def to_svg(fig: Figure, title: str) -> str:
    """The figure as an ``<svg>`` element with a ``<title>``, reproducible byte for byte."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": title, "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    head, _, rest = svg.partition(">")
    label = title.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    return f'{head} role="img" aria-label="{label}"><title>{label}</title>{rest}'


def _grid(count: int, cell: tuple[float, float] = (3.2, 2.6), columns: int = 4) -> tuple[Figure, list[Axes]]:
    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _small_multiples(names: Sequence[str], draw: Callable[[Axes, str], None], title: str) -> str:
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        draw(ax, name)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_svg(fig, title)


def loss_plot(points: Sequence[tuple[float, float]]) -> str | None:
    """Training loss against optimiser step."""
    if not points:
        return None
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.subplots()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2, color=COLORS["adapter"])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_svg(fig, "training loss")


def spectrum_plot(spectra: Sequence[Spectrum]) -> str | None:
    """Each weight's singular values (log scale), the adapted band shaded and the values the
    init adapter holds drawn on top."""
    if not spectra:
        return None
    by_name = {s.name: s for s in spectra}

    def draw(ax: Axes, name: str) -> None:
        spectrum = by_name[name]
        ax.semilogy(
            range(len(spectrum.values)), spectrum.values, color=COLORS["base"], lw=1.2, label="base W"
        )
        if spectrum.adapted is not None:
            start, stop = spectrum.adapted
            ax.axvspan(start - 0.5, stop - 0.5, color=COLORS["adapter"], alpha=0.15)
            held = spectrum.adapter_values[: stop - start]
            ax.semilogy(
                range(start, start + len(held)),
                held,
                "o",
                markersize=3,
                color=COLORS["adapter"],
                label=f"{spectrum.method} init (r={stop - start})",
            )
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xlabel(f"index ({spectrum.shape[0]}x{spectrum.shape[1]})", fontsize=8)

    return _small_multiples(list(by_name), draw, "singular-value spectrum")


def scores_plot(evaluation: Sequence[dict[str, Any]], champion: VersionPoint | None) -> str | None:
    """Per suite: the base model, this run's adapter and the champion it was compared with."""
    if not evaluation:
        return None
    rows = {row["suite"]: row for row in evaluation}

    def draw(ax: Axes, suite: str) -> None:
        row = rows[suite]
        bars = [("base", row.get("base")), ("adapter", row.get("adapter"))]
        if champion is not None:
            bars.append(("champion", champion.scores.get(suite)))
        shown = [(label, value) for label, value in bars if value is not None]
        ax.bar(
            [label for label, _ in shown],
            [value for _, value in shown],
            color=[COLORS[label] for label, _ in shown],
        )
        for i, (_, value) in enumerate(shown):
            ax.annotate(f"{value:.3g}", (i, value), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(row.get("metric", "score"), fontsize=8)

    return _small_multiples(list(rows), draw, "evaluation scores per suite")


def forgetting_plot(
    evaluation: Sequence[dict[str, Any]], champion: VersionPoint | None, limit: float | None
) -> str | None:
    """Forgetting on each retention suite (positive = knowledge lost), with the gate's limit."""
    rows = [row for row in evaluation if row.get("forgetting") is not None]
    if not rows:
        return None
    suites = [row["suite"] for row in rows]
    fig = Figure(figsize=(1.6 * len(suites) + 2.5, 3.2))
    ax = fig.subplots()
    width = 0.38
    xs = range(len(suites))
    ax.bar(
        [x - width / 2 for x in xs],
        [row["forgetting"] for row in rows],
        width,
        color=COLORS["adapter"],
        label="this run",
    )
    if champion is not None:
        ax.bar(
            [x + width / 2 for x in xs],
            [champion.forgetting.get(suite, math.nan) for suite in suites],
            width,
            color=COLORS["champion"],
            label=f"champion v{champion.version}",
        )
    if limit is not None:
        ax.axhline(limit, color=COLORS["limit"], ls="--", lw=1, label=f"gate limit {limit:g}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(list(xs), suites)
    ax.set_ylabel("forgetting")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return to_svg(fig, "forgetting on retention suites")


def history_plot(history: Sequence[VersionPoint]) -> str | None:
    """Each suite's score across registered versions: promoted ones filled, rejected ones
    hollow, the current champion starred."""
    suites = sorted({suite for point in history for suite in point.scores})
    if not suites:
        return None
    points = sorted(history, key=lambda p: int(p.version) if p.version.isdigit() else 0)

    def draw(ax: Axes, suite: str) -> None:
        have = [p for p in points if suite in p.scores]
        ax.plot([int(p.version) for p in have], [p.scores[suite] for p in have], color=COLORS["base"], lw=1)
        for p in have:
            promoted = p.decision == Decision.PROMOTED and not p.rolled_back
            ax.plot(
                int(p.version),
                p.scores[suite],
                "*" if p.champion else "x" if p.rolled_back else "o",
                markersize=11 if p.champion else 6,
                markerfacecolor=COLORS["champion"] if promoted else "white",
                markeredgecolor=COLORS["champion"] if promoted else COLORS["base"],
            )
        ax.set_xlabel("model version", fontsize=8)
        numbers = sorted({int(p.version) for p in have})
        if len(numbers) <= 12:  # a tick per version, never a fractional one
            ax.set_xticks(numbers)
            ax.set_xlim(numbers[0] - 0.5, numbers[-1] + 0.5)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)

    return _small_multiples(suites, draw, "metrics across model versions")


def _max_forgetting(p: VersionPoint, primary: str) -> float | None:
    return max(p.forgetting.values()) if p.forgetting else None


CHAIN_CURVES: dict[str, Callable[[VersionPoint, str], float | None]] = {  # month by month, per version
    "training seconds": lambda p, _: p.train_seconds,
    "primary score (current truth)": lambda p, primary: p.scores.get(primary),
    "stale rate": lambda p, _: p.stale_rate,
    "max forgetting since the stock base": _max_forgetting,
}


def chain_plot(history: Sequence[VersionPoint], primary: str) -> str | None:
    """Cost, current-truth score, stale rate and cumulative forgetting across versions, each
    marked by how it started (o: the stock base, s: continue, ^: refold; filled: promoted)."""
    points = sorted((p for p in history if p.version.isdigit()), key=lambda p: int(p.version))
    if not points:
        return None
    markers = {"continue": "s", "refold": "^"}

    def draw(ax: Axes, title: str) -> None:
        have = [(int(p.version), CHAIN_CURVES[title](p, primary), p) for p in points]
        have = [(v, y, p) for v, y, p in have if y is not None]
        ax.plot([v for v, _, _ in have], [y for _, y, _ in have], color=COLORS["base"], lw=1)
        for version, y, p in have:
            promoted = p.decision == Decision.PROMOTED and not p.rolled_back
            ax.plot(
                version,
                y,
                markers.get(p.start or "", "o"),
                markerfacecolor=COLORS["champion"] if promoted else "white",
                markeredgecolor=COLORS["champion"] if promoted else COLORS["base"],
            )
        ax.set_xlabel("model version", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)

    return _small_multiples(list(CHAIN_CURVES), draw, "retraining across model versions")
