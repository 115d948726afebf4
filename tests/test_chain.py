"""Adapters in a chain (milora.chain): three months, each refolded onto the last, served as one
plain LoRA on the stock base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import logits, pretend_training, rel, tiny_llama
from peft import PeftModel

from milora import init_adapter, load_adapter, merge_adapter, save_adapter
from milora.chain import CHAIN_KEY, chain_adapters


@pytest.fixture(scope="module")
def months(tmp_path_factory):
    """(stock base, the three saved adapters, the last month's logits): each month merges the
    last into the weights and initialises MiLoRA afresh in the merged weights' minor subspace."""
    root = tmp_path_factory.mktemp("chain")
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    current, saved = copy.deepcopy(base), []
    for month in range(3):
        model = init_adapter(copy.deepcopy(current), method="milora", r=4)
        pretend_training(model, seed=month + 1, size=3.0)
        expected = logits(model, ids)
        saved.append(save_adapter(model, root / f"month{month}"))
        current = merge_adapter(copy.deepcopy(current), saved[-1])
        assert rel(logits(current, ids), expected) < 1e-5  # the refolded weights are that model
    return base, saved, expected, ids, root


def test_the_chain_is_one_exact_plain_lora_for_the_stock_base(months):
    base, saved, expected, ids, root = months
    report = chain_adapters(saved, root / "served")
    assert report.rank == 3 * 8 and not report.errors  # each month's delta has rank 2r
    served = PeftModel.from_pretrained(copy.deepcopy(base), root / "served")
    assert rel(logits(served, ids), expected) < 1e-4
    assert rel(logits(base, ids), expected) > 100 * rel(logits(served, ids), expected)  # it changed the model
    manifest = json.loads((root / "served" / "milora.json").read_text())
    assert len(manifest[CHAIN_KEY]) == 3 and manifest["has_initial_factors"] is False


def test_a_servers_rank_limit_truncates_with_the_error_reported(months):
    base, saved, expected, ids, root = months
    errors = {}
    for rank in (16, 8):
        report = chain_adapters(saved, root / f"served-r{rank}", serve_rank=rank)
        assert report.rank == rank and set(report.errors) and report.max_error > 0
        served = PeftModel.from_pretrained(copy.deepcopy(base), root / f"served-r{rank}")
        errors[rank] = rel(logits(served, ids), expected)
    assert errors[16] < errors[8]


def test_adapters_of_other_layers_do_not_chain(months, tmp_path):
    base, saved, *_ = months
    other = init_adapter(copy.deepcopy(base), method="milora", r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="same layers"):
        chain_adapters([saved[0], save_adapter(other, tmp_path / "q")], tmp_path / "out")


@pytest.mark.parametrize("strategy", ["continue", "refold"])
def test_a_run_from_the_champion_starts_as_the_champion(months, strategy):
    """Before training, either start computes what the champion computes (within 1e-5)."""
    from milora import AdapterSpec
    from milora.chain import start_from_champion
    from milora.initialize import lora_layers

    base, saved, _, ids, _ = months
    champion = saved[0]
    expected = logits(load_adapter(copy.deepcopy(base), champion), ids)
    spec = AdapterSpec("milora", 4) if strategy == "refold" else None
    model = start_from_champion(copy.deepcopy(base), champion, strategy, spec)
    assert rel(logits(model.eval(), ids), expected) < 1e-5 and rel(logits(base, ids), expected) > 1e-3
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(len(layer.lora_A) == 1 for layer in lora_layers(model).values())


def test_a_start_is_checked():
    from milora import AdapterSpec
    from milora.chain import start_from_champion

    with pytest.raises(ValueError, match="not one of"):
        start_from_champion(tiny_llama(), "x", "restart")
    with pytest.raises(ValueError, match="cannot change"):
        start_from_champion(tiny_llama(), "x", "continue", AdapterSpec("milora", 8))


def test_the_command_line_chains_and_verify_checks_the_chain(months, tmp_path):
    """`milora chain A B C --out D` then `milora verify BASE D`: the chained adapter on the
    stock base against the chain merged in turn, within the tolerance."""
    from typer.testing import CliRunner

    from milora.chain import CHAIN_VS_MERGED
    from milora.cli import app

    base, saved, *_ = months
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    runner = CliRunner()
    made = runner.invoke(app, ["chain", *map(str, saved), "--out", str(tmp_path / "served")])
    assert made.exit_code == 0, made.output
    assert "r=24" in made.output and "(exact)" in made.output
    checked = runner.invoke(app, ["verify", str(tmp_path / "base"), str(tmp_path / "served")])
    assert checked.exit_code == 0, checked.output
    assert CHAIN_VS_MERGED in checked.output and "OK" in checked.output
    # A chain missing its last month is not the chain it claims to be.
    runner.invoke(app, ["chain", *map(str, saved[:2]), "--out", str(tmp_path / "short")])
    manifest = json.loads((tmp_path / "short" / "milora.json").read_text())
    (tmp_path / "short" / "milora.json").write_text(
        json.dumps({**manifest, "chain": manifest["chain"] + [str(saved[2])]})
    )
    failed = runner.invoke(app, ["verify", str(tmp_path / "base"), str(tmp_path / "short")])
    assert failed.exit_code == 1 and "FAILED" in failed.output


def test_a_run_from_the_champion_trains_on_what_changed_and_a_seeded_sample_of_the_rest():
    from milora.chain import conversation_digest, rows_since

    def chat(i, answer="yes"):
        return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]

    parent = {conversation_digest(chat(i)) for i in range(10)}  # the champion's dataset: q0..q9
    # Now: q0..q7 still valid, q8 superseded (new answer), q9 retired (gone), q10..q12 new.
    current = [chat(i) for i in range(8)] + [chat(8, "no")] + [chat(i) for i in range(10, 13)]
    since = rows_since(current, parent, 0.5, seed=1)
    assert since.new == [chat(8, "no"), chat(10), chat(11), chat(12)]
    assert since.earlier_total == 8 and len(since.earlier) == 4
    assert all(row in current[:8] for row in since.earlier)  # in the dataset's order, never a stale row
    assert since.earlier == [c for c in current[:8] if c in since.earlier]
    assert rows_since(current, parent, 0.5, seed=1) == since  # seeded: the same sample
    assert rows_since(current, parent, 0.5, seed=2).earlier != since.earlier
    assert rows_since(current, parent, 0.0, seed=1).rows == since.new
    assert len(rows_since(current, parent, 1.0, seed=1).rows) == 12
