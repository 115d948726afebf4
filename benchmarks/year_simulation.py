"""A year of scheduled retraining on the demo world: one real flow run per monthly drop.

Why: the monthly loop test proves two months and a few failure cases; this shows what a
whole year of drops does to the champion (company score on the current truth, stale rate,
forgetting, the gate's verdicts, wall times), as a table and a plot to read at a glance.

    python benchmarks/year_simulation.py [--out outputs/year] [--months N]
        [--set KEY=VALUE ...] [--keep] [--keep-going]

A scratch copy of the project (the working tree's tracked and untracked-but-not-ignored
files, no .venv) is made in a temporary folder with an empty watched folder
(``ingest.watch`` keeps only its non-drop files) and made a fresh git + DVC repository (DVC
cache ``.dvc/cache`` and remote ``.dvc-remote``, MLflow ``mlflow.db``, Prefect home
``.prefect``: all inside the copy; nothing calls out). Then, month by month, each drop of
``<watch>/drop_*`` and then ``data/demo/later_drops/drop_*`` of this project is copied in,
committed, and ``python -m flows.retrain`` runs there with this interpreter, as the schedule
would. ``--set`` overrides are written into the copy's params.yaml before the first month
(the flow has no ``--set``). Writes ``<out>/table.md``, ``<out>/table.csv``,
``<out>/year.png`` and each month's flow output in ``<out>/logs/``; prints the table.
A failed month stops the year (exit 1) unless ``--keep-going``; its drop then stays in the
watched folder, as a bad drop would until someone removes it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from milora.offline import OFFLINE_ENV  # noqa: E402
from milora.records import RunStatus  # noqa: E402
from milora.settings import SettingsError, load_settings  # noqa: E402
from tasks import STAGES, parse_overrides  # noqa: E402

logger = logging.getLogger("year_simulation")

LATER_DROPS = Path("data/demo/later_drops")  # months after the committed ones (a generator fills it)
RUNS_DIR = Path("outputs/runs")  # the flow's run records (tasks/report.py RUNS_DIR)
NOT_COPIED = (".venv",)  # the interpreter stays where it is: the flow runs with this one
# dvc.lock records the project's own outputs, which the copy's fresh DVC cache does not hold:
# the copy starts as a project that has never run.
NOT_COPIED_FILES = ("dvc.lock",)
GIT_IDENTITY = ("-c", "user.email=year@example.invalid", "-c", "user.name=year-simulation")
RETENTION_SUITE = "world_probes"  # what the base knew: forgetting = its drop
NA = "n/a"

COLUMNS = (
    "month",
    "status",
    "stages_run",
    "train_s",
    "company",
    "stale_rate",
    "forgetting",
    "gate",
    "version",
    "flow_s",
    "company_metric",
    "gate_reasons",
    "error",
)
# What the markdown table shows (the CSV has every column).
SHOWN = {
    "month": "month",
    "status": "status",
    "stages_run": "stages run",
    "train_s": "train s",
    "company": "company",
    "stale_rate": "stale rate",
    "forgetting": "forgetting (world_probes)",
    "gate": "gate",
    "version": "version",
    "flow_s": "flow s",
}


# --------------------------------------------------------------------------- the copy
def project_files(repo: Path) -> list[Path]:
    """The working tree's files git knows or would add (tracked, untracked-not-ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.decode()
    files = []
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = Path(name)
        if path.parts[0] in NOT_COPIED or name in NOT_COPIED_FILES:
            continue
        if (repo / path).is_file() or (repo / path).is_symlink():  # a deleted tracked file is skipped
            files.append(path)
    return files


def git(root: Path, *args: str) -> None:
    """A git command in the copy, its output kept out of the progress log unless it fails."""
    done = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {root} failed: {done.stderr.strip() or done.stdout}")


def commit(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "-c", "commit.gpgsign=false", "commit", "-q", "--allow-empty", "--no-verify", "-m", message)


