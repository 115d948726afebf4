"""The train and evaluate stages on a really ingested and validated dataset, as the pipeline runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import stage_settings

from milora.evaluation import runner
from milora.settings import SettingsError, load_settings
from tasks import run_command
from tasks.evaluate import evaluate
from tasks.evaluate import main as evaluate_main
from tasks.ingest import ingest
from tasks.train import train
from tasks.validate import validate


@pytest.fixture
def settings(tmp_path, chat_model_dir):
    return stage_settings(tmp_path, chat_model_dir, **{"train.cache_dir": "svd-cache"})


def test_train_then_evaluate_on_the_validated_dataset(settings, tmp_path, monkeypatch):
    ingest(settings)
    validate(settings, reports_dir=tmp_path / "reports")
    summary = train(settings)
    run = tmp_path / "run"
    assert summary["global_step"] == 4 and summary["resumed_from"] is None
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/initial",
        "adapter_for_stock_base",
        "loss_curve.png",
    ):
        assert (run / name).exists(), name
    assert json.loads((run / "run_key.json").read_text())["base_model"] == settings.base_model
    assert any((tmp_path / "svd-cache").iterdir())  # the decomposition was cached

    metrics = evaluate(settings)
    out = tmp_path / "outputs" / "eval"
    assert sorted(metrics) == ["company", "recall", "text"]  # the absent optional suite was skipped
    assert {"exact_match", "f1", "contains", "starts_with", "score", "base_score"} <= set(metrics["company"])
    assert "forgetting" in metrics["recall"] and "forgetting" not in metrics["company"]
    text = metrics["text"]
    assert text["forgetting"] == pytest.approx(
        text["score"] / text["base_score"] - 1
    )  # perplexity: relative rise
    company = json.loads((out / "company.json").read_text())
    assert (
        company["n"] == 6 and len(company["predictions"]) == 6 and "prediction" in company["predictions"][0]
    )
    assert (out / "base" / "company.json").is_file()
    assert "| company | f1 | 6 |" in (out / "summary.md").read_text()

    # The base model's results come from the cache the second time: no base suite runs again.
    labels = []
    real = runner.evaluate_model
    monkeypatch.setattr(
        runner,
        "evaluate_model",
        lambda *a, label="model", **k: labels.append(label) or real(*a, label=label, **k),
    )
    merged = evaluate(settings.with_overrides({"evaluate.merged": True}))
    assert labels == ["adapter"]
    for suite in ("company", "recall"):  # merged weights score what base + adapter scores
        assert merged[suite]["score"] == metrics[suite]["score"]
    assert merged["text"]["score"] == pytest.approx(metrics["text"]["score"], rel=1e-4)


def test_rerun_resumes_same_settings_and_restarts_changed_ones(settings, tmp_path):
    ingest(settings)
    validate(settings, reports_dir=tmp_path / "reports")
    first = train(settings)
    again = train(settings)
    assert again["already_trained"] and again["global_step"] == first["global_step"]
    changed = train(settings.with_overrides({"train.rank": 4}))
    assert changed["resumed_from"] is None
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_train_profiles_are_checked_by_key():
    with pytest.raises(SettingsError, match=r"profiles.demo: unknown hyperparameter\(s\) \['learnin_rate'\]"):
        load_settings(Path(__file__).parents[1] / "params.yaml", {"train.profiles.demo.learnin_rate": 1.0})
    with pytest.raises(SettingsError, match="profile 'fast' is not one of profiles"):
        load_settings(Path(__file__).parents[1] / "params.yaml", {"train.profile": "fast"})
    with pytest.raises(SettingsError, match="batch_size 10 must be a multiple of micro_batch_size 4"):
        load_settings(Path(__file__).parents[1] / "params.yaml", {"train.profiles.paper.batch_size": 10})


def test_evaluate_command_names_what_is_missing(settings, tmp_path, capsys):
    params = tmp_path / "stage-params.yaml"
    params.write_text(yaml.safe_dump(settings.model_dump(by_alias=True, mode="json")))
    params = str(params)
    with pytest.raises(SystemExit) as exit_:
        run_command(lambda: evaluate_main(["--params", params, "--adapter", str(tmp_path / "nothing")]))
    assert exit_.value.code == 1
    assert "nothing: no adapter here" in capsys.readouterr().err

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        run_command(
            lambda: evaluate_main(
                [
                    "--params",
                    params,
                    "--adapter",
                    str(tmp_path / "adapter"),
                    "--set",
                    "evaluate.suites.company.path=gone.jsonl",
                ]
            )
        )
    assert exit_.value.code == 1
    assert "evaluate.suites.company.path: no file matches ['gone.jsonl']" in capsys.readouterr().err


def test_train_starts_from_the_init_stage_and_refuses_a_stale_one(settings, tmp_path):
    from milora.training.run import RunMismatchError
    from tasks.init import init

    ingest(settings)
    validate(settings, reports_dir=tmp_path / "reports")
    report = init(settings)
    assert (Path(report["init_dir"]) / "initial" / "adapter_model.safetensors").is_file()
    assert report["streamed"]  # a LLaMA checkpoint: read matrix by matrix, never loaded whole
    summary = train(settings)
    assert summary["global_step"] == 4
    # The run's initial adapter is the init stage's, not a second decomposition.
    from safetensors.torch import load_file

    staged = load_file(Path(report["init_dir"]) / "adapter_model.safetensors")
    used = load_file(tmp_path / "run" / "init" / "adapter_model.safetensors")
    assert staged.keys() == used.keys() and all((staged[k] == used[k]).all() for k in staged)
    with pytest.raises(
        RunMismatchError, match=r"initialised with other r, lora_alpha than this run asks for \(r=16 vs 8"
    ):
        train(settings.with_overrides({"train.rank": 8}))


def test_train_stage_mixes_the_datasets_replay_part(tmp_path, chat_model_dir):
    """ingest.replay -> a replay part of the published dataset -> the train stage's batches."""
    from conftest import TINY_PROFILE, company_conversations, write_jsonl

    general = company_conversations(60)[40:]  # rows the company drop does not hold
    write_jsonl(tmp_path / "general" / "chats.jsonl", [{"messages": m} for m in general])
    settings = stage_settings(
        tmp_path,
        chat_model_dir,
        **{
            "ingest.replay": {"sources": ["general/chats.jsonl"], "watch": "general"},
            "train.profiles": {"tiny": {**TINY_PROFILE, "replay_share": 0.25}},
        },
    )
    ingest(settings)
    validate(settings, reports_dir=tmp_path / "reports")
    summary = train(settings)
    assert summary["replay_per_batch"] == 2 and 0 < summary["replay_examples"] <= 20
    assert summary["examples"] <= 24  # company rows only
