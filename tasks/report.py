"""Stage "report": what a flow run did, as Prefect artifacts and a JSON record per run.

The markdown artifact tells the run's story in the Prefect UI (status, data version, which
stages ran or were skipped, the evaluation against the champion, the gate's decision and
reasons); the table artifact holds the metrics. The same facts go to
``outputs/runs/<time>.json`` so the HTML reports (and people without the UI) can read the
history of runs, failed ones included.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from milora.records import LINEAGE_KEYS, RunStatus
from milora.redact import redact
from milora.settings import Settings

logger = logging.getLogger(__name__)

RUNS_DIR = "outputs/runs"


def _metric_rows(settings: Settings) -> list[dict[str, Any]]:
    path = settings.path(settings.evaluation.out_dir) / "comparison.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["rows"]
    return [
        {
            "suite": r["suite"],
            "metric": r["metric"],
            "n": r["n"],
            "base": r["base"],
            "adapter": r["adapter"],
            "forgetting": r["forgetting"],
        }
        for r in rows
    ]


SUPERSEDED_IN_RECORD = 20  # facts a later drop changed, listed in the record (all are counted)


def _data_summary(settings: Settings) -> dict[str, Any] | None:
    """What the validation gate published (its summary.json): rows, quarantine, and the facts
    a later drop answered anew."""
    path = settings.path(settings.validation.reports_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {
        "rows_published": summary.get("rows_published"),
        "quarantined": summary.get("quarantined"),
        "superseded_count": summary.get("superseded_count", 0),
        "superseded_policy": summary.get("superseded_policy"),
        "superseded": (summary.get("superseded") or [])[:SUPERSEDED_IN_RECORD],
    }


def _markdown(record: dict[str, Any]) -> str:
    lines = [f"# Retrain: {record['status']}", ""]
    lineage = record.get("lineage") or {}
    for key in LINEAGE_KEYS:
        if lineage.get(key):
            lines.append(f"- **{key}**: `{lineage[key]}`")
    if record.get("stages"):
        ran = ", ".join(f"{k} ({'ran' if v else 'unchanged'})" for k, v in record["stages"].items())
        lines.append(f"- **stages**: {ran}")
    data = record.get("data") or {}
    if data:
        lines.append(
            f"- **data**: {data.get('rows_published')} rows published, {data.get('quarantined')} quarantined, "
            f"{data.get('superseded_count')} facts answered anew by a later drop ({data.get('superseded_policy')})"
        )
    registration = record.get("registration") or {}
    if registration:
        lines.append(
            f"- **model version**: {registration.get('version')} ({'new' if registration.get('new') else 'already registered'})"
        )
    decision = record.get("decision") or {}
    if decision:
        lines += ["", f"## Gate: {decision.get('decision')}", ""]
        reasons = decision.get("reasons") or []
        lines += [f"- {reason}" for reason in (reasons if isinstance(reasons, list) else [reasons])]
    if record.get("error"):
        lines += ["", "## Error", "", "```", record["error"], "```"]
    if data.get("superseded"):
        lines += [
            "",
            "## Facts a later drop changed",
            "",
            "| question | old answer (drop) | new answer (drop) |",
        ]
        lines.append("|---|---|---|")
        for fact in data["superseded"]:
            lines.append(
                f"| {fact['key']} | {fact['old_answer']} ({fact['old_drop']}) | {fact['new_answer']} ({fact['new_drop']}) |"
            )
    if record.get("metrics"):
        lines += [
            "",
            "## Evaluation (adapter vs base)",
            "",
            "| suite | metric | n | base | adapter | forgetting |",
        ]
        lines.append("|---|---|---:|---:|---:|---:|")
        for m in record["metrics"]:
            show = [("" if m[k] is None else f"{m[k]:.4f}") for k in ("base", "adapter", "forgetting")]
            lines.append(f"| {m['suite']} | {m['metric']} | {m['n']} | " + " | ".join(show) + " |")
    lines += ["", f"_{record['seconds']:.1f} s_"]
    return "\n".join(lines)


def report(settings: Settings, status: str, seconds: float, **facts: Any) -> dict[str, Any]:
    """Publish the run's artifacts and record; returns the record with a one-line summary."""
    record: dict[str, Any] = {"status": status, "seconds": seconds, "time": time.time(), **facts}
    if record.get("error"):
        record["error"] = redact(str(record["error"]))  # the record, its page and the artifact
    if status not in RunStatus.WITHOUT_EVALUATION:
        record["metrics"] = _metric_rows(settings)
    data = _data_summary(settings)
    if data is not None and "data" not in record:
        record["data"] = data
    context = FlowRunContext.get()
    if context is not None:
        record["flow_run"] = {"id": str(context.flow_run.id), "name": context.flow_run.name}
    markdown = _markdown(record)
    if context is not None:
        create_markdown_artifact(markdown, key="retrain-summary", description=f"retrain: {status}")
        if record.get("metrics"):
            create_table_artifact(record["metrics"], key="retrain-metrics", description="adapter vs base")
    out = settings.path(RUNS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(record["time"]))
    path = Path(out) / f"{stamp}-{record.get('flow_run', {}).get('name', 'local')}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    version = (record.get("registration") or {}).get("version")
    record["summary"] = (
        f"retrain: {status}" + (f" (model version {version})" if version else "") + f" in {seconds:.1f} s"
    )
    record["record"] = str(path)
    logger.info("%s", record["summary"])
    return record


report_task = task(name="report", cache_policy=NO_CACHE)(report)