def set_dotted(params: Path, overrides: dict[str, Any]) -> None:
    """Write ``{"train.rank": 8}``-style overrides into params.yaml, comments kept (a YAML
    round-trip: DVC reads the same file, so the stages see exactly these values)."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip, in params.yaml's own layout: indented lists, null written out
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = yaml.load(params.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise SettingsError(f"--set {dotted}: {key} is not a section of params.yaml")
        node[last] = value
    with params.open("w", encoding="utf-8") as handle:
        yaml.dump(data, handle)


def make_scratch(repo: Path, work: Path, overrides: dict[str, Any]) -> tuple[Path, Path]:
    """The scratch project (a fresh git + DVC repo with an empty watched folder) and its
    watched folder, relative to the project root."""
    project = work / "project"
    files = project_files(repo)
    for name in files:
        target = project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target, follow_symlinks=False)
    logger.info("copied %d files of %s to %s", len(files), repo, project)
    # Paths outside the project the params name (../shared/benchmarks: optional benchmark
    # suites and contamination sets) resolve from the copy as from the project.
    shared = repo.parent / "shared"
    if shared.is_dir():
        (work / "shared").symlink_to(shared, target_is_directory=True)
    if overrides:
        set_dotted(project / "params.yaml", overrides)
    settings = load_settings(project / "params.yaml")  # overrides checked here, with the key named
    watch = Path(settings.ingest.watch)
    if watch.is_absolute():
        raise SettingsError(
            f"ingest.watch {watch} is absolute: the copy would train on the project's own folder"
        )
    for folder in sorted((project / watch).glob("drop_*")):
        if folder.is_dir():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    left = sorted(p.name for p in (project / watch).iterdir()) if (project / watch).is_dir() else []
    logger.info("watched folder %s now holds: %s", watch, ", ".join(left) or "nothing")
    (project / ".dvc" / "cache").mkdir(parents=True, exist_ok=True)  # DVC's default cache: in the copy
    git(project, "init", "-q")
    commit(project, "the project, before any monthly drop")
    return project, watch


def child_env(project: Path) -> dict[str, str]:
    """The flow's environment: offline, this interpreter first on PATH, Prefect home, MLflow
    store and DVC all inside the copy (no server or store of the caller's is used)."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_PROFILE"):
        env.pop(key, None)  # the params' sqlite:///mlflow.db and a temporary Prefect server
    return env


def month_folders(repo: Path, watch: Path, months: int | None) -> list[Path]:
    """The drops in schedule order: the watched folder's, then data/demo/later_drops'."""
    found: list[Path] = []
    for group in (repo / watch, repo / LATER_DROPS):
        if group.is_dir():
            found += sorted((p for p in group.glob("drop_*") if p.is_dir()), key=lambda p: p.name)
        else:
            logger.info("%s does not exist: no months from it", group.relative_to(repo))
    names = [p.name for p in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"drops named twice ({', '.join(twice)}): each month's folder name must be unique")
    if months is not None:
        if months > len(found):
            logger.warning("--months %d: only %d drops exist, running them all", months, len(found))
        found = found[:months]
    return found


def snapshot(drops: Sequence[Path], folder: Path) -> list[Path]:
    """The drops as they are now, copied aside: a generator still writing later drops, or
    an edit to the project's drops, does not change the year halfway through."""
    copies = []
    for i, drop in enumerate(drops):
        copy = folder / f"{i:03d}" / drop.name
        shutil.copytree(drop, copy)
        copies.append(copy)
    return copies


# --------------------------------------------------------------------------- a month
def newest_record(project: Path, before: set[str]) -> dict[str, Any] | None:
    """The run record this month's flow wrote: the newest (by its time) of the records that
    were not there ``before`` it ran."""
    records = []
    for path in (project / RUNS_DIR).glob("*.json"):
        if path.name in before:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return max(records, key=lambda r: float(r.get("time", 0))) if records else None


def record_names(project: Path) -> set[str]:
    return {path.name for path in (project / RUNS_DIR).glob("*.json")}


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def suite_row(record: dict[str, Any], suite: str) -> dict[str, Any]:
    return next((m for m in record.get("metrics") or [] if m.get("suite") == suite), {})


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def short_gate(decision: dict[str, Any] | None, primary: str = "company") -> str | None:
    """``promoted: <why>`` / ``rejected: <first failed condition>`` in a few words."""
    if not decision:
        return None
    verdict = str(decision.get("decision", ""))
    reasons = [str(r) for r in decision.get("reasons") or []]
    failed = [r for r in reasons if "FAILED" in r]
    if failed:
        why = failed[0]
    elif any(r.startswith("first model") for r in reasons):
        why = "first model"
    else:  # the primary suite against the champion (its stale-rate check is a floor, not the why)
        ours = [r for r in reasons if r.startswith(primary)]
        why = next(
            (r for r in ours if "stale rate" not in r), ours[0] if ours else reasons[0] if reasons else ""
        )
    why = re.sub(r":\s*(ok|FAILED)\b.*$", "", why.split("; ")[0]).strip()
    why = why.replace(" on the same items", "").replace(" paired items", " paired")
    if len(why) > 100:
        why = why[:97] + "..."
    if len(failed) > 1:
        why += f" (+{len(failed) - 1} more failed)"
    return f"{verdict}: {why}" if why else verdict


def error_line(log: Path, record: dict[str, Any] | None) -> str:
    """The flow's last error line: its ``retrain failed:`` line, else the record's error,
    else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("retrain failed:")]
    if failed:
        return failed[-1]
    if record and record.get("error"):
        return str(record["error"]).strip().splitlines()[-1]
    return lines[-1] if lines else "no output"


def month_row(
    month: str, project: Path, record: dict[str, Any] | None, flow_s: float, log: Path
) -> dict[str, Any]:
    """What a month's run did, from its run record (and the copy's stage outputs where the
    record does not hold a fact: training seconds, stale rate). Unknown stays None."""
    settings = load_settings(project / "params.yaml")
    status = str(record.get("status")) if record else RunStatus.FAILED
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(month=month, status=status, flow_s=round(flow_s, 1))
    if record is None or status == RunStatus.FAILED:
        row["status"] = RunStatus.FAILED
        row["error"] = error_line(log, record)
        ran = (record or {}).get("stages") or {}
        row["stages_run"] = ", ".join(s for s, done in ran.items() if done) or "none"
        return row
    ran = record.get("stages")
    if ran is None and record.get("checked_without_flow"):
        ran = dict.fromkeys(STAGES, False)  # DVC said every stage is as in dvc.lock
    row["stages_run"] = None if ran is None else (", ".join(s for s, done in ran.items() if done) or "none")
    if ran and ran.get("train"):
        summary = read_json(settings.path(settings.train.run_dir) / "train_summary.json")
        seconds = number(summary.get("seconds"))
        row["train_s"] = None if seconds is None else round(seconds, 1)
    if status != RunStatus.NO_NEW_DATA:  # the workspace's evaluation is this month's model
        primary = settings.registry.gate.primary_suite
        metrics = read_json(settings.path(settings.evaluation.out_dir) / "metrics.json")
        company, world = suite_row(record, primary), suite_row(record, RETENTION_SUITE)
        row["company"] = number(company.get("adapter", metrics.get(primary, {}).get("score")))
        suite = settings.evaluation.suites.get(primary)
        row["company_metric"] = company.get("metric") or (suite.metric if suite else None)
        row["stale_rate"] = number(metrics.get(primary, {}).get("stale_rate"))
        row["forgetting"] = number(
            world.get("forgetting", metrics.get(RETENTION_SUITE, {}).get("forgetting"))
        )
    decision = record.get("decision")
    row["gate"] = short_gate(decision, settings.registry.gate.primary_suite)
    row["gate_reasons"] = " | ".join(str(r) for r in (decision or {}).get("reasons") or []) or None
    registration = record.get("registration") or {}
    if registration.get("version") is not None:
        row["version"] = str(registration["version"]) + ("" if registration.get("new") else " (existing)")
    return row


def run_month(project: Path, watch: Path, drop: Path, env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Land the drop in the watched folder, commit it, run the flow as the schedule would."""
    month = drop.name
    shutil.copytree(drop, project / watch / month)
    commit(project, f"drop {month}")
    log = logs / f"{month}.log"
    before = record_names(project)
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "flows.retrain"],
            cwd=project,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    flow_s = time.perf_counter() - started
    record = newest_record(project, before)
    row = month_row(month, project, record, flow_s, log)
    if done.returncode != 0 and row["status"] != RunStatus.FAILED:  # exited 1 after its record
        row["status"] = RunStatus.FAILED
        row["error"] = error_line(log, record)
    # The run's dvc.lock goes into the next month's commit, with that month's drop.
    return row


