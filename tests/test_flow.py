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

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import COLOURS, REPO, colour_image, drop, free_port, git, make_project, write_jsonl
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.retrain import main as retrain_main
from flows.retrain import retrain
from milora.settings import load_settings
from tasks.lineage import raw_data_hash, raw_files
from tasks.rebuild import main as rebuild_main
from tasks.rebuild import rebuild
from tasks.registry import tracking_uri
from tasks.reproduce import STAGES, StageFailedError, reproduce, stage_env


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


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
    # What was registered is what the evaluate stage scored: the company score is the mean
    # f1 of its 6 held-out answers, logged as the version's run metric.
    evaluated = json.loads((project / "outputs" / "eval" / "company.json").read_text())
    assert evaluated["n"] == 6 and evaluated["metric"] == "f1"
    mean_f1 = sum(row["f1"] for row in evaluated["predictions"]) / 6
    metrics = json.loads((project / "outputs" / "eval" / "metrics.json").read_text())
    assert metrics["company"]["score"] == pytest.approx(mean_f1) == pytest.approx(evaluated["score"])
    assert client.get_run(versions[0].run_id).data.metrics["company.score"] == pytest.approx(mean_f1)

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
    workspace = (clone / "params.yaml").read_bytes()
    ran = dvc(clone, "exp", "run", "--temp", "-S", "train.method=lora", "--name", "lora-r4")
    assert "Running stage 'train'" in ran, ran
    assert (clone / "params.yaml").read_bytes() == workspace  # --temp: the workspace is untouched
    table = json.loads(dvc(clone, "exp", "show", "--json"))
    rows = {}
    for commit in table:
        for exp in [commit, *[e for run in commit.get("experiments") or [] for e in run["revs"]]]:
            data = exp["data"]
            rows[exp.get("name") or data["rev"]] = (
                data["params"]["params.yaml"]["data"]["train"]["method"],
                data["metrics"]["outputs/eval/metrics.json"]["data"]["company"]["score"],
            )
    assert rows["lora-r4"][0] == "lora" and rows["workspace"][0] == "milora"
    baseline = [row for name, row in rows.items() if name not in ("lora-r4", "workspace")]
    assert baseline == [("milora", metrics["company"]["score"])], rows

    # `make experiments`: the same table, readable (the settings that differ, the numbers that matter).
    dry = subprocess.run(
        ["make", "-n", "-s", "-C", str(REPO), "experiments", f"BIN={Path(sys.executable).parent}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shown = subprocess.run(
        f"{dry} --csv", shell=True, cwd=clone, capture_output=True, text=True, env=stage_env()
    )
    assert shown.returncode == 0, shown.stderr
    columns = shown.stdout.splitlines()[0].split(",")
    assert "train.method" in columns and "company.score" in columns and "recall.forgetting" in columns
    assert len(columns) <= 14 and not any(
        c.startswith(("validate.", "ingest.", "compare.")) for c in columns
    ), columns


def published(root: Path, folders: list[str]) -> dict[str, str]:
    """sha256 of every file of the published outputs ``folders``."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def test_a_failed_stage_leaves_every_published_output_as_it_was(project):
    """A real failure in each stage, run through DVC as the flow runs it: the failing stage's
    output and everything after it stay byte for byte, and dvc.lock still describes them."""
    settings = load_settings(project / "params.yaml")
    outputs = {
        "ingest": settings.ingest.out_dir,
        "validate": settings.validation.dataset_dir,
        "parent": settings.train.parent_dir,
        "init": settings.train.init_dir,
        "train": settings.train.run_dir,
        "evaluate": settings.evaluation.out_dir,
    }
    original_params = (project / "params.yaml").read_text()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    client, name = registry(project)
    versions = len(client.search_model_versions(f"name='{name}'"))

    def with_params(**changes: object) -> None:
        params = yaml.safe_load(original_params)
        for dotted, value in changes.items():
            node = params
            *parents, last = dotted.split(".")
            for key in parents:
                node = node[key]
            node[last] = value
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bad_drop = project / "company" / "drop_09" / "train.jsonl"
    cases = {  # how to break the stage, and the one message it must fail with (exit 1)
        "ingest": (lambda: (bad_drop.parent.mkdir(), bad_drop.write_text("")), "[empty_file]"),
        "validate": (
            lambda: write_jsonl(bad_drop, [{"instruction": "Hi", "output": ""}] * 5),
            "[empty_text]",
        ),
        "init": (
            lambda: with_params(**{"train.target_modules": ["nope_proj"]}),
            "target modules ['nope_proj'] not found among the model's linear layers",
        ),
        "train": (lambda: with_params(**{"train.profiles.tiny.learning_rate": 1e12}), "loss became"),
        "evaluate": (
            lambda: with_params(**{"evaluate.suites.company.path": "eval/missing.jsonl"}),
            "evaluate.suites.company.path: no file matches",
        ),
    }
    for failing, (break_it, says) in cases.items():
        kept = STAGES[STAGES.index(failing) :]
        before = published(project, [outputs[stage] for stage in kept])
        break_it()
        try:
            for stage in STAGES[: STAGES.index(failing)]:
                reproduce(stage, project)
            with pytest.raises(StageFailedError) as failed:
                reproduce(failing, project)
            message = str(failed.value)
            assert message.startswith(f"stage '{failing}' failed (exit 1): ") and says in message, message
            assert message.count(says) == 1 and "Traceback" not in message, message
            assert published(project, [outputs[stage] for stage in kept]) == before, failing
            now = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
            assert {s: now[s] for s in kept} == {s: lock[s] for s in kept}, failing
        finally:
            (project / "params.yaml").write_text(original_params)
            if bad_drop.exists():
                bad_drop.unlink()
                bad_drop.parent.rmdir()
                reproduce("ingest", project)  # back to the ingested rows of the published dataset
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"] == lock
    assert len(client.search_model_versions(f"name='{name}'")) == versions


def test_bad_drop_fails_and_leaves_the_registry_untouched(project, harness):
    params = str(project / "params.yaml")
    client, name = registry(project)
    champion = client.get_model_version_by_alias(name, "champion").version
    # A bad drop fails validation: the run fails with the rule, the registry stays as it was.
    write_jsonl(project / "company" / "drop_02" / "train.jsonl", [{"instruction": "Hi", "output": ""}] * 5)
    # Not committed yet: refused before any stage (a version must be rebuildable from its commit).
    with pytest.raises(Exception, match=r"uncommitted changes: company/drop_02/train.jsonl\. A registered"):
        retrain(params)
    assert latest_record(project)["stages"] == {}
    # A local try may allow it (tagged if it ever registered); validation then rejects the drop.
    with pytest.raises(Exception) as failed:
        retrain(params, allow_uncommitted=True)
    message = str(failed.value)  # the stage's own summary, once, with the command's exit status
    assert message.startswith("stage 'validate' failed (exit 1): data failed validation"), message
    assert message.count("[empty_text]") == 1 and "Traceback" not in message
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert client.get_model_version_by_alias(name, "champion").version == champion
    assert latest_record(project)["status"] == "failed"
    # Every run has its HTML page, the failed one too, listed in the index with its reason.
    reports = project / "outputs" / "reports"
    assert sorted(p.stem for p in (reports / "runs").glob("*.html")) == sorted(
        p.stem for p in (project / "outputs" / "runs").glob("*.json")
    )
    index = (reports / "index.html").read_text()
    assert index.count('class="status bad"') == 2 and "validate" in index and "uncommitted" in index

    # A setting no run can succeed with fails before any stage, naming the key.
    settings = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**settings, "base_model": "no/such/model"}))
    try:
        with pytest.raises(
            Exception, match=r"params.yaml: base_model: .*no/such/model is not a Hugging Face"
        ):
            retrain(params)
        assert latest_record(project)["stages"] == {}
    finally:
        (project / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def test_a_version_from_an_uncommitted_drop_names_the_drop_on_recompute(project, harness, tmp_path, capsys):
    """Allowed for a local try, a version trained on a drop its commit lacks is tagged so, logs
    every company file's hash, and `rebuild --recompute` names the drop before running anything."""
    params = str(project / "params.yaml")
    shutil.rmtree(project / "company" / "drop_02", ignore_errors=True)  # the bad drop above
    drop(project, "drop_02", 24, 10)  # valid rows, not committed
    result = retrain(params, allow_uncommitted=True)
    assert result["status"] in ("promoted", "rejected by the gate"), result
    client, name = registry(project)
    version = latest_record(project)["registration"]["version"]
    tags = client.get_model_version(name, version).tags
    assert tags["uncommitted"] == "company/drop_02/train.jsonl" and tags["git_commit"].endswith("-dirty")
    into = tmp_path / "recomputed"
    capsys.readouterr()  # the run's own log lines name every drop
    code = rebuild_main([version, "--into", str(into), "--recompute", "--params", params])
    error = capsys.readouterr().err
    assert code == 1 and "company/drop_02/train.jsonl: recorded with the version, missing here" in error
    assert "company/drop_01/train.jsonl" not in error  # only what differs is named
    assert not (into / "outputs").exists()  # refused before any stage ran
    # Pulled (not recomputed), the version's outputs are still there byte for byte.
    pulled = tmp_path / "pulled"
    assert rebuild_main([version, "--into", str(pulled), "--params", params]) == 0
    assert adapter_bytes(pulled / "outputs" / "train") == adapter_bytes(project / "outputs" / "train")


def test_a_version_from_the_champion_records_its_parent_and_is_rebuilt_from_it(project, harness, tmp_path):
    """The flow's `start` (a deployment parameter) builds on the champion: the version records
    its parent and strategy, and `rebuild --recompute` fetches that parent version (not the
    champion of the day) and recomputes the very adapter."""
    params = str(project / "params.yaml")
    shutil.rmtree(project / "company" / "drop_02", ignore_errors=True)  # the uncommitted drop above
    drop(project, "drop_03", 40, 10)
    git(project, "add", "-A")
    git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "drop 3")
    client, name = registry(project)
    parent = str(client.get_model_version_by_alias(name, "champion").version)
    result = retrain(params, start="champion")
    assert result["status"] in ("promoted", "rejected by the gate"), result
    assert result["stages"]["parent"] and result["stages"]["train"]
    version = latest_record(project)["registration"]["version"]
    tags = client.get_model_version(name, version).tags
    assert (tags["parent_version"], tags["start"]) == (parent, "refold") and int(tags["rows_new"]) > 0
    rebuilt = rebuild(load_settings(project / "params.yaml"), version, tmp_path / "clone", recompute=True)
    assert rebuilt["matches"] == {"data_version": True, "adapter_weights": True}, rebuilt
    recorded = json.loads((tmp_path / "clone" / "outputs" / "parent" / "parent.json").read_text())
    assert recorded["version"] == parent


