"""The retraining flow: new company data in, a validated, trained, evaluated and gated model out.

    ingest -> validate -> prepare -> parent -> SVD init -> train -> evaluate -> champion -> (push) -> register -> promote -> report

Data and model steps are the DVC stages of ``dvc.yaml`` (one copy of each stage's code; DVC
skips what did not change and versions every output, pushed to the DVC remote before
anything is registered); the registry steps talk to MLflow.
With unchanged data and parameters every stage is skipped, nothing new is registered and
the run says so. A scheduled run (``skip_if_no_new_data``) first compares the company files
with the ones the champion was trained on and stops early with "no new data".

Run it: ``python -m flows.retrain`` (Prefect without a server: a temporary local API), or
as the ``retrain`` deployment of ``prefect.yaml`` on a work pool. The command first asks DVC
and the registry whether anything changed; when nothing did it says so and records the
run without starting Prefect's temporary server, whose start-up alone would be most of a
no-op run (``--always-run-flow`` runs the flow anyway).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

# First the offline environment, before Prefect and the model hub load (flows/__init__.py; a
# deployment loads this file as a script, outside the package, so it is imported by name).
import flows  # noqa: F401

# isort: split
from prefect import flow, get_run_logger
from prefect.states import Failed, State

from milora.layout import FROM_VERSION
from milora.preflight import base_model_problems
from milora.records import Decision, RunStatus
from milora.redact import install_log_redaction, redact
from milora.settings import DEFAULT_PARAMS, Settings, SettingsError, load_settings
from tasks.champion import compare_champion_task
from tasks.cluster import gpu_slots
from tasks.html_report import REPORTS_DIR, html_report, html_report_task
from tasks.ingest import unwatched_sources
from tasks.lineage import lineage_task, raw_data_hash, require_committed, unchanged_version
from tasks.parent import START_ENV
from tasks.register import (
    LostChampionError,
    champion_lineage,
    champion_problem,
    lost_champion,
    promote_task,
    register_task,
)
from tasks.registry import Registry, RegistryError, check_registry
from tasks.report import report, report_task
from tasks.reproduce import push_task, reproduce_task


def _report(settings: Settings, status: str, **facts: Any) -> dict[str, Any]:
    """Record the run (artifacts, JSON), then draw its HTML page and refresh the index. A
    page that cannot be drawn is logged, never allowed to change the run's outcome."""
    record = report_task(settings, status=status, **facts)
    try:
        record["html"] = str(html_report_task(settings, record["record"]))
    except Exception:
        get_run_logger().exception("HTML report of %s not written", record["record"])
    return record


@flow(name="retrain", log_prints=True)
def retrain(
    params: str = DEFAULT_PARAMS,
    skip_if_no_new_data: bool = False,
    force: bool = False,
    allow_uncommitted: bool = False,
    new_registry: bool = False,
    start: Literal["base", "champion"] | None = None,
) -> dict[str, Any] | State:
    """Take the company data named in ``params`` to a registered, gated model (a failure is
    recorded and ends the run Failed with its message). ``start``: where training starts,
    instead of ``train.start`` (a deployment's choice: a monthly run from the champion, a
    quarterly one from the stock base); the parent stage records it."""
    log = get_run_logger()
    started = time.perf_counter()
    settings = load_settings(params)
    root = settings.root

    stages: dict[str, bool] = {}
    try:
        check_registry(settings)  # a wrong URI or login fails here, in seconds, with a record
        lost = None if new_registry else lost_champion(settings, Registry(settings))
        if lost:
            raise LostChampionError(lost)
        broken = champion_problem(settings)
        if broken:
            raise RegistryError(broken)
        if skip_if_no_new_data and not force:
            champion = champion_lineage(settings)
            current = raw_data_hash(settings)
            if champion and champion.get("raw_data_hash") == current:
                log.info(
                    "no new data since champion v%s (raw data %s)", champion.get("version"), current[:12]
                )
                return _report(
                    settings,
                    status=RunStatus.NO_NEW_DATA,
                    champion=champion,
                    seconds=time.perf_counter() - started,
                )
        preflight(settings)
        require_committed(settings, allow_uncommitted)
        for stage in ("ingest", "validate"):
            stages[stage] = reproduce_task(stage, root, force=force).ran
        data = lineage_task.with_options(name="prepare")(settings)
        log.info("dataset version %s from raw data %s", data["data_version"][:12], data["raw_data_hash"][:12])
        # The parent (train.start: champion) is the registry's champion, which DVC cannot see
        # change: its stage always runs then, and train reruns only if the champion changed.
        chosen = {START_ENV: start} if start else None
        refetch = force or start is not None or settings.train.start == FROM_VERSION
        stages["parent"] = reproduce_task("parent", root, force=refetch, env=chosen).ran
        with gpu_slots():  # the GPU stages hold a slot per GPU of the limit tasks.cluster names
            for stage in ("init", "train", "evaluate"):
                stages[stage] = reproduce_task(stage, root, force=force).ran
            compare_champion_task(settings)  # the champion on the same items, for a paired gate
        push_task(root)  # before registering: a version's data and adapter are on the remote
        model = lineage_task(settings)
        registration = register_task(settings, model)
        decision = (
            promote_task(settings, registration["version"], new_registry=new_registry)
            if registration["new"] or registration.get("unfinished")
            else None
        )
    except Exception as error:
        # The failed run is recorded with its reason (registry and champion untouched: the
        # registry steps come last and register only after everything is logged), and ends
        # Failed with that one message (the stage's own words, not a traceback of the flow).
        _report(
            settings,
            status=RunStatus.FAILED,
            error=redact(str(error)),
            stages=stages,
            seconds=time.perf_counter() - started,
        )
        return Failed(message=redact(str(error)))
    if decision is not None:
        status = RunStatus.PROMOTED if decision["decision"] == Decision.PROMOTED else RunStatus.REJECTED
    else:
        status = RunStatus.NOTHING_NEW
        log.info(
            "unchanged data, parameters and code: nothing retrained, version %s already registered",
            registration["version"],
        )
    return _report(
        settings,
        status=status,
        stages=stages,
        registration=registration,
        decision=decision,
        lineage=model,
        seconds=time.perf_counter() - started,
    )


