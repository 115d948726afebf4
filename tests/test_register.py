"""The registry stage on a real tiny run: a real MLflow SQLite store, real artifacts, real aliases.

One run folder and one evaluation are produced per module (ingest -> validate -> train ->
evaluate on the tiny chat model); gate tests copy the evaluation and edit its metrics.json to
make better or worse challengers. Every test registers under its own model name in the one
store of the module, so tests do not see each other's versions and aliases.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import stage_settings
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from PIL import Image

from milora.layout import SERVED_ADAPTER, adapter_digest
from milora.settings import Settings
from tasks import register as reg
from tasks import registry, run_command
from tasks.evaluate import evaluate
from tasks.html_report import version_history
from tasks.ingest import ingest
from tasks.train import train
from tasks.validate import validate

DATA_VERSION = "5d41402abc4b2a76b9719d911017c592.dir"  # a DVC directory md5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chat_model_dir) -> Settings:
    """A project folder with a validated dataset, a trained run and its evaluation."""
    with pytest.MonkeyPatch.context() as env:  # never a developer's tracking server
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_REGISTRY_URI", raising=False)
        root = tmp_path_factory.mktemp("registry-project")
        env.chdir(root)  # MLflow's default store is ./mlflow.db: never the repository's
        settings = stage_settings(
            root,
            chat_model_dir,
            **{
                "train.cache_dir": None,
                "evaluate.cache_dir": None,
                "registry.tracking_uri": "sqlite:///mlflow.db",  # relative: from the project root
                "registry.artifact_location": "mlartifacts",
            },
        )
        ingest(settings)
        validate(settings)
        train(settings)
        evaluate(settings)
        yield settings


@pytest.fixture
def model(trained, request) -> Settings:
    """The module's project with a registered-model name of this test's own."""
    name = "m-" + re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)
    return trained.with_overrides({"registry.model_name": name})


def lineage(n: int | str, **changes: str) -> dict[str, str]:
    return {
        "data_version": DATA_VERSION,
        "adapter_version": f"a{n}".ljust(32, "0") + ".dir",
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "params_hash": f"{n}".rjust(64, "9"),  # versions n differ in content (params) as real ones would
        "raw_data_hash": f"raw{n}".ljust(64, "0"),
        **changes,
    }


def client_of(settings: Settings) -> MlflowClient:
    return MlflowClient(registry.tracking_uri(settings))


def with_metrics(settings: Settings, folder: Path, **scores: float) -> Settings:
    """The settings evaluated into a copy of the evaluation whose metrics.json has ``scores``
    (``company__score=0.5`` sets ``metrics["company"]["score"]``)."""
    shutil.copytree(settings.path(settings.evaluation.out_dir), folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    for key, value in scores.items():
        suite, metric = key.split("__")
        metrics[suite][metric] = value
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return settings.with_overrides({"evaluate.out_dir": str(folder)})


def versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def alias(client: MlflowClient, name: str, label: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, label).version)
    except MlflowException:
        return None


def experiment_runs(client: MlflowClient, settings: Settings) -> dict[str, Any]:
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    return {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=1000)}


# --------------------------------------------------------------------------- tracking URI
def test_tracking_uri_is_absolute_from_the_root_and_the_environment_wins(trained, monkeypatch):
    uri = registry.tracking_uri(trained)
    root = trained.root.resolve()
    assert uri == f"sqlite:///{root / 'mlflow.db'}"
    assert (root / "mlflow.db").is_file()
    experiment = MlflowClient(uri).get_experiment_by_name(trained.registry.experiment)
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()

    monkeypatch.setattr(registry, "prepare_store", lambda *args: None)  # no server to talk to here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert registry.tracking_uri(trained) == "http://mlflow.internal:5000"
    assert registry.artifact_location(trained, "http://mlflow.internal:5000") is None  # the server's own


# --------------------------------------------------------------------------- register
def test_register_logs_the_whole_run_then_registers_the_served_adapter(model):
    run_dir = model.path(model.train.run_dir)
    result = reg.register(model, lineage(1))
    client = client_of(model)
    name = model.registry.model_name
    assert result["new"] and result["version"] == "1"
    assert result["metrics"]["company.score"] == pytest.approx(
        json.loads((model.path(model.evaluation.out_dir) / "metrics.json").read_text())["company"]["score"]
    )

    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["method"] == "milora" and params["rank"] == "16" and params["alpha"] == "16.0"
    assert params["targets"] == ",".join(model.train.target_modules) and params["dropout"] == "0.05"
    assert params["profile"] == "tiny" and params["max_steps"] == "4" and params["learning_rate"] == "0.005"
    assert params["base_model"] == model.base_model
    history = client.get_metric_history(result["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    metrics = run.data.metrics
    for key in ("company.score", "company.f1", "recall.forgetting", "text.perplexity", "text.forgetting"):
        assert key in metrics, key
    assert "company.forgetting" not in metrics  # not a retention suite

    tags = run.data.tags
    for key, value in lineage(1).items():
        assert tags[key] == value
    assert tags["base_model"] == model.base_model and tags["base_model_digest"].startswith("xxh3-128:")
    assert tags["method"] == "milora" and tags["rank"] == "16"
    assert "| company |" in tags["mlflow.note.content"]  # the evaluation table as the run's note

    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == DATA_VERSION and DATA_VERSION in dataset.dataset.name
    input_tags = {t.key: t.value for t in dataset.tags}
    assert input_tags["mlflow.data.context"] == "training" and input_tags["rows"] == "24"

    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(model.root.resolve() / "mlartifacts")
    logged = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    for path in (
        "train/loss_curve.png",
        "train/train_summary.json",
        "eval/metrics.json",
        "eval/comparison.json",
        "eval/summary.md",
        "eval/company.json",
        "eval/base/company.json",
        "validation/summary.json",
        "validation/data_docs/index.html",
        "adapter/adapter_model.safetensors",
        "adapter/initial/adapter_model.safetensors",
        "adapter_for_stock_base/adapter_model.safetensors",
        "adapter_for_stock_base/adapter_config.json",
    ):
        assert path in logged, path
    assert not any(p.startswith("validation/quarantine") for p in logged)

    # Adapter files only: no base weights anywhere, no weight file bigger than the adapter.
    served_bytes = (run_dir / "adapter_for_stock_base" / "adapter_model.safetensors").stat().st_size
    base_bytes = (Path(model.base_model) / "model.safetensors").stat().st_size
    assert base_bytes > served_bytes  # so the size check below would catch a copied base
    weights = [p for p in artifacts.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and all(p.name.startswith("adapter_model") for p in weights)
    assert max(p.stat().st_size for p in weights) <= served_bytes

    # The version: a pyfunc model of the run holding the served plain-LoRA adapter, its lineage,
    # alias challenger, no champion yet.
    version = client.get_model_version(name, "1")
    assert version.run_id == result["run_id"]
    (output,) = run.outputs.model_outputs  # the run's logged model, linked to the version
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == result["run_id"] and logged.status == "READY"
    assert version.source == logged.artifact_location
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": "1"}]
    for key, value in lineage(1).items():
        assert version.tags[key] == value
    assert version.tags["method"] == "milora" and version.tags["rank"] == "16"
    assert version.tags["served_rank"] == "32" and version.tags["base_model"] == model.base_model
    assert alias(client, name, "challenger") == "1" and alias(client, name, "champion") is None
    packaged = Path(client.get_model_version_download_uri(name, "1").removeprefix("file://"))
    served = packaged / "artifacts" / "adapter_for_stock_base"
    config = json.loads((served / "adapter_config.json").read_text())
    assert config["r"] == 32 and not (served / "initial").exists()  # plain LoRA, rank 2r
    mlmodel = yaml.safe_load((packaged / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("serving_model.py") and "python_model" not in pyfunc
    assert mlmodel["model_id"] == logged.model_id and mlmodel["run_id"] == result["run_id"]
    assert Path(pyfunc["config"]["base_model"]) == Path(model.base_model).resolve()
    assert pyfunc["config"]["max_new_tokens"] == registry.SERVING_MAX_NEW_TOKENS
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "string", "name": "prompt", "required": True},
        {"type": "array", "items": {"type": "string"}, "name": "images", "required": False},
    ]
    assert not list(packaged.rglob("*.pkl"))  # models from code: nothing pickled
    requirements = (packaged / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "peft"}
    weights = [p for p in packaged.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert [p.name for p in weights] == ["adapter_model.safetensors"]
    assert weights[0].stat().st_size == served_bytes  # the adapter only, never the base

    # Same data, parameters, adapter and commit again: nothing new, no new run, same version.
    runs_before = set(experiment_runs(client, model))
    again = reg.register(model, lineage(1))
    assert not again["new"] and again["version"] == "1" and again["run_id"] == result["run_id"]
    assert again["metrics"]["company.score"] == result["metrics"]["company.score"]
    assert versions(client, name) == ["1"] and set(experiment_runs(client, model)) == runs_before
    # A version is its content: other code that trained the very same adapters on the same data
    # and params is the same model; other params (or data, or adapters) make a new one.
    same = reg.register(model, lineage(1, git_commit="f" * 40, adapter_version="b" * 32 + ".dir"))
    assert not same["new"] and same["version"] == "1"
    assert client.get_model_version(name, "1").tags["adapter_digest"] == adapter_digest(
        run_dir / "adapter", run_dir / "adapter_for_stock_base"
    )
    assert reg.register(model, lineage(1, params_hash="e" * 64))["new"]


def test_non_adapter_files_in_an_adapter_folder_are_never_logged(model, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(model.path(model.train.run_dir), run_dir)
    (run_dir / "adapter_for_stock_base" / "model.safetensors").write_bytes(b"\0" * 4096)  # a stray base
    (run_dir / "adapter" / "tokenizer.json").write_text("{}")
    result = reg.register(model.with_overrides({"train.run_dir": str(run_dir)}), lineage("stray"))
    run = client_of(model).get_run(result["run_id"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    names = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in names
    assert "model.safetensors" not in names and "tokenizer.json" not in names
    version = client_of(model).get_model_version(model.registry.model_name, result["version"])
    packaged = Path(version.source.removeprefix("file://"))
    packaged_names = {p.name for p in packaged.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in packaged_names and "model.safetensors" not in packaged_names


def test_register_refuses_missing_lineage_or_outputs(model, tmp_path):
    with pytest.raises(registry.RegistryError, match="lineage lacks data_version"):
        reg.register(model, lineage(1, data_version=""))
    with pytest.raises(registry.RegistryError, match="nothing to register: missing train_summary"):
        reg.register(model.with_overrides({"train.run_dir": str(tmp_path / "none")}), lineage(1))
    assert versions(client_of(model), model.registry.model_name) == []


def test_failed_logging_registers_nothing_and_fails_the_run(model, monkeypatch):
    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(model, lineage(1))
    reg.promote(model, first["version"])
    runs_before = set(experiment_runs(client, model))

    real = MlflowClient.log_artifact

    def flaky(self, run_id, local_path, artifact_path=None):
        if Path(local_path).name == "summary.md":
            raise OSError("disk full while copying summary.md")
        return real(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", flaky)
    with pytest.raises(OSError, match="disk full"):
        reg.register(model, lineage(2))
    (new_run,) = set(experiment_runs(client, model)) - runs_before
    assert client.get_run(new_run).info.status == "FAILED"
    assert versions(client, name) == ["1"]
    assert alias(client, name, "champion") == "1" and alias(client, name, "challenger") == "1"


def test_a_relative_base_model_is_recorded_absolute_for_loading(model):
    relative = os.path.relpath(model.base_model, model.root)
    assert not Path(relative).is_absolute()
    result = reg.register(model.with_overrides({"base_model": relative}), lineage("relative"))
    version = client_of(model).get_model_version(model.registry.model_name, result["version"])
    assert version.tags["base_model"] == relative  # the tag as configured
    mlmodel = yaml.safe_load((Path(version.source.removeprefix("file://")) / "MLmodel").read_text())
    recorded = mlmodel["flavors"]["python_function"]["config"]["base_model"]
    assert recorded == str(Path(model.base_model).resolve())  # the model: where it loads from


def test_failed_model_logging_registers_nothing(model, monkeypatch):
    client = client_of(model)
    runs_before = set(experiment_runs(client, model))

    def broken(self, model_id, local_dir, artifact_path=None):
        raise OSError("disk full while uploading the model")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", broken)
    with pytest.raises(OSError, match="disk full"):
        reg.register(model, lineage("model"))
    (new_run,) = set(experiment_runs(client, model)) - runs_before
    assert client.get_run(new_run).info.status == "FAILED"
    (output,) = client.get_run(new_run).outputs.model_outputs
    assert client.get_logged_model(output.model_id).status == "FAILED"
    assert versions(client, model.registry.model_name) == []


def test_the_champion_loads_with_mlflow_pyfunc_and_answers_as_peft_does(model, monkeypatch):
    """``models:/NAME@champion`` is a real MLflow model: base + served adapter, greedy answers."""
    import mlflow
    import pandas as pd
    from peft import PeftModel

    from milora.evaluation.generation import greedy_generate
    from milora.modeling import load_base_model, load_tokenizer
    from milora.training.examples import prompt_text

    result = reg.register(model, lineage(1))
    assert reg.promote(model, result["version"])["decision"] == "promoted"
    name = model.registry.model_name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri(model))  # what load_model reads
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry.tracking_uri(model))
    prompts = ["What are the support hours?", "Who approves travel expenses?"]

    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = champion.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 6})
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers), answers

    # The same answers as the served adapter put on the stock base with PEFT by hand.
    tokenizer = load_tokenizer(model.base_model)
    tuned = PeftModel.from_pretrained(
        load_base_model(model.base_model), model.path(model.train.run_dir) / SERVED_ADAPTER
    )
    chats = [prompt_text(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    assert answers == greedy_generate(tuned, tokenizer, chats, max_new_tokens=6, first_line=False)

    # By version number too; a longer answer continues the shorter one (greedy).
    by_number = mlflow.pyfunc.load_model(f"models:/{name}/{result['version']}")
    longer = by_number.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 12})
    assert len(longer) == 2 and all(a.startswith(b) for a, b in zip(longer, answers, strict=True))
    with pytest.raises(Exception, match="prompt"):
        by_number.predict(pd.DataFrame({"question": prompts}))
    # A picture passes MLflow's signature (an optional images column) but not a text model.
    picture = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(picture, format="PNG")
    pictured = pd.DataFrame(
        {"prompt": prompts, "images": [[], [base64.b64encode(picture.getvalue()).decode()]]}
    )
    with pytest.raises(Exception, match=r"reads text only .*rows \[1\] carry images"):
        by_number.predict(pictured)


# --------------------------------------------------------------------------- gate
def test_first_model_is_promoted_then_a_better_one_replaces_it_and_rollback_restores(model, tmp_path):
    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    decision = reg.promote(model, first["version"])
    assert decision["decision"] == "promoted" and decision["reasons"] == ["first model: no champion yet"]
    assert decision["champion"] == "1" and decision["previous"] is None
    assert alias(client, name, "champion") == "1"
    assert reg.champion_lineage(model)["raw_data_hash"] == lineage(1)["raw_data_hash"]

    better = with_metrics(model, tmp_path / "v2", company__score=0.6, recall__forgetting=0.05)
    second = reg.register(better, lineage(2))
    assert alias(client, name, "challenger") == "2" and alias(client, name, "champion") == "1"
    decision = reg.promote(model, second["version"])
    assert decision == {
        "version": "2",
        "decision": "promoted",
        "reasons": decision["reasons"],
        "champion": "2",
        "previous": "1",
    }
    assert any(r.startswith("company score 0.6000 >= champion 0.4000") for r in decision["reasons"])
    assert any(
        "recall forgetting since the stock base 0.0500 <= max 0.1000: ok" in r for r in decision["reasons"]
    )
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.decision"] == "promoted" and tags["previous_champion"] == "1"
    assert "against champion v1" in tags["gate.reasons"]
    assert alias(client, name, "champion") == "2"
    champion = reg.champion_lineage(model)
    assert champion["version"] == "2" and champion["raw_data_hash"] == lineage(2)["raw_data_hash"]
    assert reg.promote(model, "2")["reasons"] == ["already the champion"]

    back = reg.rollback(model)
    assert back["champion"] == "1" and back["previous"] == "2"
    assert alias(client, name, "champion") == "1"
    assert client.get_model_version(name, "2").tags["rolled_back"] == "true"
    # The rollback is a run of its own in the report: its record, its page, the index's reason,
    # and version 2 marked rolled back in the history.
    records = {p: json.loads(p.read_text()) for p in model.path("outputs/runs").glob("*.json")}
    (path,) = [p for p, r in records.items() if r["status"] == "rolled back" and r["rollback"] == back]
    reports = model.path("outputs/reports")
    assert (
        'Retrain local run: <span class="status warn">rolled back</span>'
        in (reports / "runs" / f"{path.stem}.html").read_text()
    )
    assert "champion v2 -&gt; v1" in (reports / "index.html").read_text()
    history = {p.version: p for p in version_history(registry.Registry(model))}
    assert history["2"].rolled_back and not history["1"].rolled_back and history["1"].champion
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        reg.rollback(model)
    assert alias(client, name, "champion") == "1"


def test_gate_rejection_keeps_the_champion_and_records_why(model, tmp_path):
    """The registry side of a rejection (the gate's rules: test_promotion.py)."""
    client = client_of(model)
    name = model.registry.model_name
    base = {"company__score": 0.5, "recall__score": 0.5, "recall__forgetting": 0.0, "text__score": 20.0}
    champion = reg.register(with_metrics(model, tmp_path / "champion", **base), lineage(1))
    reg.promote(model, champion["version"])
    worse = with_metrics(model, tmp_path / "challenger", **{**base, "company__score": 0.3})
    challenger = reg.register(worse, lineage(2))
    decision = reg.promote(model, challenger["version"])
    failed = "company score 0.3000 >= champion 0.5000 + min gain 0.0000 = 0.5000 (n=6; stored scores): FAILED"
    assert decision["decision"] == "rejected" and decision["champion"] == "1" and decision["previous"] == "1"
    assert failed in decision["reasons"], decision["reasons"]
    assert alias(client, name, "champion") == "1" and alias(client, name, "challenger") == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.decision"] == "rejected" and failed in tags["gate.reasons"]
    assert tags["gate.reasons"].endswith("(against champion v1)")
    assert "previous_champion" not in tags


# --------------------------------------------------------------------------- tasks and command
class _State:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def result(self) -> None:
        if self.error is not None:
            raise self.error


def _rest_failure() -> MlflowException:
    """How MLflow's REST client reports an unreachable server: a plain MlflowException."""
    try:
        try:
            raise ConnectionRefusedError("connection refused")
        except ConnectionRefusedError as error:
            raise MlflowException(f"API request failed with exception {error}")  # noqa: B904
    except MlflowException as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConnectionError("registry unreachable"), True),
        (OSError("disk"), True),
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("(sqlite3.OperationalError) database is locked"), True),
        (_rest_failure(), True),
        (MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE), False),
        (registry.RegistryError("no previous champion"), False),
        (ValueError("bad metrics"), False),
        (None, False),
    ],
)
def test_tasks_retry_transient_registry_faults_only(error, retried):
    assert registry.retry_on_registry_fault(None, None, _State(error)) is retried
    for stage in (reg.register_task, reg.promote_task, reg.rollback_task):
        assert stage.retry_condition_fn is registry.retry_on_registry_fault and stage.retries > 0


