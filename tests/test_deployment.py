"""The ``retrain`` deployment of prefect.yaml on real servers: a Prefect server and an MLflow
server on 127.0.0.1, started here and stopped by PID, a process work pool and a worker that
executes the scheduled flow in a sandbox project."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import BIN, COPIED, drop, free_port, git, make_project, stop, wait_healthy
from mlflow import MlflowClient

from milora.offline import OFFLINE_ENV

MODEL = "milora-company-assistant"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    home = tmp_path_factory.mktemp("servers")
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(home / "prefect")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect_port, mlflow_port = free_port(), free_port()
    logs = [open(home / name, "w") for name in ("prefect.log", "mlflow.log")]  # noqa: SIM115
    prefect = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    mlflow = subprocess.Popen(
        [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1",
         "--port", str(mlflow_port), "--workers", "1"],
        env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", prefect)
        wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", mlflow)
        yield {
            **env,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    finally:
        stop(prefect)
        stop(mlflow)
        for log in logs:
            log.close()


def test_scheduled_deployment_runs_on_a_worker(servers, tmp_path, chat_model_dir, monkeypatch):
    project = make_project(tmp_path / "project", chat_model_dir, [*COPIED, "flows", "prefect.yaml"])
    env = {**servers, "MILORA_PROJECT_DIR": str(project), "COLUMNS": "250"}  # untruncated tables

    def cli(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("work-pool", "create", "milora-local", "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    inspected = cli("deployment", "inspect", "retrain/retrain")
    assert "0 3 * * *" in inspected and "CANCEL_NEW" in inspected.upper()
    cli("deployment", "run", "retrain/retrain", "--param", "skip_if_no_new_data=false")
    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "milora-local", "--run-once"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    runs = cli("flow-run", "ls", "--flow-name", "retrain")
    assert "COMPLETED" in runs, runs
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["method"] == "milora"
    # The champion loads from the server's artifact store as a pyfunc model and answers.
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    prompts = ["Who approves travel?"]
    answers = served.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 4})
    # The answer of the trained adapter on the stock base, as PEFT gives it from the run folder.
    from peft import PeftModel

    from milora.evaluation.generation import greedy_generate
    from milora.layout import SERVED_ADAPTER
    from milora.modeling import load_base_model, load_tokenizer
    from milora.training.examples import prompt_text

    tokenizer = load_tokenizer(chat_model_dir)
    tuned = PeftModel.from_pretrained(
        load_base_model(chat_model_dir), project / "outputs" / "train" / SERVED_ADAPTER
    )
    chats = [prompt_text(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    expected = greedy_generate(tuned, tokenizer, chats, max_new_tokens=4, first_line=False)
    assert list(answers) == expected and expected[0].strip(), (answers, expected)
    record = json.loads(sorted((project / "outputs" / "runs").glob("*.json"))[-1].read_text())
    assert record["status"] == "promoted" and record["flow_run"]["name"]

    # Next month's drop, run by the same deployment from the champion (its `start` parameter;
    # params.yaml says base): version 2 builds on version 1, and the registry says so.
    assert "'start': 'base'" in cli("deployment", "inspect", "retrain/retrain-full")
    drop(project, "drop_02", 24, 10)
    git(project, "add", "-A")
    git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "drop 2")
    cli(
        "deployment",
        "run",
        "retrain/retrain",
        "--param",
        "skip_if_no_new_data=false",
        "--param",
        "start=champion",
    )
    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "milora-local", "--run-once"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    second = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert second.version == "2", second
    assert (second.tags["start"], second.tags["parent_version"]) == ("refold", "1"), second.tags
    assert int(second.tags["rows_new"]) > 0 and second.tags["start_weights_rank"] == "8"
