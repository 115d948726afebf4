"""Stage "report" (HTML): a static page per retrain run and an index across runs.

``python -m tasks.html_report [--params params.yaml] [--record outputs/runs/X.json] [--rebuild]``

The retrain flow calls it after every run (failed ones too) with that run's record: the
page is drawn from the workspace the run just produced (loss, evaluation, init adapter) and
the MLflow registry (the champion it was compared with, every version's metrics), then the
index is refreshed. Without ``--record`` (``make report``) every run record in
``outputs/runs/`` gets a page if it has none (``--rebuild``: all of them again, drawing on
the MLflow run of registered versions) and the index is rebuilt; it prints the index path.
Pages go to ``outputs/reports/`` (``index.html``, ``runs/<record>.html``), self-contained.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.atomic import atomic_write_text
from milora.layout import LOSS_TABLE
from milora.promotion import by_suite
from milora.records import RunStatus
from milora.reporting import IndexRow, RunPage, Spectrum, VersionPoint, render_index, render_run
from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import parse_overrides, run_command, stage_task
from tasks.registry import CHAMPION, DECISION_TAG, ROLLED_BACK, TRAIN_PREFIX, Registry, is_registry_error
from tasks.report import RUNS_DIR

logger = logging.getLogger(__name__)

REPORTS_DIR = "outputs/reports"
SPECTRUM_WEIGHTS = 4  # target weights drawn in the spectrum plot


# --------------------------------------------------------------------------- registry
def version_history(registry: Registry) -> list[VersionPoint]:
    """Every registered version with its evaluation and the gate's decision."""
    champion = registry.alias(CHAMPION)
    points = []
    for version in registry.versions():
        suites = by_suite(registry.eval_metrics(version.run_id))
        points.append(
            VersionPoint(
                version=version.number,
                scores={suite: m["score"] for suite, m in suites.items() if "score" in m},
                forgetting={suite: m["forgetting"] for suite, m in suites.items() if "forgetting" in m},
                decision=version.tags.get(DECISION_TAG),
                champion=champion is not None and champion.number == version.number,
                rolled_back=bool(version.tags.get(ROLLED_BACK)),
                created=version.created,
                description=version.description,
                parent=version.tags.get("parent_version") or None,
                start=version.tags.get("start") or None,
                train_seconds=_number(version.tags.get("train_seconds")),
                stale_rate=next((m["stale_rate"] for m in suites.values() if "stale_rate" in m), None),
            )
        )
    return points


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _history(settings: Settings) -> tuple[Registry | None, list[VersionPoint], list[str]]:
    """The registry (if it exists), its version history and notes on what could not be read."""
    registry, missing = Registry.existing(settings)
    if registry is None:
        return None, [], [missing or "no registry"]
    try:
        return registry, version_history(registry), []
    except Exception as error:
        if not (isinstance(error, OSError) or is_registry_error(error)):
            raise
        logger.warning("registry history not read: %s", error)
        return None, [], [f"registry not read: {error}"]


# --------------------------------------------------------------------------- one run
def _loss_csv(path: Path) -> list[tuple[float, float]]:
    with path.open(newline="") as handle:
        return [(float(row["step"]), float(row["loss"])) for row in csv.DictReader(handle) if row.get("loss")]


def _loss(
    settings: Settings, record: dict[str, Any], registry: Registry | None, live: bool
) -> tuple[list[tuple[float, float]], str | None]:
    """The run's training loss: from its MLflow run when registered, else (just after the
    run) from ``loss.csv`` if this run trained."""
    run_id = (record.get("registration") or {}).get("run_id")
    if run_id and registry is not None:
        history = registry.metric_history(run_id, f"{TRAIN_PREFIX}loss")
        if history:
            return history, None
    table = settings.path(settings.train.run_dir) / LOSS_TABLE
    trained = record.get("status") in RunStatus.OWN_OUTPUTS or (record.get("stages") or {}).get("train")
    if live and trained and table.is_file():
        return _loss_csv(table), None
    if record.get("status") in RunStatus.WITHOUT_EVALUATION and not trained:
        return [], None
    return [], "training loss not available (no MLflow run and no loss.csv of this run)"


def _compared_with(record: dict[str, Any], history: list[VersionPoint]) -> VersionPoint | None:
    """The champion the run's model was gated against (or, without a gate, the champion now)."""
    decision = record.get("decision")
    if decision:
        wanted = decision.get("previous")
    else:
        current = next((p for p in history if p.champion), None)
        own = (record.get("registration") or {}).get("version")
        wanted = current.version if current and current.version != own else None
    return next((p for p in history if p.version == str(wanted)), None) if wanted else None


def weight_spectra_of(settings: Settings) -> tuple[list[Spectrum], str | None]:
    """Spectra of a few target weights of the base, marked from the init adapter when it was
    made with the configured method and rank."""
    from milora.adapter_io import read_manifest
    from milora.reporting.spectrum import weight_spectra

    base = settings.path(settings.base_model)
    if not (base / "config.json").is_file():
        return [], f"no spectrum: {base} is not a model folder"
    init_dir = settings.path(settings.train.init_dir)
    manifest = read_manifest(init_dir) if init_dir.is_dir() else None
    note = None
    if manifest is None or (manifest.get("method"), manifest.get("r")) != (
        settings.train.method,
        settings.train.rank,
    ):
        note = f"spectrum without adapted components: no init adapter for {settings.train.method} r={settings.train.rank} in {init_dir}"
        init_dir = None
    cache = settings.path(settings.train.cache_dir) / "spectra" if settings.train.cache_dir else None
    try:
        return weight_spectra(
            base, settings.train.target_modules, init_dir, count=SPECTRUM_WEIGHTS, cache_dir=cache
        ), note
    except (OSError, ValueError, KeyError) as error:
        logger.warning("spectrum not drawn: %s", error)
        return [], f"no spectrum: {error}"