def test_file_differences_name_each_file():
    from milora.digests import file_differences

    recorded = {"a.jsonl": "1" * 64, "b.jsonl": "2" * 64, "c.jsonl": "3" * 64}
    found = {"a.jsonl": "1" * 64, "b.jsonl": "f" * 64, "d.jsonl": "4" * 64}
    assert file_differences(recorded, found) == [
        "b.jsonl: content differs (sha256 222222222222... recorded, ffffffffffff... here)",
        "c.jsonl: recorded with the version, missing here",
        "d.jsonl: here, not recorded with the version",
    ]
    assert file_differences(recorded, dict(recorded)) == []


def test_uncommitted_code_params_and_drops_are_named(tmp_path, chat_model_dir):
    from tasks.lineage import UncommittedChangesError, git_commit, require_committed, uncommitted_files

    root = make_project(tmp_path / "project", chat_model_dir)
    settings = load_settings(root / "params.yaml")
    assert uncommitted_files(settings) == [] and not git_commit(root).endswith("-dirty")
    write_jsonl(root / "company" / "drop_02" / "train.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n")
    (root / "notes.txt").write_text("untracked, not read by ingest: not an input")
    assert uncommitted_files(settings) == ["company/drop_02/train.jsonl", "params.yaml"]
    with pytest.raises(UncommittedChangesError, match=r"company/drop_02/train\.jsonl, params\.yaml"):
        require_committed(settings, allow=False)
    assert require_committed(settings, allow=True) == ["company/drop_02/train.jsonl", "params.yaml"]
    assert git_commit(root, dirty=True).endswith("-dirty")
    # A drop DVC versions (`dvc add`, its .dvc file committed) is committed; changed since, it is not.
    dvc(root, "add", "company/drop_02")
    git(root, "add", "company/drop_02.dvc", "company/.gitignore")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "drop 2 with DVC")
    assert uncommitted_files(settings) == ["params.yaml"]
    write_jsonl(root / "company" / "drop_02" / "train.jsonl", [{"instruction": "Hi", "output": "Bye"}])
    assert uncommitted_files(settings) == ["company/drop_02/train.jsonl", "params.yaml"]


