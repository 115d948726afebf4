"""The monthly retrain-and-promote loop, month after month, on the demo world: real Prefect
flow runs over real DVC stages, a real MLflow store, the demo base model and company drops.

Month 1 is promoted; an unchanged rerun registers nothing; a bad drop and a drop file no
source reads fail and leave the published dataset as it was; month 2 (a new drop) is gated
against the champion re-scored on the very same held-out items and promoted; a worse
challenger is rejected on the same items, with n and the interval in the decision; nothing
is ever registered twice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import COPIED, REPO, git, write_jsonl
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.retrain import retrain
from milora.settings import load_settings
from tasks.register import show
from tasks.registry import tracking_uri

pytestmark = pytest.mark.slow
DEMO = REPO / "data" / "demo"
MONTHS = ("drop_2026_10", "drop_2026_11")
PROFILE = {
    "learning_rate": 3e-3,
    "max_steps": 300,
    "batch_size": 16,
    "micro_batch_size": 16,
    "warmup_steps": 10,
    "max_length": 256,
    "save_steps": 50,
    "logging_steps": 10,
    "seed": 42,
}


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def commit(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", message)


def add_month(root: Path, month: str) -> None:
    folder = root / "company" / month
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO / "company" / month / "train_alpaca.jsonl", folder / "train.jsonl")
    shutil.copy(DEMO / "company" / month / "heldout.jsonl", folder / "heldout.jsonl")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("monthly")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    add_month(root, MONTHS[0])
    demo = yaml.safe_load((REPO / "params.yaml").read_text())
    params = {
        "base_model": str(DEMO / "base_model"),
        "ingest": {"sources": ["company/drop_*/train.jsonl"], "watch": "company"},
        "validate": {
            "pii_allow": demo["validate"]["pii_allow"],
            "contamination": {"benchmarks": ["company/drop_*/heldout.jsonl"], "cache_dir": None},
        },
        "train": {"rank": 16, "cache_dir": ".cache/svd", "profile": "loop", "profiles": {"loop": PROFILE}},
        "evaluate": {
            "cache_dir": ".cache/eval",
            "suites": {
                "company": {
                    "kind": "qa",
                    "path": "company/drop_*/heldout.jsonl",
                    "metric": "contains",
                    "max_new_tokens": 32,
                }
            },
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    full = load_settings(root / "params.yaml").model_dump(by_alias=True, mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    (root / ".gitignore").write_text("/outputs/\n/data/\n/mlflow.db\n/mlartifacts/\n/.cache/\n")
    git(root, "init", "-q")
    commit(root, "month 1")
    return root


def dataset_digest(root: Path) -> str:
    folder = root / "data" / "dataset"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_the_loop_month_after_month(project, harness, capsys):
    params = str(project / "params.yaml")
    settings = load_settings(params)
    client, name = MlflowClient(tracking_uri(settings)), settings.registry.model_name

    def versions() -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))

    def champion() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    # Month 1: the first model is the champion.
    first = retrain(params)
    assert first["status"] == "promoted" and versions() == ["1"] and champion() == "1"
    published = dataset_digest(project)

    # An unchanged rerun: nothing retrained, nothing registered.
    assert retrain(params)["status"] == "nothing new" and versions() == ["1"]

    # A bad drop fails validation; a file no source reads fails ingest. Neither touches the
    # published dataset or the registry.
    write_jsonl(project / "company" / "drop_bad" / "train.jsonl", [{"instruction": "Hi", "output": ""}] * 25)
    commit(project, "a bad drop")
    with pytest.raises(Exception, match=r"stage 'validate' failed \(exit 1\): data failed validation"):
        retrain(params)
    shutil.rmtree(project / "company" / "drop_bad")
    (project / "company" / MONTHS[0] / "late_export.csv").write_text("instruction,output\nHi,Hello\n")
    commit(project, "an export in another format")
    with pytest.raises(Exception, match=r"unmatched_file"):
        retrain(params)
    (project / "company" / MONTHS[0] / "late_export.csv").unlink()
    assert dataset_digest(project) == published and versions() == ["1"] and champion() == "1"

    # Month 2: a new drop. The challenger is scored with the champion on the same 80 held-out
    # items (54 of month 1, 26 of month 2) and promoted only if better beyond noise.
    add_month(project, MONTHS[1])
    commit(project, "month 2")
    second = retrain(params)
    reasons = second["decision"]["reasons"]
    assert second["status"] == "promoted", reasons
    (paired,) = [r for r in reasons if r.startswith("company vs champion v1 on the same items")]
    assert "n=80 paired items" in paired and "95% CI" in paired and paired.endswith(": ok")
    print(f"month 2: {paired}")
    assert versions() == ["1", "2"] and champion() == "2"
    assert dataset_digest(project) != published  # the new month is in the dataset now

    # A worse challenger (a learning rate that learns nothing) is rejected on the same items.
    full = yaml.safe_load((project / "params.yaml").read_text())
    full["train"]["profiles"]["loop"].update(learning_rate=1e-6, max_steps=20)
    (project / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    commit(project, "a worse setting")
    third = retrain(params)
    assert third["status"] == "rejected by the gate", third["decision"]
    (paired,) = [r for r in third["decision"]["reasons"] if r.startswith("company vs champion v2")]
    assert "n=80 paired items" in paired and paired.endswith("FAILED")
    print(f"worse: {paired}")
    assert versions() == ["1", "2", "3"] and champion() == "2"

    # Nothing is registered twice, and show prints n and the interval.
    assert retrain(params)["status"] == "nothing new" and versions() == ["1", "2", "3"]
    described = show(settings)
    assert "company: score" in described and "n 80" in described and "vs champion v2" in described
    record = json.loads(sorted((project / "outputs" / "runs").glob("*.json"))[-1].read_text())
    assert record["status"] == "nothing new"