def run_page(
    settings: Settings,
    record: dict[str, Any],
    registry: Registry | None,
    history: list[VersionPoint],
    spectra: tuple[list[Spectrum], str | None],
    *,
    live: bool,
) -> RunPage:
    """Gather one run's page: ``live`` right after the run (the workspace is this run's),
    else from the record and the registry only. ``spectra``: :func:`weight_spectra_of`."""
    page = RunPage(
        record=record,
        evaluation=list(record.get("metrics") or []),
        champion=_compared_with(record, history),
        max_forgetting=settings.registry.gate.max_forgetting,
        history=history,
    )
    page.loss, note = _loss(settings, record, registry, live)
    page.spectra, spectrum_note = spectra
    page.notes += [n for n in (note, spectrum_note) if n]
    if not live:
        page.notes.append("rebuilt later: the spectrum is of the current base model and init adapter")
    return page


# --------------------------------------------------------------------------- index
def _reason(record: dict[str, Any]) -> str:
    if record.get("error"):
        return str(record["error"]).strip()
    decision = record.get("decision") or {}
    failed = [r for r in decision.get("reasons") or [] if str(r).endswith("FAILED")]
    if failed:
        return "; ".join(failed)
    if record.get("status") == RunStatus.FORCED:
        return str(((record.get("decision") or {}).get("reasons") or [""])[0])
    if record.get("status") == RunStatus.ROLLED_BACK:
        rolled = record.get("rollback") or {}
        return f"champion v{rolled.get('previous', '?')} -> v{rolled.get('champion', '?')}"
    if record.get("status") == RunStatus.NO_NEW_DATA:
        return f"data unchanged since champion v{(record.get('champion') or {}).get('version', '?')}"
    return ""


def index_row(settings: Settings, path: Path, record: dict[str, Any], pages: Path) -> IndexRow:
    metrics = record.get("metrics") or []
    primary = settings.registry.gate.primary_suite
    page = pages / f"{path.stem}.html"
    return IndexRow(
        time=float(record.get("time") or path.stat().st_mtime),
        status=str(record.get("status", "unknown")),
        name=(record.get("flow_run") or {}).get("name") or path.stem,
        href=f"runs/{page.name}" if page.is_file() else None,
        version=(record.get("registration") or {}).get("version")
        or (record.get("champion") or {}).get("version"),
        decision=(record.get("decision") or {}).get("decision"),
        primary=next((m.get("adapter") for m in metrics if m.get("suite") == primary), None),
        forgetting=max((m["forgetting"] for m in metrics if m.get("forgetting") is not None), default=None),
        seconds=record.get("seconds"),
        reason=_reason(record),
    )


def _records(settings: Settings) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(settings.path(RUNS_DIR).glob("*.json")):
        try:
            found.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("%s: not a readable run record, left out of the index (%s)", path, error)
    return found


def _write(path: Path, text: str) -> Path:
    """Write atomically: a reader (or a second report) never sees half a page."""
    return atomic_write_text(path, text)


def html_report(settings: Settings, record: str | Path | None = None, rebuild: bool = False) -> Path:
    """Write one run's page (``record``, just after that run) or every missing page
    (``rebuild``: every page), then the index; returns the page or the index written."""
    out = settings.path(REPORTS_DIR)
    pages = out / "runs"
    registry, history, notes = _history(settings)
    drawn = functools.cache(lambda: weight_spectra_of(settings))  # one base for all pages: once

    def spectra(data: dict[str, Any]) -> tuple[list[Spectrum], str | None]:
        # A run that trained nothing adds no spectrum (and a no-op rerun stays quick); a failed
        # one only if it got as far as the init stage.
        status = data.get("status")
        if status in RunStatus.UNTRAINED or status == RunStatus.ROLLED_BACK:
            return [], f"no spectrum: nothing was trained in this run ({status})"
        if status == RunStatus.FAILED and not (data.get("stages") or {}).get("init"):
            return [], "no spectrum: the run failed before the init stage ran"
        return drawn()

    written = None
    if record is not None:
        path = Path(record)
        data = json.loads(path.read_text(encoding="utf-8"))
        written = _write(
            pages / f"{path.stem}.html",
            render_run(run_page(settings, data, registry, history, spectra(data), live=True)),
        )
    records = _records(settings)
    for path, data in records:
        page = pages / f"{path.stem}.html"
        if rebuild or not page.is_file():
            _write(page, render_run(run_page(settings, data, registry, history, spectra(data), live=False)))
    rows = [index_row(settings, path, data, pages) for path, data in records]
    index = _write(
        out / "index.html", render_index(rows, history, notes, settings.registry.gate.primary_suite)
    )
    logger.info("HTML report: %s (%d runs)", index, len(rows))
    return written or index


def _publish(settings: Settings, record: str | Path | None = None, rebuild: bool = False) -> Path:
    """:func:`html_report` and, inside a flow run, a link artifact to the page."""
    path = html_report(settings, record, rebuild)
    from prefect.artifacts import create_link_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None:
        create_link_artifact(path.resolve().as_uri(), link_text="HTML report", key="retrain-report")
    return path


html_report_task = stage_task(_publish, "html-report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.html_report", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--record", type=Path, help="one run record: its page, drawn from the workspace")
    parser.add_argument(
        "--rebuild", action="store_true", help="rewrite every run page, not just missing ones"
    )
    args = parser.parse_args(argv)
    settings = load_settings(args.params, parse_overrides(args.set, parser))
    print(html_report(settings, args.record, args.rebuild))
    return 0


if __name__ == "__main__":
    run_command(main)