def test_command_show_promote_rollback(model, tmp_path, capsys):
    params = model.root / f"{model.registry.model_name}.yaml"  # beside params.yaml: the same store
    params.write_text(yaml.safe_dump(model.model_dump(by_alias=True, mode="json")))

    def command(*args: str) -> int:
        with pytest.raises(SystemExit) as exit_:
            run_command(lambda: reg.main(["--params", str(params), *args]))
        return exit_.value.code

    assert command("rollback") == 1
    assert "has no champion: nothing to roll back" in capsys.readouterr().err
    assert command("promote", "7") == 1
    assert "has no version 7" in capsys.readouterr().err
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.25), lineage(1))
    assert command("promote", first["version"]) == 0
    assert "version 1: promoted (champion: 1)" in capsys.readouterr().out
    assert command("show") == 0
    out = capsys.readouterr().out
    assert "champion: version 1" in out and "challenger: version 1" in out
    assert "company: score 0.2500" in out and f"data_version: {DATA_VERSION}" in out
    assert command("rollback") == 1
    assert "first champion: there is no previous champion" in capsys.readouterr().err
    assert command("promote", "1", "--force") == 1
    assert "a forced promotion needs a reason" in capsys.readouterr().err


def test_adapters_changed_after_evaluation_are_refused(model, tmp_path):
    """What is registered is what was evaluated: the evaluate stage recorded the adapters'
    digest, and a run folder whose adapters differ since is never registered."""
    run_dir = tmp_path / "run"
    shutil.copytree(model.path(model.train.run_dir), run_dir)
    moved = model.with_overrides({"train.run_dir": str(run_dir)})
    evaluated = json.loads((model.path(model.evaluation.out_dir) / "comparison.json").read_text())
    digest = evaluated["info"]["adapter_digest"]
    assert digest == adapter_digest(run_dir / "adapter", run_dir / "adapter_for_stock_base")
    served = run_dir / "adapter_for_stock_base" / "adapter_model.safetensors"
    served.write_bytes(served.read_bytes()[:4000])  # truncated after evaluation
    with pytest.raises(registry.RegistryError, match="the adapters changed after evaluation"):
        reg.register(moved, lineage("truncated"))
    assert versions(client_of(model), model.registry.model_name) == []


