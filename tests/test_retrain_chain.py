"""Retraining from the champion through the pipeline's own stages (train.start: champion): a real
MLflow store, real training of the tiny chat model, three months chained.

Month 1 has no champion and starts from the stock base; month 2 refolds the champion (merged,
MiLoRA afresh in the merged weights' minor subspace); month 3 continues month 2's adapter.
Each run trains on what is new since its parent's dataset plus a sample of earlier rows; its
registered (served) adapter is the whole change since the stock weights; the registry records
the parent, the strategy and the rows; a rollback resets where the next run starts; a served
adapter truncated to a rank limit reports its error and the gate holds it to
``max_compression_error``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import company_conversations, logits, rel, stage_settings, write_jsonl
from mlflow import MlflowClient

from milora import load_adapter, merge_adapter
from milora.chain import verify_chain
from milora.layout import (
    CHAIN_RECORD,
    INITIAL_ADAPTER,
    PARENT_RECORD,
    RAW_ADAPTER,
    SERVED_ADAPTER,
    START_WEIGHTS,
    SUMMARY,
)
from milora.modeling import load_base_model
from milora.records import Decision
from milora.settings import Settings
from tasks import registry
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.lineage import parent_outdated
from tasks.parent import fetch_parent
from tasks.register import promote, register, rollback
from tasks.train import train
from tasks.validate import validate

MONTH_ROWS = {1: (0, 24), 2: (30, 42), 3: (42, 52)}  # company_conversations slices, one drop a month
STRATEGY = {2: "refold", 3: "continue"}


def lineage(month: int) -> dict[str, str]:
    return {
        "data_version": f"{month}".rjust(32, "d") + ".dir",
        "adapter_version": f"{month}".rjust(32, "a") + ".dir",
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "params_hash": f"{month}".rjust(64, "9"),
        "raw_data_hash": f"{month}".rjust(64, "0"),
    }


def run_month(settings: Settings, month: int, folder: Path, **overrides) -> tuple[Settings, dict, dict]:
    """One scheduled month by the stages: ingest, validate, parent, train, evaluate, register,
    promote; the run folder is kept in ``folder`` (the next month replaces the project's)."""
    start, stop = MONTH_ROWS[month]
    write_jsonl(
        settings.root / f"drop{month}.jsonl", [{"messages": m} for m in company_conversations(stop)[start:]]
    )
    settings = settings.with_overrides(
        {
            "ingest.sources": ["drop.jsonl", *[f"drop{m}.jsonl" for m in range(2, month + 1)]],
            "train.from_champion.strategy": STRATEGY.get(month, "refold"),
            **overrides,
        }
    )
    ingest(settings)
    validate(settings)
    parent = fetch_parent(settings)
    summary = train(settings)
    evaluate(settings)
    registration = register(settings, lineage(month))
    decision = promote(settings, registration["version"])
    shutil.copytree(settings.path(settings.train.run_dir), folder / f"month{month}")
    shutil.copytree(settings.path(settings.train.parent_dir), folder / f"parent{month}")
    return settings, {"parent": parent, "summary": summary, **registration}, decision


@pytest.fixture(scope="module")
def chain(tmp_path_factory, chat_model_dir):
    with pytest.MonkeyPatch.context() as env:  # never a developer's tracking server
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_REGISTRY_URI", raising=False)
        root = tmp_path_factory.mktemp("chain-project")
        env.chdir(root)
        settings = stage_settings(
            root,
            chat_model_dir,
            **{
                "train.cache_dir": None,
                "train.rank": 4,
                "train.start": "champion",
                "train.from_champion": {"profile": "tiny", "earlier_share": 0.5},
                "evaluate.cache_dir": None,
                "registry.tracking_uri": "sqlite:///mlflow.db",
                "registry.artifact_location": "mlartifacts",
                # The tiny model learns little in 4 steps: the gate's own rules are tested elsewhere.
                "registry.gate": {"min_primary_gain": -1.0, "max_forgetting": 1.0, "tolerance": 1.0},
            },
        )
        kept = root / "kept"
        months = {}
        for month in (1, 2, 3):
            settings, months[month], decision = run_month(settings, month, kept)
            assert decision["decision"] == Decision.PROMOTED, decision
        yield settings, months, kept


def version_tags(settings: Settings, number: str) -> dict[str, str]:
    client = MlflowClient(registry.tracking_uri(settings))
    return client.get_model_version(settings.registry.model_name, number).tags


def test_the_first_month_starts_from_the_stock_base(chain):
    settings, months, kept = chain
    assert months[1]["parent"] == {"start": "base", "why": "no champion yet"}
    record = json.loads((kept / "month1" / CHAIN_RECORD).read_text())
    assert record["start"] == "base" and len(record["dataset_rows"]) == months[1]["summary"]["examples"]
    assert not (kept / "month1" / START_WEIGHTS).exists()
    assert version_tags(settings, months[1]["version"])["start"] == "base"


def test_each_later_month_trains_on_what_is_new_plus_a_sample_of_earlier_rows(chain):
    _, months, kept = chain
    for month in (2, 3):
        summary = months[month]["summary"]
        new = MONTH_ROWS[month][1] - MONTH_ROWS[month][0]
        earlier = json.loads((kept / f"month{month - 1}" / CHAIN_RECORD).read_text())["dataset_rows"]
        assert summary["start"] == STRATEGY[month]
        assert summary["parent_version"] == months[month - 1]["version"]
        # Every new row of the training split (validation holds a few) and half the earlier ones.
        assert 0 < summary["rows_new"] <= new and summary["earlier_total"] == len(earlier)
        assert summary["rows_earlier"] == round(0.5 * len(earlier))
        assert summary["examples"] == summary["rows_new"] + summary["rows_earlier"]


@pytest.mark.parametrize("month", [2, 3])
def test_a_run_from_the_registered_champion_starts_as_the_champion(chain, month):
    """The run's initial model (its start weights folded into the stock base, then its saved
    step-0 adapter) computes what the champion, as registered, computes: within 1e-5."""
    settings, _, kept = chain
    base = settings.path(settings.base_model)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(month))
    champion = load_adapter(load_base_model(base), kept / f"parent{month}" / SERVED_ADAPTER)
    weights = merge_adapter(load_base_model(base), kept / f"month{month}" / START_WEIGHTS)
    initial = load_adapter(weights, kept / f"month{month}" / INITIAL_ADAPTER)
    stock = load_base_model(base)
    assert rel(logits(initial, ids), logits(champion, ids)) < 1e-5
    assert rel(logits(stock, ids), logits(champion, ids)) > 1e-4  # the champion is not the base


