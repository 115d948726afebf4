"""Which runs a comparison trains: every method at one shared learning rate over several
seeds (the paper's protocol), plus an optional per-method learning-rate sweep on the first
seed(s) as a fairness check (a method may simply prefer another rate)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class RunSpec:
    """One training run of the comparison; its name is its folder under ``runs/``."""

    method: str
    seed: int
    learning_rate: float

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.learning_rate:g}-s{self.seed}"


def plan_runs(
    methods: Sequence[str],
    seeds: Sequence[int],
    learning_rate: float,
    lr_sweep: Sequence[float] = (),
    sweep_seeds: int = 1,
) -> list[RunSpec]:
    """The main runs (methods x seeds at ``learning_rate``), then the sweep runs not already
    among them (methods x ``lr_sweep`` x the first ``sweep_seeds`` seeds), without repeats."""
    runs = [RunSpec(method, seed, learning_rate) for method in methods for seed in seeds]
    for method in methods:
        for rate in lr_sweep:
            for seed in list(seeds)[:sweep_seeds]:
                spec = RunSpec(method, seed, float(rate))
                if spec not in runs:
                    runs.append(spec)
    return runs
