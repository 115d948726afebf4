"""From run records to the comparison's numbers: mean +/- std over seeds, forgetting at
equal steps and at a matched company score.

Matched score: a method that learns slower also forgets less at any given step, so
forgetting is also read where each run *first reaches* the same company score ``level``
(linear interpolation between the two snapshots around the crossing). The default level
is the highest one every run reaches, so no run is extrapolated.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from milora.comparison.trajectory import RunRecord


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over the runs that have a value (``n`` of them)."""

    mean: float | None
    std: float | None
    n: int

    def show(self, digits: int = 3) -> str:
        if self.mean is None:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"  # one run: no spread to show
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values: Iterable[float | None]) -> Stat:
    """``Stat`` of the values that are not None/NaN; std is 0 for a single value."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept))


def value_at_level(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """``y`` where ``x`` first reaches ``level`` along the sequence, linearly interpolated
    between the snapshot before and the one at the crossing; None if it never does."""
    for i, x in enumerate(xs):
        if x >= level:
            if i == 0:
                return ys[0]
            x0, y0 = xs[i - 1], ys[i - 1]
            return y0 + (level - x0) / (x - x0) * (ys[i] - y0)
    return None


def common_level(records: Sequence[RunRecord], primary: str) -> float:
    """The highest ``primary`` score every run reaches at some snapshot."""
    return min(max(score for _, score in record.curve(primary)) for record in records)


def at_level(
    record: RunRecord, primary: str, suite: str, level: float, quantity: str = "score"
) -> float | None:
    """``suite``'s score (or forgetting) when ``record`` first reaches ``level`` on ``primary``."""
    xs = [p.scores[primary] for p in record.points]
    values = [p.scores if quantity == "score" else p.forgetting for p in record.points]
    return value_at_level(xs, [v[suite] for v in values], level)


@dataclass
class Summary:
    """The comparison table: per group (method, or method and rate), one ``Stat`` a column."""

    primary: str
    level: float
    columns: list[str]
    rows: dict[str, dict[str, Stat]] = field(default_factory=dict)
    by_step: list[tuple[str, int, str, Stat]] = field(default_factory=list)  # group, step, column


def _suites(records: Sequence[RunRecord], primary: str) -> tuple[list[str], list[str]]:
    suites = records[0].suites
    retention = [name for name, info in suites.items() if info["retention"]]
    others = [name for name, info in suites.items() if not info["retention"] and name != primary]
    return retention, others


def group_name(record: RunRecord, by_rate: bool) -> str:
    return f"{record.method} lr={record.learning_rate:g}" if by_rate else record.method


def grouped(records: Sequence[RunRecord], by_rate: bool = False) -> dict[str, list[RunRecord]]:
    """Records by method (or method and learning rate), in the order first seen."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(group_name(record, by_rate), []).append(record)
    return groups


def summarise(
    records: Sequence[RunRecord], primary: str = "company", level: float | None = None, by_rate: bool = False
) -> Summary:
    """Mean +/- std over seeds per method (or per method and learning rate with ``by_rate``):
    final scores, forgetting per retention suite at the last step and at company score
    ``level`` (default :func:`common_level`), SVD-init seconds (runs that decomposed, runs
    served from the cache) and training seconds."""
    if not records:
        raise ValueError("no runs to summarise")
    retention, others = _suites(records, primary)
    level = common_level(records, primary) if level is None else level
    columns = (
        [primary]
        + [f"{name} forgetting" for name in retention]
        + [f"{name} forgetting @ {primary}={level:.3f}" for name in retention]
        + others
        + ([f"average of {len(others)}"] if len(others) > 1 else [])
        + ["SVD init s (cold)", "SVD init s (cached)", "train s"]
    )
    summary = Summary(primary, level, columns)
    for group, runs in grouped(records, by_rate).items():
        final = [run.points[-1] for run in runs]
        row = {primary: mean_std(p.scores.get(primary) for p in final)}
        for name in retention:
            row[f"{name} forgetting"] = mean_std(p.forgetting.get(name) for p in final)
            row[f"{name} forgetting @ {primary}={level:.3f}"] = mean_std(
                at_level(run, primary, name, level, "forgetting") for run in runs
            )
        for name in others:
            row[name] = mean_std(p.scores.get(name) for p in final)
        if len(others) > 1:  # the paper's headline: the average over its benchmarks, per run
            row[f"average of {len(others)}"] = mean_std(
                statistics.fmean(p.scores[n] for n in others) for p in final
            )
        row["SVD init s (cold)"] = mean_std(run.init_seconds for run in runs if not run.init_cache_hits)
        row["SVD init s (cached)"] = mean_std(run.init_seconds for run in runs if run.init_cache_hits)
        row["train s"] = mean_std(run.train_seconds for run in runs)
        summary.rows[group] = row
        steps = sorted({p.step for run in runs for p in run.points})
        for step in steps:
            at_step = [p for run in runs for p in run.points if p.step == step]
            summary.by_step.append((group, step, primary, mean_std(p.scores.get(primary) for p in at_step)))
            for name in retention:
                summary.by_step.append(
                    (group, step, f"{name} forgetting", mean_std(p.forgetting.get(name) for p in at_step))
                )
    return summary
