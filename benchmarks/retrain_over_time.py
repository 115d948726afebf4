"""Retraining over the demo year: from the stock base every month, or from the champion.

Why: retraining from the champion (``train.start: champion``) should cost a fraction of a
full retrain each month while learning the month as well and forgetting no more. This
measures it on the demo world's six monthly drops, for {full from base, continue, refold} x
{milora, lora} at equal rank, with the pipeline's own stages (ingest, validate, train,
evaluate) and its gate:

    python benchmarks/retrain_over_time.py [--out outputs/retrain_over_time] [--months N]
        [--methods milora lora] [--strategies full continue refold] [--set KEY=VALUE ...]

A scratch copy of the project (as ``benchmarks/year_simulation.py`` makes it) receives the
drops one by one; each month is ingested and validated once, then every arm trains from its
own parent (``full``: the stock base on every row; ``continue``/``refold``: its own
champion, on the rows new since that champion's data plus ``train.from_champion.
earlier_share`` of the earlier ones, with the profile ``train.from_champion.profile``) and
is scored on the current truth of every month so far, and on the world probes against the
stock base (cumulative forgetting). The gate (``milora.promotion.gate``, the pipeline's
rules) decides per arm whether the run becomes that arm's champion, with the champion
re-scored on the same items as the flow's champion step does. Month 1 of a chain is the full run of its method (the same run: reused).

Per arm and month: training wall seconds (the train stage: model load, SVD, training,
conversion) and tokens (non-padding input tokens the Trainer saw), company score on the
current truth (``contains``), the same on facts of earlier months still valid, stale rate,
world-probe forgetting since the stock base, served rank, gate decision. Writes
``table.md``, ``table.csv``, ``months.png``; the last line printed is one JSON object with the
totals and the issue's targets (cost ratio, last-month company gap, forgetting).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)  # before transformers is imported: nothing calls out

from year_simulation import LATER_DROPS, machine, make_scratch, month_folders, snapshot  # noqa: E402

from milora.layout import (  # noqa: E402
    CHAIN_RECORD,
    FROM_BASE,
    FROM_VERSION,
    METRICS,
    PARENT_RECORD,
    RAW_ADAPTER,
    SERVED_ADAPTER,
    START_WEIGHTS,
)
from milora.settings import Settings, load_settings  # noqa: E402
from tasks import parse_overrides  # noqa: E402

logger = logging.getLogger("retrain_over_time")

STRATEGIES = ("full", "continue", "refold")  # full: from the stock base every month
METHODS = ("milora", "lora")
SUITES = ("company", "world_probes", "world_text")  # scored (the demo model is at chance on the rest)
COMPANY, RETENTION = "company", "world_probes"
COLUMNS = [
    "method",
    "strategy",
    "month",
    "rows",
    "train_s",
    "tokens",
    "company",
    "earlier_valid",
    "stale_rate",
    "forgetting",
    "served_rank",
    "served_company",
    "gate",
]


# --------------------------------------------------------------------------- one arm, one month
@dataclass(frozen=True)
class Champion:
    """An arm's champion: its version (the month number), metrics and served adapter."""

    version: str
    metrics: dict[str, float]
    served: Path


def keep_champion(settings: Settings, version: str, metrics: dict[str, float]) -> Champion:
    run = settings.path(settings.train.run_dir)
    kept = run.parent / "champion_adapter"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(run / SERVED_ADAPTER, kept)
    return Champion(version, metrics, kept)


def arm_settings(project_settings: Settings, method: str, strategy: str, arm_dir: str) -> Settings:
    return project_settings.with_overrides(
        {
            "train.method": method,
            "train.start": FROM_BASE if strategy == "full" else FROM_VERSION,
            "train.from_champion.strategy": "refold" if strategy == "full" else strategy,
            "train.run_dir": f"{arm_dir}/run",
            "train.parent_dir": f"{arm_dir}/parent",
            "evaluate.out_dir": f"{arm_dir}/eval",
        }
    )