def test_the_served_adapter_is_the_whole_chain_exact_on_the_stock_base(chain):
    """After three runs (base, refold, continue) the registered adapter is one plain LoRA for
    the stock base: equal (1e-4) to the chain applied in turn, and ``milora verify``'s check
    of a chained adapter agrees."""
    settings, _, kept = chain
    base = settings.path(settings.base_model)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(7))
    month1, month3 = kept / "month1", kept / "month3"
    # Month 3 continued month 2's adapter on the weights month 2 started from (month 1 folded in).
    in_turn = load_adapter(
        merge_adapter(load_base_model(base), month1 / SERVED_ADAPTER), month3 / RAW_ADAPTER
    )
    served = load_adapter(load_base_model(base), month3 / SERVED_ADAPTER)
    assert rel(logits(served, ids), logits(in_turn, ids)) < 1e-4
    assert verify_chain(lambda: load_base_model(base), month3 / SERVED_ADAPTER, ids) < 1e-4
    config = json.loads((month3 / SERVED_ADAPTER / "adapter_config.json").read_text())
    assert config["r"] == 8 + 8  # month 1's delta (2r) + the continued adapter's (2r), stacked


def test_the_registry_records_each_versions_parent_strategy_and_rows(chain):
    settings, months, _ = chain
    for month in (2, 3):
        tags = version_tags(settings, months[month]["version"])
        summary = months[month]["summary"]
        assert tags["parent_version"] == months[month - 1]["version"]
        assert tags["start"] == STRATEGY[month]
        assert (tags["rows_new"], tags["rows_earlier"]) == (
            str(summary["rows_new"]),
            str(summary["rows_earlier"]),
        )
        assert tags["earlier_share"] == "0.5" and tags["start_weights_rank"] == "8"
    # A registered version is all a later run needs: fetching version 2 by number gives the
    # adapters month 3 started from.
    fetched = fetch_parent(settings, months[2]["version"])
    assert fetched["version"] == months[2]["version"]
    parent = settings.path(settings.train.parent_dir)
    assert (parent / SERVED_ADAPTER / "adapter_model.safetensors").read_bytes() == (
        Path(chain[2]) / "parent3" / SERVED_ADAPTER / "adapter_model.safetensors"
    ).read_bytes()


def test_rollback_resets_where_the_chain_starts(chain):
    settings, months, _ = chain
    fetch_parent(settings)  # the champion now: month 3
    assert not parent_outdated(settings)
    rolled = rollback(settings)
    assert rolled["champion"] == months[2]["version"]
    assert parent_outdated(settings)  # the fetched parent is no longer the champion
    assert fetch_parent(settings)["version"] == months[2]["version"]
    record = json.loads((settings.path(settings.train.parent_dir) / PARENT_RECORD).read_text())
    assert record["version"] == months[2]["version"] and not parent_outdated(settings)
    promote(settings, months[3]["version"], force=True, reason="back to month 3 for the next test")


def test_a_served_rank_limit_reports_its_error_and_the_gate_holds_it(chain):
    """serve_rank 4 truncates the chain's rank-16 sum: the error is in the summary and the
    registry's metrics, and a version over max_compression_error is not promoted."""
    settings, months, _ = chain
    settings = settings.with_overrides(
        {"train.serve_rank": 4, "registry.gate.max_compression_error": 1e-6, "train.run_dir": "run-limited"}
    )
    fetch_parent(settings)
    summary = train(settings)
    assert summary["served_rank"] == 4 and summary["compression_error"] > 1e-6
    written = json.loads((settings.root / "run-limited" / SUMMARY).read_text())
    assert written["compression_error"] == summary["compression_error"]
    evaluate(settings)
    registration = register(settings, lineage(4))
    decision = promote(settings, registration["version"])
    assert decision["decision"] == Decision.REJECTED
    assert any("served adapter truncated to rank 4" in r and "FAILED" in r for r in decision["reasons"])
    assert decision["champion"] == months[3]["version"]  # the champion stays
