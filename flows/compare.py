"""The method comparison flow: the same data, the same budget, three ways to start.

    dataset -> (method x seed) train + score along training -> table + plots -> artifact

One Prefect task per run (``compare-run``), each training one adapter and scoring its
snapshots; then one task writes the table and plots, and the flow publishes the table as a
markdown artifact. Runs execute one after another (each uses every core); a finished run
is reused by a rerun with the same inputs, so an interrupted comparison continues.

Run it: ``python -m flows.compare [--params params.yaml] [--set compare.steps=60 ...]``
or ``make compare``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

# Before Prefect loads: nothing calls out, and the stages' own loggers reach the run's logs.
from milora.offline import OFFLINE_ENV

for _key, _value in {**OFFLINE_ENV, "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,milora"}.items():
    os.environ.setdefault(_key, _value)

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from milora.settings import DEFAULT_PARAMS, load_settings  # noqa: E402
from tasks import parse_overrides  # noqa: E402
from tasks.compare import dataset_task, plan, report_task, run_task  # noqa: E402


@flow(name="compare-methods", log_prints=True)
def compare_methods(params: str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and score every (method, seed) run of ``params``'s ``compare`` section, then
    write and publish the comparison table."""
    log = get_run_logger()
    settings = load_settings(params, overrides)
    folder = dataset_task(settings)
    runs = plan(settings)
    log.info("comparison: %d runs (%s)", len(runs), ", ".join(settings.compare.methods))
    records = [
        run_task.with_options(name=f"compare-run {r['method']} s{r['seed']} lr{r['learning_rate']:g}")(
            settings, **r, dataset_dir=folder
        )
        for r in runs
    ]
    result = report_task(settings, records)
    create_markdown_artifact(
        key="method-comparison",
        markdown=result["markdown"] + "\n" + "\n".join(f"- `{path}`" for path in result["plots"]),
        description="lora / pissa / milora: learning and forgetting, mean ± std over seeds",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MILORA_LOG_LEVEL", "INFO"))
    result = compare_methods(args.params, parse_overrides(args.set, parser) or None)
    print(result["markdown"], end="")
    print("plots: " + ", ".join(result["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