def test_dvc_records_of_outputs_are_not_uncommitted_inputs(tmp_path, chat_model_dir):
    from tasks.lineage import uncommitted_files

    root = make_project(tmp_path / "project", chat_model_dir)
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    git(root, "add", "dvc.lock")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "lock")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the next run rewrites it
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "/dataset\n")
    assert uncommitted_files(load_settings(root / "params.yaml")) == []


def test_an_unreachable_registry_fails_first_and_its_password_is_nowhere(
    project, harness, monkeypatch, capsys
):
    """A wrong tracking URI with a login fails before any stage, recorded, and the password
    appears in no record, page, Prefect state, Prefect log or console line."""
    from prefect.client.orchestration import get_client

    secret = "s3cret-pw-42"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://milora:{secret}@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(Exception) as failed:
        retrain(str(project / "params.yaml"), allow_uncommitted=True)
    message = str(failed.value)
    assert "the MLflow registry at http://milora:***@127.0.0.1:" in message and secret not in message
    record = latest_record(project)
    assert record["status"] == "failed" and record["stages"] == {} and secret not in json.dumps(record)
    pages = project / "outputs" / "reports"
    assert all(secret not in page.read_text() for page in pages.rglob("*.html"))
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        assert any("cannot be used" in (run.state.message or "") for run in runs)
        assert all(secret not in (run.state.message or "") for run in runs)
        assert all(secret not in log.message for log in client.read_logs())