def preflight(settings: Settings) -> None:
    """Settings a run cannot succeed with, found before any stage runs (seconds, not minutes)."""
    problems = base_model_problems(settings.path(settings.base_model), settings.train.target_modules)
    problems += unwatched_sources(settings)
    if problems:
        raise SettingsError("params.yaml: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument(
        "--skip-if-no-new-data", action="store_true", help="stop early when the data is the champion's"
    )
    parser.add_argument("--force", action="store_true", help="rerun every stage even if unchanged")
    parser.add_argument(
        "--start",
        choices=("base", "champion"),
        help="where training starts, instead of train.start: the stock base or the registry's champion",
    )
    parser.add_argument(
        "--allow-uncommitted",
        action="store_true",
        help="train on code, params or company files git has not committed (a local try: the version "
        "is tagged `uncommitted`; without it such a run is refused)",
    )
    parser.add_argument(
        "--new-registry",
        action="store_true",
        help="the MLflow store is new on purpose: without it, a store that lost the champion this "
        "project's run records show it had (emptied, replaced) stops the run",
    )
    parser.add_argument(
        "--always-run-flow",
        action="store_true",
        help="start the Prefect flow even when nothing changed (by default that case is answered "
        "from DVC and the registry, without the seconds Prefect's temporary server takes to start)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MILORA_LOG_LEVEL", "INFO"))
    install_log_redaction()
    if not (args.force or args.always_run_flow or args.skip_if_no_new_data or args.start):
        started = time.perf_counter()
        settings = load_settings(args.params)
        try:
            version = unchanged_version(settings)
        except Exception as error:  # the flow checks the registry again, and records why it failed
            log_error = redact(str(error)).splitlines()[0] if str(error) else type(error).__name__
            logging.getLogger(__name__).warning("could not check for an unchanged version: %s", log_error)
            version = None
        if version is not None:
            record = report(
                settings,
                status=RunStatus.NOTHING_NEW,
                registration={"version": version, "new": False},
                checked_without_flow=True,
                seconds=time.perf_counter() - started,
            )
            print(
                "unchanged data, parameters and code (every DVC stage as in dvc.lock): nothing "
                f"retrained, version {version} already registered\n{record['summary']}"
            )
            print(f"report: {html_report(settings, record['record'])}")
            return 0
    settings = load_settings(args.params)
    try:
        result = retrain(
            str(Path(args.params)),
            args.skip_if_no_new_data,
            args.force,
            args.allow_uncommitted,
            args.new_registry,
            args.start,
        )
    except Exception as error:  # recorded, with its page, by the flow
        print(f"retrain failed: {redact(str(error))}", file=sys.stderr)
        print(f"report: {settings.path(REPORTS_DIR) / 'index.html'}", file=sys.stderr)
        return 1
    table = settings.path(settings.evaluation.out_dir) / "summary.md"
    if result["status"] != RunStatus.NO_NEW_DATA and table.is_file():
        print(f"\nevaluation of the current adapter against the base ({table}):\n{table.read_text()}")
        paired = settings.path(settings.registry.champion_dir) / "summary.md"
        if paired.is_file() and paired.stat().st_mtime >= table.stat().st_mtime:
            print(f"against the champion, on the same items ({paired}):\n{paired.read_text()}")
    if result.get("decision"):
        print("gate: " + "; ".join(result["decision"].get("reasons") or []))
    print(result["summary"])
    if result.get("html"):
        print(f"report: {result['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