# --------------------------------------------------------------------------- outputs
def shown(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def machine() -> str:
    """Host, CPUs and CPU model, for the table's header (timings depend on them)."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}, {os.cpu_count()} CPUs, {model or 'unknown CPU'}"


NUMERIC = {"train_s": 1, "flow_s": 1, "company": 4, "stale_rate": 4, "forgetting": 4}  # digits shown


def markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The header line, then one table row per month (a failed month shows its error)."""
    lines = [header, "", "| " + " | ".join(SHOWN.values()) + " |"]
    lines.append("|" + "|".join("---:" if key in NUMERIC else "---" for key in SHOWN) + "|")
    for row in rows:
        cells = []
        for key in SHOWN:
            value = row.get(key)
            if key == "gate" and row.get("status") == RunStatus.FAILED:
                value = f"failed: {row.get('error') or NA}"
            cells.append(shown(value, NUMERIC.get(key, 4)).replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Company score, stale rate and forgetting per month in one figure (gaps: no value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = [str(r["month"]) for r in rows]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 3), 4.2))
    metric = next((r["company_metric"] for r in rows if r.get("company_metric")), None)
    for key, label, style in (
        ("company", f"company score ({metric or 'primary metric'}, current truth)", "o-"),
        ("stale_rate", "company stale rate", "s--"),
        ("forgetting", "forgetting (world_probes drop from base)", "^:"),
    ):
        values = [r.get(key) if isinstance(r.get(key), int | float) else math.nan for r in rows]
        ax.plot(x, values, style, label=label)
    rejected = [i for i, r in enumerate(rows) if str(r.get("gate") or "").startswith("rejected")]
    scores = [rows[i].get("company") for i in rejected]
    if any(isinstance(v, int | float) for v in scores):
        ax.plot(
            rejected,
            [v if isinstance(v, int | float) else math.nan for v in scores],
            "rx",
            ms=10,
            label="rejected by the gate (champion kept)",
        )
    failed = [i for i, r in enumerate(rows) if r.get("status") == RunStatus.FAILED]
    for i in failed:
        ax.axvspan(
            i - 0.4, i + 0.4, color="red", alpha=0.12, lw=0, label="failed" if i == failed[0] else None
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xticks(x, months, rotation=30, ha="right")
    ax.set_ylabel("share")
    ax.set_title("A year of monthly retraining (demo world)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: Sequence[dict[str, Any]], out: Path, header: str) -> str:
    """table.md, table.csv (every column, n/a where unknown) and year.png; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, header)
    (out / "table.md").write_text(table)
    with (out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: NA if row.get(k) is None or row.get(k) == "" else row[k] for k in COLUMNS})
    plot(rows, out / "year.png")
    return table


def header_line(overrides: Iterable[str], total_s: float | None = None) -> str:
    settings = ", ".join(f"`{o}`" for o in overrides) or "none (the project's params.yaml)"
    took = f"; {total_s:.0f} s in all" if total_s is not None else ""
    return (
        f"A year of retraining on the demo world. Machine: {machine()}; "
        f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"settings overrides: {settings}{took}"
    )


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/year_simulation.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "year", help="table, CSV, plot, logs")
    parser.add_argument("--months", type=int, help="only the first N months")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    parser.add_argument("--keep-going", action="store_true", help="after a failed month, run the next ones")
    args = parser.parse_args(argv)
    if args.months is not None and args.months < 1:
        parser.error("--months must be at least 1")
    overrides = parse_overrides(args.set, parser)
    logging.basicConfig(
        level=os.environ.get("MILORA_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s"
    )
    os.environ.update(OFFLINE_ENV)  # this process and every child: nothing calls out
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="milora-year-"))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    failure: str | None = None
    try:
        try:
            project, watch = make_scratch(REPO, work, overrides)
        except SettingsError as error:
            logger.error("params.yaml of the copy%s: %s", " (after --set)" if overrides else "", error)
            return 2
        drops = snapshot(month_folders(REPO, watch, args.months), work / "drops")
        if not drops:
            logger.error("no drops found in %s or %s", REPO / watch, REPO / LATER_DROPS)
            return 1
        env = child_env(project)
        for i, drop in enumerate(drops, 1):
            logger.info(
                "month %d/%d: %s (flow output: %s)", i, len(drops), drop.name, logs / f"{drop.name}.log"
            )
            row = run_month(project, watch, drop, env, logs)
            rows.append(row)
            logger.info(
                "month %d/%d: %s %s in %.0f s (stages run: %s)",
                i,
                len(drops),
                drop.name,
                row["status"],
                row["flow_s"],
                row["stages_run"],
            )
            if row["status"] == RunStatus.FAILED:
                logger.error("month %s failed: %s", drop.name, row["error"])
                if not args.keep_going:
                    failure = f"month {drop.name} failed: {row['error']} (see {logs / (drop.name + '.log')})"
                    break
    finally:
        if rows:
            table = write_outputs(rows, out, header_line(args.set, time.perf_counter() - started))
            print(table, end="")
            logger.info("wrote %s, %s and %s", out / "table.md", out / "table.csv", out / "year.png")
        if args.keep:
            logger.info("scratch copy kept: %s", work / "project")
            print(f"scratch copy: {work / 'project'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if failure:
        logger.error("%s (--keep-going runs the remaining months anyway)", failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
