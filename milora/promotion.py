"""The promotion gate: may a challenger's evaluation replace the champion's?

Pure rules over evaluation metrics, with no registry and no model: the pipeline reads both
versions' metrics from MLflow and asks :func:`gate`. Metrics arrive flat, as MLflow stores
them (``"<suite>.<metric>": value``, e.g. ``company.score``, ``world_probes.forgetting``);
:func:`flatten` and :func:`by_suite` convert to and from ``metrics.json``'s nesting.

Every condition must hold, and each is reported with its numbers:

* the primary suite: with the champion re-scored on the same items in the same run (the
  evaluate stage's ``vs_champion_*`` metrics: per-item differences, a paired bootstrap
  interval), the challenger must be better beyond noise: the interval's low end above
  ``min_primary_gain``, so an equal or a noise-level challenger is not promoted. Without that
  (stored scores only) its score must be at least the champion's plus ``min_primary_gain``;
* no retention suite forgets more than ``max_forgetting``, measured against the stock base:
  cumulative over a chain of runs from the champion, so monthly losses within ``tolerance``
  cannot add up unseen;
* a served adapter truncated to a server's rank limit loses at most ``max_compression_error``
  (relative, worst layer; the ``serving`` metrics);
* every other suite scored for both is within ``tolerance`` of the champion, in the
  metric's own direction: a score at most ``tolerance`` lower; a lower-is-better metric
  (perplexity) at most ``tolerance`` higher *relative* to the champion's, as its forgetting is
  a relative rise (an absolute 0.02 would mean 1.2% on a perplexity of 1.7 and 0.1% on 20);
  paired, it fails only when it is worse beyond noise (interval entirely below zero) and by
  more than ``tolerance``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from milora.evaluation.scoring import lower_is_better
from milora.records import Decision
from milora.settings import GateSettings

FIRST_MODEL = "first model: no champion yet"
CONFIDENCE = 0.95  # of the paired interval
RESAMPLES = 2000  # bootstrap resamples (seeded: the same items give the same interval)
# Per suite, in metrics.json / MLflow: the challenger minus the champion re-scored on the same items.
PAIRED_KEYS = ("vs_champion_diff", "vs_champion_low", "vs_champion_high", "vs_champion_n")
SERVING = "serving"  # metrics of the served adapter itself (rank, compression_error), not a suite


@dataclass(frozen=True)
class PairedDifference:
    """Challenger minus champion over the same items: the mean and a bootstrap interval."""

    n: int
    mean: float
    low: float
    high: float

    def text(self) -> str:
        return (
            f"{self.mean:+.4f} [{CONFIDENCE:.0%} CI {self.low:+.4f}, {self.high:+.4f}], "
            f"n={self.n} paired items"
        )

    def metrics(self) -> dict[str, float]:
        return dict(zip(PAIRED_KEYS, (self.mean, self.low, self.high, float(self.n)), strict=True))

    @classmethod
    def from_metrics(cls, values: Mapping[str, float]) -> PairedDifference | None:
        if not all(key in values for key in PAIRED_KEYS):
            return None
        mean, low, high, n = (values[key] for key in PAIRED_KEYS)
        return cls(int(n), mean, low, high)


def paired_difference(
    new: Sequence[float], old: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0
) -> PairedDifference:
    """The mean per-item difference ``new - old`` with a percentile bootstrap interval
    (items resampled with replacement, pairs kept together)."""
    import numpy as np

    if len(new) != len(old) or not new:
        raise ValueError(f"paired scores need the same items: {len(new)} vs {len(old)}")
    diffs = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs[picks].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(len(diffs), float(diffs.mean()), float(low), float(high))


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict and, per condition, what was compared and whether it held."""

    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def decision(self) -> str:
        return Decision.PROMOTED if self.passed else Decision.REJECTED


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flatten(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{suite: {metric: value}}`` (``metrics.json``) as ``{"<suite>.<metric>": value}``."""
    return {
        f"{suite}.{key}": float(value)
        for suite, entry in metrics.items()
        for key, value in entry.items()
        if _numeric(value)
    }


def by_suite(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"<suite>.<metric>": v}`` back to ``{suite: {metric: v}}`` (suite names may hold
    dots; NaN values are dropped)."""
    suites: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        suite, _, metric = key.rpartition(".")
        if suite and not (isinstance(value, float) and math.isnan(value)):
            suites.setdefault(suite, {})[metric] = value
    return suites


def gate(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    rules: GateSettings,
    *,
    rescored: str | None = None,
) -> GateResult:
    """Whether ``challenger``'s flat metrics may replace ``champion``'s (None: there is no
    champion, the first model passes), with every condition and its numbers. ``rescored``:
    the champion version the challenger's ``vs_champion_*`` metrics were measured against
    when that is the champion now (else they are ignored)."""
    new = by_suite(challenger)
    passed, reasons = True, [] if champion is not None else [FIRST_MODEL]

    def check(ok: bool, text: str) -> None:
        nonlocal passed
        passed &= ok
        reasons.append(f"{text}: {'ok' if ok else 'FAILED'}")

    stale = new.get(rules.primary_suite, {}).get("stale_rate")
    if stale is not None:  # the current truth: a model that still gives old values is not promoted
        changed = new[rules.primary_suite].get("changed_facts")
        of = f" (of {int(changed)} changed facts)" if changed else ""
        check(
            stale <= rules.max_stale,
            f"{rules.primary_suite} stale rate {stale:.4f}{of} <= max {rules.max_stale:.4f}",
        )
    serving = new.pop(SERVING, {})
    if serving.get("compression_error"):
        rank = f" to rank {int(serving['rank'])}" if serving.get("rank") else ""
        check(
            serving["compression_error"] <= rules.max_compression_error,
            f"served adapter truncated{rank}: worst layer error {serving['compression_error']:.4f} "
            f"<= max {rules.max_compression_error:.4f}",
        )
    if champion is None:
        return GateResult(passed, reasons)
    old = by_suite(champion)
    old.pop(SERVING, None)

    def paired(suite: str) -> PairedDifference | None:
        return PairedDifference.from_metrics(new.get(suite, {})) if rescored else None

    primary = rules.primary_suite
    same_items = paired(primary)
    if "score" not in new.get(primary, {}):
        check(False, f"{primary} (primary suite): not evaluated for the challenger")
    elif same_items is not None:
        check(
            same_items.low > rules.min_primary_gain,
            f"{primary} vs champion v{rescored} on the same items: {same_items.text()}; "
            f"low end > min gain {rules.min_primary_gain:.4f} (better beyond noise)",
        )
    elif "score" not in old.get(primary, {}):
        reasons.append(f"{primary} (primary suite): champion has no score; not compared")
    else:
        score, floor = new[primary]["score"], old[primary]["score"] + rules.min_primary_gain
        check(
            score >= floor,
            f"{primary} score {score:.4f} >= champion {old[primary]['score']:.4f} "
            f"+ min gain {rules.min_primary_gain:.4f} = {floor:.4f}{_sizes(new[primary], old[primary])}",
        )
    for suite, values in sorted(new.items()):
        if "forgetting" in values:
            check(
                values["forgetting"] <= rules.max_forgetting,
                f"{suite} forgetting since the stock base {values['forgetting']:.4f} "
                f"<= max {rules.max_forgetting:.4f}",
            )
    for suite in sorted(set(new) | set(old)):
        if suite == primary:
            continue
        if "score" not in new.get(suite, {}):
            reasons.append(f"{suite}: not evaluated for the challenger; not compared")
            continue
        if "score" not in old.get(suite, {}):
            reasons.append(f"{suite}: champion has no score; not compared")
            continue
        score, before = new[suite]["score"], old[suite]["score"]
        lower = [m for m in (*new[suite], *old[suite]) if lower_is_better(m)]
        same_items = paired(suite)
        if same_items is not None and not lower:
            worse = same_items.high < 0 and same_items.mean < -rules.tolerance
            check(
                not worse,
                f"{suite} vs champion v{rescored} on the same items: {same_items.text()}; fails only if "
                f"worse beyond noise and by more than tolerance {rules.tolerance:.4f}",
            )
        elif lower:  # relative, as perplexity's forgetting is: a 2% rise whatever its scale
            limit = before * (1 + rules.tolerance)
            check(
                score <= limit,
                f"{suite} {lower[0]} {score:.4f} <= champion {before:.4f} x (1 + tolerance "
                f"{rules.tolerance:.4f}) = {limit:.4f} (lower is better)",
            )
        else:
            limit = before - rules.tolerance
            check(
                score >= limit,
                f"{suite} score {score:.4f} >= champion {before:.4f} - tolerance {rules.tolerance:.4f} = {limit:.4f}",
            )
    return GateResult(passed, reasons)


def _sizes(new: Mapping[str, float], old: Mapping[str, float]) -> str:
    """How many items each stored score is over, when known (different items: a caveat)."""
    if "n" not in new or "n" not in old:
        return ""
    n_new, n_old = int(new["n"]), int(old["n"])
    if n_new == n_old:
        return f" (n={n_new}; stored scores)"
    return f" (n={n_new} vs {n_old}: stored scores of different items, not re-scored)"
