"""Method comparison: lora, pissa and milora trained and scored the same way, side by side.

``python -m tasks.compare [--params params.yaml] [--set KEY=VALUE ...]``

Trains every method of ``compare.methods`` at the same rank and budget on the validated
dataset's training split, once per seed of ``compare.seeds`` at one shared learning rate
(the paper's protocol), plus a per-method learning-rate sweep (``compare.lr_sweep``) on the
first seed as a fairness check. Each run is scored on ``compare.suites`` (by default all of
``evaluate.suites``) every ``compare.eval_every`` steps. ``compare.out_dir`` gets ``runs/<method>-lr<rate>-s<seed>/``
(each with ``trajectory.json``), ``table.md``, ``table.csv``, ``sweep.csv`` and the plots
``tradeoff``, ``steps`` and ``sweep_tradeoff`` (PNG and SVG). A rerun reuses every run
whose inputs did not change. The Prefect flow ``flows/compare.py`` runs the same functions.
"""

from __future__ import annotations

import argparse
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import parse_overrides, run_command, stage_task

logger = logging.getLogger(__name__)

RUNS = "runs"


def plan(settings: Settings) -> list[dict[str, Any]]:
    """The runs to train, main protocol first: ``{"method", "seed", "learning_rate"}``."""
    from dataclasses import asdict

    from milora.comparison import plan_runs

    cfg = settings.compare
    rate = cfg.hyperparameters(settings.train).learning_rate
    return [asdict(run) for run in plan_runs(cfg.methods, cfg.seeds, rate, cfg.lr_sweep, cfg.sweep_seeds)]


def dataset(settings: Settings) -> Path:
    """The validated dataset, ingested and validated first when it was never published."""
    folder = settings.path(settings.validation.dataset_dir)
    if not (folder / "manifest.json").is_file():
        from tasks.ingest import ingest
        from tasks.validate import validate

        logger.info("%s was never published: ingesting and validating the configured sources", folder)
        ingest(settings)
        validate(settings)
    return folder


def compare_run(
    settings: Settings, method: str, seed: int, learning_rate: float, dataset_dir: Path | None = None
) -> dict[str, Any]:
    """Train and score one run along training; returns its record as a dict."""
    from dataclasses import asdict, replace

    from milora.comparison import RunSpec, track_run
    from milora.data.dataset import REPLAY, load_messages

    cfg, train = settings.compare, settings.train
    folder = Path(dataset_dir or dataset(settings))
    conversations = load_messages(folder, "train")
    if not conversations:
        raise ValueError("the dataset's train split is empty; nothing to compare on")
    spec = train.adapter_spec(method, cfg.rank)
    config = replace(cfg.hyperparameters(train), learning_rate=learning_rate, seed=seed)
    name = RunSpec(method, seed, learning_rate).name
    logger.info(
        "comparison run %s: r=%d, %d steps, eval every %d", name, spec.r, config.max_steps, cfg.eval_every
    )
    ev = settings.evaluation
    record = track_run(
        settings.path(settings.base_model),
        conversations,
        settings.path(cfg.out_dir) / RUNS / name,
        spec,
        config,
        selected_suites(settings),
        settings.root,
        eval_every=cfg.eval_every,
        cache_dir=settings.path(train.cache_dir) if train.cache_dir else None,
        eval_cache_dir=settings.path(ev.cache_dir) if ev.cache_dir else None,
        batch_size=ev.batch_size,
        device=train.device,
        replay=load_messages(folder, "train", REPLAY) if config.replay_share else (),
    )
    return asdict(record)


def selected_suites(settings: Settings) -> dict[str, Any]:
    names = settings.compare.suites or list(settings.evaluation.suites)
    return {name: settings.evaluation.suites[name] for name in names}


def report(settings: Settings, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Table and plots of ``records``: the shared-rate runs of ``compare.seeds`` are the main
    protocol, the runs of the first ``sweep_seeds`` seeds at every rate the sweep."""
    from milora.comparison import RunRecord, write_report

    cfg = settings.compare
    runs = [RunRecord.from_dict(r) for r in records]
    rate = cfg.hyperparameters(settings.train).learning_rate
    main = [r for r in runs if r.learning_rate == rate and r.seed in cfg.seeds]
    sweep_seeds = cfg.seeds[: cfg.sweep_seeds]
    sweep = [r for r in runs if r.seed in sweep_seeds] if cfg.lr_sweep else []
    first = main[0]
    minutes = sum(r.init_seconds + r.train_seconds + r.eval_seconds for r in runs) / 60
    header = (
        f"# Method comparison\n\n{', '.join(cfg.methods)} at rank {first.rank}, {first.steps} steps, "
        f"learning rate {rate:g}, seeds {cfg.seeds}, scored every {cfg.eval_every} steps on "
        f"{', '.join(first.suites)}; base model `{settings.base_model}`; the {len(runs)} runs took "
        f"{minutes:.1f} min of training and scoring on {platform.machine()} ({platform.system()}).\n"
    )
    result = write_report(
        main, sweep, settings.path(cfg.out_dir), primary=settings.registry.gate.primary_suite,
        level=cfg.matched_company, header=header,
    )  # fmt: skip
    logger.info("comparison table: %s", result["table_md"])
    return {**result, "plots": [str(p) for p in result["plots"]]}


dataset_task = stage_task(dataset, "compare-dataset")
run_task = stage_task(compare_run, "compare-run")
report_task = stage_task(report, "compare-report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    settings = load_settings(args.params, parse_overrides(args.set, parser))
    folder = dataset(settings)
    records = [compare_run(settings, **run, dataset_dir=folder) for run in plan(settings)]
    print(report(settings, records)["markdown"], end="")
    return 0


if __name__ == "__main__":
    run_command(main)
