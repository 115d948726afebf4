"""The retraining flow end to end: real Prefect flow runs, real DVC stages, a real MLflow registry.

A sandbox project (git + DVC repository with this project's dvc.yaml and stage code, a tiny
base model and tiny company drops) is retrained several times: first run, no-op rerun,
"no new data" skip, and a bad drop that must leave the registry untouched. Between them the
champion is rebuilt from its registry tags (pulled from the DVC remote, and recomputed by
``dvc repro`` on a clean clone), and a ``dvc exp run`` experiment is compared by ``dvc exp show``. (The gate's
pass, fail and rollback run on a real registry in test_register.py; a full run on a worker
of a real Prefect server in test_deployment.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import company_conversations
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from test_ingest import write_jsonl
from test_stages import TINY_PROFILE

from flows.retrain import main as retrain_main
from flows.retrain import retrain
from milora.settings import load_settings
from tasks.rebuild import main as rebuild_main
from tasks.rebuild import rebuild
from tasks.register import tracking_uri
from tasks.reproduce import stage_env

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "tasks", "milora", "gx"]


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


def latest_record(root: Path) -> dict:
    """The newest run record (by its time: names of one second sort by flow-run name)."""
    records = [json.loads(path.read_text()) for path in (root / "outputs" / "runs").glob("*.json")]
    return max(records, key=lambda record: record["time"])


def registry(root: Path) -> tuple[MlflowClient, str]:
    settings = load_settings(root / "params.yaml")
    return MlflowClient(tracking_uri(settings)), settings.registry.model_name


def test_retrain_flow_end_to_end(project, harness, capsys):
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

    # The command answers that case from DVC and the registry without starting a flow run.
    assert retrain_main(["--params", params]) == 0
    assert "nothing new" in capsys.readouterr().out
    record = latest_record(project)
    assert record["checked_without_flow"] and "flow_run" not in record
    assert record["registration"]["version"] == str(versions[0].version)

    # A scheduled run with no new data since the champion stops before any stage.
    skipped = retrain(params, skip_if_no_new_data=True)
    assert skipped["status"] == "no new data"
    assert Path(first["html"]).is_file() and Path(skipped["html"]).is_file()  # a page per run


def adapter_bytes(run_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*.safetensors"))
        if "checkpoint" not in path.parts[-2]
    }


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rebuild_registered_version_from_the_dvc_remote(project, tmp_path, capsys):
    """The champion back from its tags: its commit, and its dvc.lock pulled from the remote."""
    into = tmp_path / "rebuilt"
    assert rebuild_main(["champion", "--into", str(into), "--params", str(project / "params.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("matches the registry") == 3 and "DIFFERS" not in printed, printed
    original = adapter_bytes(project / "outputs" / "train")
    assert original and adapter_bytes(into / "outputs" / "train") == original
    # A folder already in use is refused, before anything is cloned into it.
    assert rebuild_main(["champion", "--into", str(into), "--params", str(project / "params.yaml")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_dvc_repro_on_a_clean_checkout_and_experiments(project, tmp_path):
    """`dvc repro` on a clean clone recomputes the registered adapter and metrics; `dvc exp run
    -S train.method=lora` is an experiment that `dvc exp show` puts beside the baseline."""
    settings = load_settings(project / "params.yaml")
    clone = tmp_path / "clone"
    result = rebuild(settings, "champion", clone, recompute=True)
    assert result["matches"] == {"data_version": True, "adapter_weights": True}, result
    metrics = json.loads((project / "outputs" / "eval" / "metrics.json").read_text())
    assert json.loads((clone / "outputs" / "eval" / "metrics.json").read_text()) == metrics
    assert "Data and pipelines are up to date" in dvc(clone, "repro")
    shown = json.loads(dvc(clone, "metrics", "show", "--json"))
    workspace = shown[""]["data"]["outputs/eval/metrics.json"]["data"]
    assert workspace["company"]["score"] == metrics["company"]["score"]

    git(clone, "add", "dvc.lock", "params.yaml")
    git(clone, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "milora baseline")
    ran = dvc(clone, "exp", "run", "-S", "train.method=lora", "--name", "lora-r4")
    assert "Stage 'ingest' didn't change" in ran and "Running stage 'train'" in ran
    table = json.loads(dvc(clone, "exp", "show", "--json"))
    rows = {}
    for commit in table:
        for exp in [commit, *[e for run in commit.get("experiments") or [] for e in run["revs"]]]:
            data = exp["data"]
            rows[exp.get("name") or data["rev"]] = (
                data["params"]["params.yaml"]["data"]["train"]["method"],
                data["metrics"]["outputs/eval/metrics.json"]["data"]["company"]["score"],
            )
    assert rows["lora-r4"][0] == "lora" and rows["workspace"][0] == "lora"
    baseline = [row for name, row in rows.items() if name not in ("lora-r4", "workspace")]
    assert baseline == [("milora", metrics["company"]["score"])], rows


def test_bad_drop_fails_and_leaves_the_registry_untouched(project, harness):
    params = str(project / "params.yaml")
    client, name = registry(project)
    champion = client.get_model_version_by_alias(name, "champion").version
    # A bad drop fails validation: the run fails with the rule, the registry stays as it was.
    write_jsonl(project / "company" / "drop_02" / "train.jsonl", [{"instruction": "Hi", "output": ""}] * 5)
    with pytest.raises(Exception, match="validate"):
        retrain(params)
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert client.get_model_version_by_alias(name, "champion").version == champion
    assert latest_record(project)["status"] == "failed"
    # Every run has its HTML page, the failed one too, listed in the index with its reason.
    reports = project / "outputs" / "reports"
    assert sorted(p.stem for p in (reports / "runs").glob("*.html")) == sorted(
        p.stem for p in (project / "outputs" / "runs").glob("*.json")
    )
    index = (reports / "index.html").read_text()
    assert index.count('class="status bad"') == 1 and "validate" in index
