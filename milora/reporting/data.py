"""What a report shows, as plain data (gathered elsewhere, rendered by :mod:`.pages`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Spectrum:
    """All singular values of one target weight and the components an adapter starts in."""

    name: str
    shape: tuple[int, int]
    values: list[float]  # descending
    method: str | None = None
    adapted: tuple[int, int] | None = None  # [start, stop) indices into values
    adapter_values: list[float] = field(default_factory=list)  # held by the init adapter, descending


@dataclass(frozen=True)
class VersionPoint:
    """One registered model version with its evaluation scores and the gate's decision."""

    version: str
    scores: dict[str, float]  # suite -> headline score
    forgetting: dict[str, float] = field(default_factory=dict)  # retention suite -> forgetting
    decision: str | None = None  # promoted | rejected | None (never gated)
    champion: bool = False  # holds the champion alias now
    rolled_back: bool = False  # was champion, then demoted by a rollback
    created: float | None = None  # seconds since the epoch
    description: str = ""
    parent: str | None = None  # the version it started from (a run from the champion)
    start: str | None = None  # base | continue | refold
    train_seconds: float | None = None  # the training stage's cost
    stale_rate: float | None = None  # primary suite: changed facts answered with an old value


@dataclass
class RunPage:
    """Everything one run's page shows; empty parts are explained in ``notes``."""

    record: dict[str, Any]  # the run record (outputs/runs/<time>.json)
    loss: list[tuple[float, float]] = field(default_factory=list)  # (step, training loss)
    evaluation: list[dict[str, Any]] = field(
        default_factory=list
    )  # suite, metric, n, base, adapter, forgetting
    champion: VersionPoint | None = None  # the champion this run is compared with
    max_forgetting: float | None = None  # the gate's limit
    spectra: list[Spectrum] = field(default_factory=list)
    history: list[VersionPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IndexRow:
    """One run in the index: when, how it ended and why, and where its page is."""

    time: float
    status: str
    name: str
    href: str | None
    version: str | None = None
    decision: str | None = None
    primary: float | None = None  # the primary suite's score of this run's adapter
    forgetting: float | None = None  # the largest forgetting over retention suites
    seconds: float | None = None
    reason: str = ""  # the error of a failed run, or the gate's first failed condition