def test_an_emptied_store_stops_the_run_until_a_new_registry_is_said(project, harness):
    """`: > mlflow.db` after this project promoted champions there. In this (long-running)
    process the store has lost its tables; a new process (`python -m flows.retrain`) finds an
    empty store. Either way the run fails before any stage instead of promoting a "first model"
    past the gate; --new-registry starts afresh."""
    params = str(project / "params.yaml")
    (project / "mlflow.db").write_bytes(b"")
    with pytest.raises(Exception, match=r"has lost its tables \(emptied while this process had it open\)"):
        retrain(params, allow_uncommitted=True)
    assert latest_record(project)["stages"] == {}
    command = [sys.executable, "-m", "flows.retrain", "--params", params, "--allow-uncommitted"]
    refused = subprocess.run(command, cwd=project, env=stage_env(), capture_output=True, text=True)
    assert refused.returncode == 1 and "but run record" in refused.stderr, refused.stderr[-2000:]
    assert "emptied or replaced" in refused.stderr and latest_record(project)["stages"] == {}
    started = subprocess.run(
        [*command, "--new-registry"], cwd=project, env=stage_env(), capture_output=True, text=True
    )
    assert started.returncode == 0 and "first model: no champion yet" in started.stdout, started.stderr[
        -2000:
    ]
    record = latest_record(project)
    assert record["status"] == "promoted" and record["registration"]["version"] == "1"


@pytest.mark.slow
def test_image_records_through_the_whole_flow(tmp_path, vlm_dir, harness):
    """A vision-language base and a drop of image+text records: ingest and validate them
    (images published with the dataset), train through the processor, score an image suite,
    register. (No quality claim: random weights, a few steps.)"""
    root = make_project(tmp_path / "vlm-project", vlm_dir)
    drop_dir = root / "company" / "drop_01"
    questions = ("What colour is this product?", "Which colour does this item have?")
    for colour in COLOURS:
        colour_image(drop_dir / "img" / f"{colour}.png", colour)
        colour_image(root / "eval" / "img" / f"{colour}.png", colour, seed=1)  # other shots
    write_jsonl(
        drop_dir / "photos.jsonl",
        [
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"It is {c}."}],
                "images": [f"img/{c}.png"],
            }
            for c in COLOURS
            for q in questions
        ],
    )
    write_jsonl(
        root / "eval" / "photos.jsonl",
        [{"question": questions[0], "answer": c, "images": f"img/{c}.png"} for c in COLOURS],
    )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["sources"] = ["company/drop_*/*.jsonl"]
    params["evaluate"]["suites"]["photos"] = {
        "kind": "image_qa", "path": "eval/photos.jsonl", "metric": "contains", "max_new_tokens": 4
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "photos")

    result = retrain(str(root / "params.yaml"))
    assert result["status"] == "promoted", result
    settings = load_settings(root / "params.yaml")
    dataset = settings.path(settings.validation.dataset_dir)
    assert result["data"]["quarantined"] == 0  # the eval asks the same question of other photos
    published = sorted(p.name for p in (dataset / "images").iterdir())
    digests = sorted(
        hashlib.sha256((drop_dir / "img" / f"{c}.png").read_bytes()).hexdigest() + ".png" for c in COLOURS
    )
    assert published == digests  # content-addressed, each image once
    summary = json.loads((root / "outputs" / "train" / "train_summary.json").read_text())
    assert summary["packed"] is False  # image batches are padded
    photos = json.loads((root / "outputs" / "eval" / "photos.json").read_text())
    assert photos["n"] == 4 and photos["metric"] == "contains"
    metrics = json.loads((root / "outputs" / "eval" / "metrics.json").read_text())
    assert "photos" in metrics
    client, name = registry(root)
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    # The images are part of the raw data: an edited picture is new data.
    assert {f"company/drop_01/img/{c}.png" for c in COLOURS} <= set(raw_files(settings))
    before = raw_data_hash(settings)
    colour_image(drop_dir / "img" / "red.png", "red", seed=2)
    assert raw_data_hash(settings) != before
