"""First run and no-op rerun of the retraining flow on the demo world, from a fresh clone.

Clones this repository (its committed state) into a temporary folder, runs the flow there
with this interpreter (Prefect without a server, MLflow on a local SQLite store, DVC with a
local cache), and reports the wall times and their ratios. The second run finds the data and
parameters unchanged and answers from DVC and the registry without starting Prefect; a third
(``--always-run-flow``) takes the same no-op path through a Prefect flow run, every DVC stage
skipped and nothing registered.
Targets: first run <= 10 min on a 2-core CPU; rerun <= 10% of it.

    python benchmarks/pipeline_rerun.py [--keep]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from milora.offline import OFFLINE_ENV  # noqa: E402


def run_flow(project: Path, env: dict[str, str], *options: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.retrain", *options],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"the flow failed (exit {done.returncode})")
    summary = [line for line in done.stdout.splitlines() if line.startswith("retrain:")]
    return seconds, summary[-1] if summary else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="milora-pipeline-"))
    project = work / "project"
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MILORA_LOG_LEVEL": "WARNING",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    try:
        first, first_summary = run_flow(project, env)
        print(f"first run: {first:.1f} s ({first_summary})")
        second, second_summary = run_flow(project, env)
        print(f"rerun:     {second:.1f} s ({second_summary})")
        third, third_summary = run_flow(project, env, "--always-run-flow")
        print(f"rerun as a flow run: {third:.1f} s ({third_summary})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "first_run_s": round(first, 1),
        "rerun_s": round(second, 1),
        "rerun_share": round(second / first, 3),
        "first_status": first_summary,
        "rerun_status": second_summary,
        "flow_rerun_s": round(third, 1),
        "flow_rerun_share": round(third / first, 3),
        "flow_rerun_status": third_summary,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
