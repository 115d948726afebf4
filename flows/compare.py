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

# First the offline environment, before Prefect and the model hub load (flows/__init__.py; a
# deployment loads this file as a script, outside the package, so it is imported by name).
import flows  # noqa: F401

# isort: split
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from milora.settings import DEFAULT_PARAMS, load_settings
from tasks import parse_overrides
from tasks.compare import dataset_task, plan, report_task, run_task


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