def publish_champion(settings: Settings, version: str) -> None:
    """The arm's run becomes its champion: its parent folder holds what the registry would
    give the parent stage (adapters, start weights, chain.json, parent.json)."""
    run, parent = settings.path(settings.train.run_dir), settings.path(settings.train.parent_dir)
    shutil.rmtree(parent, ignore_errors=True)
    parent.mkdir(parents=True)
    for name in (RAW_ADAPTER, SERVED_ADAPTER, START_WEIGHTS):
        if (run / name).is_dir():
            shutil.copytree(run / name, parent / name)
    shutil.copy(run / CHAIN_RECORD, parent / CHAIN_RECORD)
    record = {"start": FROM_VERSION, "version": version, "run_id": "", "data_version": ""}
    (parent / PARENT_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def start_from_base(settings: Settings) -> None:
    parent = settings.path(settings.train.parent_dir)
    parent.mkdir(parents=True, exist_ok=True)
    (parent / PARENT_RECORD).write_text(json.dumps({"start": FROM_BASE}) + "\n")


def tokens_seen(run_dir: Path) -> int | None:
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    seen = [r["num_input_tokens_seen"] for r in rows if "num_input_tokens_seen" in r]
    return int(seen[-1]) if seen else None


def earlier_valid(eval_dir: Path, newest_drop: str) -> float | None:
    """Company score on the facts whose current answer came before this month's drop."""
    rows = json.loads((eval_dir / f"{COMPANY}.json").read_text())["predictions"]
    kept = [r["contains"] for r in rows if r.get("drop") and r["drop"] != newest_drop]
    return sum(kept) / len(kept) if kept else None


def run_arm_month(
    settings: Settings, strategy: str, drop: str, champion: Champion | None, reuse: Path | None
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train and evaluate one arm's month (``reuse``: the same run done by another arm, copied);
    the champion is re-scored on the month's company items, as the flow's champion step does."""
    from milora.evaluation.runner import compare_with_champion
    from milora.promotion import flatten, gate
    from tasks.evaluate import evaluate
    from tasks.register import chain_facts
    from tasks.train import train

    run_dir = settings.path(settings.train.run_dir)
    eval_dir = settings.path(settings.evaluation.out_dir)
    if reuse is not None:
        for name in ("run", "eval"):
            shutil.rmtree(run_dir.parent / name, ignore_errors=True)
            shutil.copytree(reuse / name, run_dir.parent / name)
        timing = json.loads((reuse / "timing.json").read_text())
    else:
        started = time.perf_counter()
        train(settings)
        timing = {"train_s": time.perf_counter() - started}
        evaluate(settings)
    (run_dir.parent / "timing.json").write_text(json.dumps(timing))
    summary = json.loads((run_dir / "train_summary.json").read_text())
    chain = json.loads((run_dir / CHAIN_RECORD).read_text())
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    _, serving = chain_facts(run_dir)
    flat = {**flatten(metrics), **serving}
    paired = None
    if champion is not None:  # re-scored on the same items (cached per champion and suite content)
        cfg = settings.evaluation
        paired = compare_with_champion(
            settings.path(settings.base_model),
            champion.served,
            champion.version,
            eval_dir,
            dict(cfg.suites),
            settings.root,
            run_dir.parent / "champion",
            batch_size=cfg.batch_size,
            cache_dir=settings.path(cfg.cache_dir) if cfg.cache_dir else None,
        )
    decision = gate(
        {**flat, **flatten(paired["suites"] if paired else {})},
        champion.metrics if champion is not None else None,
        settings.registry.gate,
        rescored=champion.version if champion is not None else None,
    )
    row = {
        "month": drop,
        "strategy": strategy,
        "method": settings.train.method,
        "rows": summary["examples"],
        "rows_new": chain.get("rows_new"),
        "rows_earlier": chain.get("rows_earlier"),
        "train_s": round(timing["train_s"], 1),
        "tokens": tokens_seen(run_dir),
        "company": metrics[COMPANY]["score"],
        "earlier_valid": earlier_valid(eval_dir, drop),
        "stale_rate": metrics[COMPANY].get("stale_rate"),
        "forgetting": metrics[RETENTION].get("forgetting"),
        "world_text_ppl": metrics.get("world_text", {}).get("score"),
        "served_rank": int(serving["serving.rank"]),
        # What users get after the gate: this run, or the champion kept (scored on the same items).
        "served_company": metrics[COMPANY]["score"]
        if decision.passed or paired is None
        else paired["suites"][COMPANY]["champion_score"],
        "gate": "promoted"
        if decision.passed
        else "rejected: " + "; ".join(r for r in decision.reasons if "FAILED" in r),
    }
    return row, flat


# --------------------------------------------------------------------------- outputs
def shown(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = [shown(row.get(key)).replace("|", "\\|") for key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({(r["method"], r["strategy"]) for r in rows})
    months = sorted({r["month"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"full": "o-", "continue": "s--", "refold": "^:"}
    for method, strategy in arms:
        mine = {r["month"]: r for r in rows if (r["method"], r["strategy"]) == (method, strategy)}
        x = [months.index(m) for m in mine]
        label = f"{method} {strategy}"
        cost, total = [], 0.0
        for m in mine:
            total += mine[m]["train_s"]
            cost.append(total)
        axes[0].plot(x, cost, styles[strategy], label=label)
        axes[1].plot(x, [mine[m]["company"] for m in mine], styles[strategy], label=label)
        axes[2].plot(x, [mine[m]["forgetting"] for m in mine], styles[strategy], label=label)
    titles = (
        "cumulative training seconds",
        "company score (current truth)",
        "world-probe forgetting since the stock base",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(months)), months, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals per arm and the issue's targets against full retraining of the same method."""
    arms: dict[str, dict[str, Any]] = {}
    for row in rows:
        arm = arms.setdefault(
            f"{row['method']}/{row['strategy']}", {"train_s": 0.0, "tokens": 0, "promoted": 0, "months": 0}
        )
        arm["train_s"] = round(arm["train_s"] + row["train_s"], 1)
        arm["tokens"] += row["tokens"] or 0
        arm["promoted"] += row["gate"] == "promoted"
        arm["months"] += 1
        arm["last_company"], arm["last_forgetting"] = row["company"], row["forgetting"]
        arm["last_served_company"] = row["served_company"]
        arm["max_forgetting"] = max(arm.get("max_forgetting", 0.0), row["forgetting"] or 0.0)
        arm["last_stale"] = row["stale_rate"]
    targets = {}
    for name, arm in arms.items():
        method, strategy = name.split("/")
        full = arms.get(f"{method}/full")
        if strategy == "full" or full is None:
            continue
        targets[name] = {
            "cost_ratio_s": round(arm["train_s"] / full["train_s"], 3),
            "cost_ratio_tokens": round(arm["tokens"] / full["tokens"], 3) if full["tokens"] else None,
            "company_gap": round(full["last_company"] - arm["last_company"], 4),
            "served_company_gap": round(full["last_served_company"] - arm["last_served_company"], 4),
            "forgetting_vs_full": round(arm["last_forgetting"] - full["last_forgetting"], 4),
        }
        targets[name]["met"] = (
            targets[name]["cost_ratio_s"] <= 1 / 3
            and targets[name]["company_gap"] <= 0.03
            and targets[name]["forgetting_vs_full"] <= 0.0
        )
    return {"arms": arms, "targets": targets}


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/retrain_over_time.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "retrain_over_time")
    parser.add_argument("--months", type=int, help="only the first N months")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MILORA_LOG_LEVEL", "INFO"), format="%(asctime)s %(message)s")
    for noisy in ("transformers", "milora", "tasks", "great_expectations", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = parse_overrides(args.set, parser)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="milora-retrain-"))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        project, watch = make_scratch(REPO, work, overrides)
        drops = snapshot(month_folders(REPO, watch, args.months), work / "drops")
        if not drops:
            raise SystemExit(f"no drops in {REPO / watch} or {REPO / LATER_DROPS}")
        base = load_settings(project / "params.yaml")
        base = base.with_overrides(
            {
                "evaluate.suites": {
                    k: v
                    for k, v in base.model_dump(by_alias=True)["evaluate"]["suites"].items()
                    if k in SUITES
                }
            }
        )
        champions: dict[tuple[str, str], Champion] = {}
        from tasks.ingest import ingest
        from tasks.validate import validate

        for number, drop in enumerate(drops, 1):
            shutil.copytree(drop, project / watch / drop.name)
            with contextlib.chdir(project):
                ingest(base)
                validate(base)
            for method in args.methods:
                for strategy in sorted(args.strategies, key=STRATEGIES.index):
                    arm_dir = f"outputs/arms/{method}-{strategy}"
                    settings = arm_settings(base, method, strategy, arm_dir)
                    if number == 1 or strategy == "full":
                        start_from_base(settings)
                    # Month 1 of a chain is its method's full run (same data, settings, start).
                    full_dir = project / f"outputs/arms/{method}-full"
                    reuse = (
                        full_dir if number == 1 and strategy != "full" and "full" in args.strategies else None
                    )
                    row, flat = run_arm_month(
                        settings, strategy, drop.name, champions.get((method, strategy)), reuse
                    )
                    rows.append(row)
                    if row["gate"] == "promoted":
                        champions[(method, strategy)] = keep_champion(settings, str(number), flat)
                        if strategy != "full":
                            publish_champion(settings, str(number))
                    logger.info(
                        "%s %s %-8s %s: %d rows, %.0f s, company %.3f, forgetting %.3f, rank %d, %s",
                        drop.name,
                        method,
                        strategy,
                        "reused" if reuse else "trained",
                        row["rows"],
                        row["train_s"],
                        row["company"],
                        row["forgetting"],
                        row["served_rank"],
                        row["gate"][:60],
                    )
    finally:
        if rows:
            header = (
                f"Retraining over the demo year. Machine: {machine()}; "
                f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; "
                f"{time.perf_counter() - started:.0f} s in all; overrides: {', '.join(args.set) or 'none'}"
            )
            table = markdown(rows, header)
            (out / "table.md").write_text(table)
            with (out / "table.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            plot(rows, out / "months.png")
            print(table, end="")
        if args.keep:
            print(f"scratch copy: {work / 'project'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = verdict(rows)
    (out / "verdict.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
