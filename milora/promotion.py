"""The promotion gate: may a challenger's evaluation replace the champion's?

Pure rules over evaluation metrics, with no registry and no model: the pipeline reads both
versions' metrics from MLflow and asks :func:`gate`. Metrics arrive flat, as MLflow stores
them (``"<suite>.<metric>": value``, e.g. ``company.score``, ``world_probes.forgetting``);
:func:`flatten` and :func:`by_suite` convert to and from ``metrics.json``'s nesting.

Every condition must hold, and each is reported with its numbers:

* the primary suite's score is at least the champion's plus ``min_primary_gain``;
* no retention suite forgets more than ``max_forgetting`` (measured against the stock base);
* every other suite scored for both is within ``tolerance`` of the champion, in the
  metric's own direction (perplexity: lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from milora.evaluation.scoring import lower_is_better
from milora.records import Decision
from milora.settings import GateSettings

FIRST_MODEL = "first model: no champion yet"


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
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, rules: GateSettings
) -> GateResult:
    """Whether ``challenger``'s flat metrics may replace ``champion``'s (None: there is no
    champion, the first model passes), with every condition and its numbers."""
    if champion is None:
        return GateResult(True, [FIRST_MODEL])
    new, old = by_suite(challenger), by_suite(champion)
    passed, reasons = True, []

    def check(ok: bool, text: str) -> None:
        nonlocal passed
        passed &= ok
        reasons.append(f"{text}: {'ok' if ok else 'FAILED'}")

    primary = rules.primary_suite
    if "score" not in new.get(primary, {}):
        check(False, f"{primary} (primary suite): not evaluated for the challenger")
    elif "score" not in old.get(primary, {}):
        reasons.append(f"{primary} (primary suite): champion has no score; not compared")
    else:
        score, floor = new[primary]["score"], old[primary]["score"] + rules.min_primary_gain
        check(
            score >= floor,
            f"{primary} score {score:.4f} >= champion {old[primary]['score']:.4f} "
            f"+ min gain {rules.min_primary_gain:.4f} = {floor:.4f}",
        )
    for suite, values in sorted(new.items()):
        if "forgetting" in values:
            check(
                values["forgetting"] <= rules.max_forgetting,
                f"{suite} forgetting {values['forgetting']:.4f} <= max {rules.max_forgetting:.4f}",
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
        if lower:
            limit = before + rules.tolerance
            check(
                score <= limit,
                f"{suite} {lower[0]} {score:.4f} <= champion {before:.4f} + tolerance "
                f"{rules.tolerance:.4f} = {limit:.4f} (lower is better)",
            )
        else:
            limit = before - rules.tolerance
            check(
                score >= limit,
                f"{suite} score {score:.4f} >= champion {before:.4f} - tolerance {rules.tolerance:.4f} = {limit:.4f}",
            )
    return GateResult(passed, reasons)
