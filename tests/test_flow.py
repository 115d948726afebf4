"""The retraining flow end to end: real Prefect flow runs, real DVC stages, a real MLflow registry.

A sandbox project (git + DVC repository with this project's dvc.yaml and stage code, a tiny
base model and tiny company drops) is retrained several times: first run, no-op rerun,
"no new data" skip, and a bad drop that must leave the registry untouched. (The gate's
pass, fail and rollback run on a real registry in test_register.py; a full run on a worker
of a real Prefect server in test_deployment.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import company_conversations
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from test_ingest import write_jsonl
from test_stages import TINY_PROFILE

from flows.retrain import retrain
from milora.settings import load_settings
from tasks.register import tracking_uri

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", ".dvcignore", ".dvc/config", "tasks", "milora", "gx"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def drop(root: Path, name: str, start: int, n: int) -> None:
    conversations = company_conversations(start + n)[start:]
    write_jsonl(root / "company" / name / "train.jsonl", [{"messages": m} for m in conversations])


def make_project(root: Path, base_model: str, copied: list[str] = COPIED) -> Path:
    """A git + DVC project with this repository's pipeline code and tiny data and settings."""
    for name in copied:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    drop(root, "drop_01", 0, 24)
    heldout = [
        {"question": m[0]["content"], "answer": m[1]["content"]} for m in company_conversations(40)[34:]
    ]
    write_jsonl(root / "eval" / "heldout.jsonl", heldout)
    params = {
        "base_model": base_model,
        "ingest": {"sources": ["company/drop_*/train.jsonl"], "watch": "company", "validation_fraction": 0.2},
        "validate": {
            "max_tokens": 120,
            "min_rows": 3,
            "contamination": {"benchmarks": ["eval"], "cache_dir": None},
        },
        "train": {"rank": 4, "profile": "tiny", "profiles": {"tiny": TINY_PROFILE}},
        "evaluate": {
            "batch_size": 4,
            "cache_dir": None,
            "suites": {
                "company": {"kind": "qa", "path": "eval/heldout.jsonl", "metric": "f1", "max_new_tokens": 8},
                "recall": {
                    "kind": "qa",
                    "path": "eval/heldout.jsonl",
                    "prompt": "Q: {question} A:",
                    "metric": "starts_with",
                    "max_new_tokens": 4,
                    "retention": True,
                },
            },
        },
        "registry": {"gate": {"max_forgetting": 1.0, "tolerance": 1.0}},
    }
    # Every key written out, defaults included: dvc.yaml interpolates them (${train.run_dir}).
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    full = load_settings(root / "params.yaml").model_dump(by_alias=True, mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    (root / ".gitignore").write_text("/outputs/\n/data/\n/mlflow.db\n/mlartifacts/\n/.cache/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "project")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, chat_model_dir) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), chat_model_dir)


def registry(root: Path) -> tuple[MlflowClient, str]:
    settings = load_settings(root / "params.yaml")
    return MlflowClient(tracking_uri(settings)), settings.registry.model_name


def test_retrain_flow_end_to_end(project, harness):
    params = str(project / "params.yaml")
    started = time.perf_counter()
    first = retrain(params)
    first_seconds = time.perf_counter() - started
    assert first["status"] == "promoted", first
    assert all(first["stages"].values()), first["stages"]
    client, name = registry(project)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias(name, "champion").version == versions[0].version
    tags = versions[0].tags
    assert tags["data_version"] and tags["method"] == "milora" and tags["rank"] == "4"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert {"ingest", "validate", "init", "train", "evaluate"} <= set(lock["stages"])
    assert json.loads((project / "outputs" / "eval" / "metrics.json").read_text())["company"]["score"] >= 0

    # Unchanged data and params: nothing retrained, nothing registered, and said so.
    started = time.perf_counter()
    again = retrain(params)
    again_seconds = time.perf_counter() - started
    assert again["status"] == "nothing new" and not any(again["stages"].values())
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert again_seconds < first_seconds

    # A scheduled run with no new data since the champion stops before any stage.
    skipped = retrain(params, skip_if_no_new_data=True)
    assert skipped["status"] == "no new data"

    # A bad drop fails validation: the run fails with the rule, the registry stays as it was.
    write_jsonl(project / "company" / "drop_02" / "train.jsonl", [{"instruction": "Hi", "output": ""}] * 5)
    with pytest.raises(Exception, match="validate"):
        retrain(params)
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert client.get_model_version_by_alias(name, "champion").version == versions[0].version
    records = sorted((project / "outputs" / "runs").glob("*.json"))
    assert json.loads(records[-1].read_text())["status"] == "failed"