def test_another_base_is_refused_and_a_person_can_force_with_a_reason(model, tmp_path):
    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    reg.promote(model, first["version"])
    other = model.with_overrides({"base_model": str(tmp_path / "other-base")})
    shutil.copytree(model.base_model, tmp_path / "other-base")
    (tmp_path / "other-base" / "config.json").write_text(
        (tmp_path / "other-base" / "config.json").read_text() + " "
    )  # other weights digest
    second = reg.register(with_metrics(other, tmp_path / "v2", company__score=0.9), lineage(2))
    decision = reg.promote(model, second["version"])
    assert decision["decision"] == "rejected" and decision["champion"] == "1"
    assert "their scores are not comparable" in decision["reasons"][0]

    with pytest.raises(registry.RegistryError, match="needs a reason"):
        reg.promote(model, second["version"], force=True)
    forced = reg.promote(model, second["version"], force=True, reason="new base, validated by QA ticket 42")
    assert forced["decision"] == "forced" and forced["champion"] == "2" and forced["previous"] == "1"
    tags = client.get_model_version(name, "2").tags
    assert (
        tags["gate.override"] == "new base, validated by QA ticket 42" and tags["gate.decision"] == "forced"
    )
    assert tags["gate.reasons"].startswith("forced by hand: new base, validated by QA ticket 42")
    assert alias(client, name, "champion") == "2"
    records = [json.loads(p.read_text()) for p in model.path("outputs/runs").glob("*.json")]
    assert any(r["status"] == "promoted by hand" and r["decision"] == forced for r in records)
    index = model.path("outputs/reports/index.html").read_text()
    assert "forced by hand: new base, validated by QA ticket 42" in index


# --------------------------------------------------------------------------- integrity
def test_a_finished_run_whose_adapter_changed_is_not_trusted(model, tmp_path, caplog):
    """The train stage trusts a finished run only while its adapter files are the ones
    training wrote (their hashes, written before the summary); a truncated one trains again."""
    from milora.training.loop import finished_run

    run_dir = tmp_path / "run"
    shutil.copytree(model.path(model.train.run_dir), run_dir)
    assert finished_run(run_dir) is not None
    served = run_dir / SERVED_ADAPTER / "adapter_model.safetensors"
    served.write_bytes(served.read_bytes()[:4000])
    with caplog.at_level("WARNING", logger="milora.training.loop"):
        assert finished_run(run_dir) is None
    assert f"{SERVED_ADAPTER}/adapter_model.safetensors: content differs" in caplog.text


def test_a_version_that_would_not_load_never_becomes_champion(model, tmp_path):
    """Its served adapter truncated in the artifact store: the gate fails it (the champion
    stays), a forced promotion is refused, and a rollback to it is refused."""
    from urllib.parse import urlparse

    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    assert reg.promote(model, first["version"])["decision"] == "promoted"
    second = reg.register(with_metrics(model, tmp_path / "v2", company__score=0.9), lineage(2))
    stored = Path(urlparse(client.get_run(second["run_id"]).info.artifact_uri).path)
    weights = stored / SERVED_ADAPTER / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    decision = reg.promote(model, second["version"])
    assert decision["decision"] == "rejected" and alias(client, name, "champion") == "1"
    assert any("not loadable" in r and r.endswith("FAILED") for r in decision["reasons"]), decision
    with pytest.raises(registry.RegistryError, match="cannot be promoted, even by hand: not loadable"):
        reg.promote(model, second["version"], force=True, reason="ship it")
    assert alias(client, name, "champion") == "1"
    # A loadable third version replaces the champion; version 1's adapter then breaks in the
    # store: a rollback to it is refused and the champion stays.
    third = reg.register(with_metrics(model, tmp_path / "v3", company__score=0.9), lineage(3))
    assert reg.promote(model, third["version"])["decision"] == "promoted"
    first_weights = Path(urlparse(client.get_run(first["run_id"]).info.artifact_uri).path) / SERVED_ADAPTER
    (first_weights / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(registry.RegistryError, match="cannot roll back to version 1: not loadable"):
        reg.rollback(model)
    assert alias(client, name, "champion") == "3"


def test_a_version_whose_pyfunc_model_would_not_load_never_becomes_champion(model, tmp_path):
    """The run's adapter is whole but the copy inside the logged pyfunc model (what
    ``mlflow.pyfunc.load_model("models:/...@champion")`` reads) is damaged: the gate fails it."""
    from urllib.parse import urlparse

    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    assert reg.promote(model, first["version"])["decision"] == "promoted"
    second = reg.register(with_metrics(model, tmp_path / "v2", company__score=0.9), lineage(2))
    source = client.get_model_version(name, second["version"]).source
    (weights,) = Path(urlparse(source).path).rglob("adapter_model.safetensors")
    assert "artifacts" in weights.parts
    weights.write_bytes(weights.read_bytes()[:4000])
    decision = reg.promote(model, second["version"])
    assert decision["decision"] == "rejected" and alias(client, name, "champion") == "1"
    (reason,) = decision["reasons"]
    assert reason.startswith("pyfunc model not loadable:") and reason.endswith("FAILED"), reason
    assert "the pyfunc model's adapter artifact" in reason and str(tmp_path) not in reason


def test_a_store_that_lost_its_champion_is_never_a_first_model(model, tmp_path):
    """The model emptied from the store after this project promoted a champion in it (its run
    record says so): the next promotion is an error, not "first model", until --new-registry."""
    from tasks.report import report

    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    reg.promote(model, first["version"])
    report(model, status="promoted", seconds=1.0, registration=first)
    assert first["store"] == registry.configured_uri(model)
    client.delete_registered_model(name)  # the store lost the model and its champion
    again = reg.register(with_metrics(model, tmp_path / "v1b", company__score=0.1), lineage("1b"))
    with pytest.raises(
        reg.LostChampionError, match=rf"has no champion of {name}, but run record .* promoted"
    ):
        reg.promote(model, again["version"])
    assert alias(client, name, "champion") is None
    decision = reg.promote(model, again["version"], new_registry=True)
    assert decision["decision"] == "promoted" and alias(client, name, "champion") == again["version"]


def _killed_at(settings: Settings, lineage_: dict[str, str], method: str, when) -> int:
    """Run register then promote in a forked process that SIGKILLs itself inside
    ``Registry.<method>`` (after the call, or before it when ``when`` is "before") for the
    arguments ``when`` accepts; returns the child's exit code."""
    import multiprocessing
    import signal

    def child() -> None:
        original = getattr(registry.Registry, method)

        def dying(self, *args, **kwargs):
            if when == "after-any" or when(*args):
                if method == "set_alias":
                    os.kill(os.getpid(), signal.SIGKILL)  # before the alias moves
                result = original(self, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)  # right after the version exists
                return result
            return original(self, *args, **kwargs)

        setattr(registry.Registry, method, dying)
        registered = reg.register(settings, lineage_)
        reg.promote(settings, registered["version"])

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(timeout=300)
    return process.exitcode


def test_a_promotion_cut_short_by_kill_9_is_finished_by_the_rerun(model, tmp_path):
    """kill -9 right after the version was created (no decision), and kill -9 as the champion
    alias is about to move (decision tagged): registering the same content again says the
    promotion is unfinished (the flow then promotes it); afterwards tags and aliases agree."""
    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    reg.promote(model, first["version"])

    better = with_metrics(model, tmp_path / "v2", company__score=0.9)
    assert _killed_at(better, lineage(2), "create_version", "after-any") == -9
    again = reg.register(better, lineage(2))
    assert again["new"] is False and again["unfinished"] is True and again["version"] == "2"
    assert "gate.decision" not in client.get_model_version(name, "2").tags
    assert reg.registered_version(better, {**lineage(2), **_identity(better)}) is None  # not "nothing new"
    assert reg.promote(model, "2")["decision"] == "promoted" and alias(client, name, "champion") == "2"

    best = with_metrics(model, tmp_path / "v3", company__score=0.95)
    assert _killed_at(best, lineage(3), "set_alias", lambda label, number: label == "champion") == -9
    assert client.get_model_version(name, "3").tags["gate.decision"] == "promoted"
    assert alias(client, name, "champion") == "2"  # tags and alias disagree ...
    rerun = reg.register(best, lineage(3))
    assert rerun["unfinished"] is True
    assert reg.promote(model, rerun["version"])["decision"] == "promoted"
    assert alias(client, name, "champion") == "3"  # ... until the rerun finished it
    assert reg.register(best, lineage(3))["unfinished"] is False
    assert reg.registered_version(best, {**lineage(3), **_identity(best)}) == "3"


def test_a_champion_whose_artifacts_vanished_is_reported(model, tmp_path):
    """Deleted from the artifact store: the run stops with the reason (not "nothing new"), and
    rebuild says the artifacts are missing."""
    from urllib.parse import urlparse

    from tasks.rebuild import RebuildError, _same_weights

    client = client_of(model)
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    reg.promote(model, first["version"])
    assert reg.champion_problem(model) is None
    shutil.rmtree(Path(urlparse(client.get_run(first["run_id"]).info.artifact_uri).path))
    problem = reg.champion_problem(model)
    assert problem.startswith(
        f"the champion, {model.registry.model_name} version 1: its adapter_for_stock_base/"
    )
    assert "roll back" in problem
    with pytest.raises(RebuildError, match="artifacts are missing from the store"):
        _same_weights(registry.Registry(model), first["run_id"], tmp_path / "rebuilt")


def _identity(settings: Settings) -> dict[str, str]:
    """The identity keys register computes from the run folder."""
    run_dir = settings.path(settings.train.run_dir)
    return {
        "adapter_digest": adapter_digest(run_dir / "adapter", run_dir / SERVED_ADAPTER),
        "base_model": settings.base_model,
    }


def _register_in_child(settings, lineage_, start, results) -> None:
    start.wait(timeout=60)
    try:
        results.put(reg.register(settings, lineage_)["version"])
    except Exception as error:  # reported to the test
        results.put(f"error: {error!r}")


def test_two_processes_registering_one_model_leave_one_version(model, tmp_path):
    """Two runs of the same content registering at once (each finds nothing, each creates):
    the younger version removes itself, and both return the one that stays."""
    import multiprocessing

    settings = with_metrics(model, tmp_path / "race", company__score=0.5)
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_register_in_child, args=(settings, lineage("race"), start, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    returned = sorted(results.get(timeout=5) for _ in children)
    client = client_of(model)
    name = model.registry.model_name
    assert versions(client, name) == [returned[0]] and returned[0] == returned[1], returned
    assert alias(client, name, "challenger") == returned[0]


def test_runs_left_running_by_a_killed_process_are_marked_failed(model, tmp_path):
    """A kill mid-upload leaves a run RUNNING and its logged model PENDING: the next
    registration marks both FAILED (their owner process is gone)."""
    import socket
    import subprocess
    import sys

    client = client_of(model)
    experiment = client.get_experiment_by_name(model.registry.experiment).experiment_id
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    owner = f"{socket.gethostname()}:{gone.stdout.strip()}"
    stalled = client.create_run(experiment, run_name="killed-mid-upload", tags={registry.OWNER_TAG: owner})
    pending = client.create_logged_model(experiment, name="served", source_run_id=stalled.info.run_id)
    alive = client.create_run(
        experiment,
        run_name="still-logging",
        tags={registry.OWNER_TAG: f"{socket.gethostname()}:{os.getpid()}"},
    )
    reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    assert client.get_run(stalled.info.run_id).info.status == "FAILED"
    assert str(client.get_logged_model(pending.model_id).status).endswith("FAILED")
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # a live owner is left alone
    client.set_terminated(alive.info.run_id, "FINISHED")


def test_a_challenger_that_gives_old_values_is_rejected_and_the_champion_stays(model, tmp_path):
    """max_stale on a real registry: better scores, but half the changed facts answered with
    their old value."""
    client = client_of(model)
    name = model.registry.model_name
    first = reg.register(with_metrics(model, tmp_path / "v1", company__score=0.4), lineage(1))
    reg.promote(model, first["version"])
    stale = with_metrics(
        model, tmp_path / "v2", company__score=0.9, company__stale_rate=0.5, company__changed_facts=4.0
    )
    second = reg.register(stale, lineage(2))
    decision = reg.promote(model, second["version"])
    assert decision["decision"] == "rejected" and alias(client, name, "champion") == "1"
    assert "company stale rate 0.5000 (of 4 changed facts) <= max 0.0500: FAILED" in decision["reasons"]
    assert client.get_model_version(name, "2").tags["gate.decision"] == "rejected"
