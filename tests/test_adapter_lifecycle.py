"""Save, reload, convert for the stock base, compress and merge, after (simulated) training."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat

import pytest
import torch
from conftest import logits, pretend_training, rel, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

import milora.adapter_io as adapter_io
from milora import compress_adapter, convert_adapter, init_adapter, load_adapter, merge_adapter, save_adapter
from milora.adapter_io import factor_keys, layer_names
from milora.conversion import compress_factors
from milora.initialize import lora_layers
from milora.layout import INITIAL_DIR


@pytest.fixture(params=["milora", "pissa"])
def trained(request, tmp_path):
    """(stock base, trained in-memory model, its saved folder)."""
    base = tiny_llama()
    model = init_adapter(copy.deepcopy(base), method=request.param, r=8)
    pretend_training(model, seed=1)
    out = save_adapter(model, tmp_path / "adapter", base_model="tiny-llama")
    return base, model, out


def test_saved_folder_is_a_peft_adapter_with_initial_factors(trained):
    _, model, out = trained
    assert {"adapter_config.json", "adapter_model.safetensors", "milora.json"} <= {
        p.name for p in out.iterdir()
    }
    manifest = json.loads((out / "milora.json").read_text())
    assert manifest["method"] == model.milora_init.spec.method and manifest["has_initial_factors"]
    initial = load_file(out / INITIAL_DIR / "adapter_model.safetensors")
    for name, (A0, B0) in model.milora_init.factors.items():
        key_a, key_b = factor_keys(name)
        assert torch.equal(initial[key_a], A0) and torch.equal(initial[key_b], B0)


def test_reload_on_stock_base_reproduces_the_model(trained, input_ids):
    base, model, out = trained
    reloaded = load_adapter(copy.deepcopy(base), out)
    assert torch.equal(logits(reloaded, input_ids), logits(model, input_ids))
    # The rebuilt residual is bit-identical to the one made at initialisation.
    for name, layer in lora_layers(reloaded).items():
        assert torch.equal(layer.get_base_layer().weight, lora_layers(model)[name].get_base_layer().weight)


def test_converted_adapter_serves_on_the_stock_base(trained, input_ids, tmp_path):
    base, model, out = trained
    converted = convert_adapter(out, tmp_path / "plain")
    config = json.loads((converted / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 2 * model.peft_config["default"].lora_alpha
    served = PeftModel.from_pretrained(copy.deepcopy(base), converted)  # plain PEFT, stock base
    assert rel(logits(served, input_ids), logits(model, input_ids)) <= 1e-4


def test_conversion_agrees_with_peft_own(trained, tmp_path):
    _, model, out = trained
    init_copy = tmp_path / "init_copy"
    shutil.copytree(out / INITIAL_DIR, init_copy)  # PEFT rewrites this folder's config
    model.save_pretrained(
        tmp_path / "peft_converted", path_initial_model_for_weight_conversion=str(init_copy)
    )
    theirs = load_file(tmp_path / "peft_converted" / "adapter_model.safetensors")
    ours = load_file(convert_adapter(out, tmp_path / "ours") / "adapter_model.safetensors")
    for name in layer_names(ours):
        key_a, key_b = factor_keys(name)
        torch.testing.assert_close(
            ours[key_b] @ ours[key_a], theirs[key_b] @ theirs[key_a], rtol=1e-5, atol=1e-6
        )


def test_initial_factors_survive_a_resumed_run(trained, input_ids, tmp_path):
    base, model, out = trained
    resumed = load_adapter(copy.deepcopy(base), out, is_trainable=True)
    pretend_training(resumed, seed=2)
    again = save_adapter(resumed, tmp_path / "resumed")
    for name, (A0, B0) in model.milora_init.factors.items():
        assert torch.equal(resumed.milora_init.factors[name][0], A0)
        assert torch.equal(resumed.milora_init.factors[name][1], B0)
    served = PeftModel.from_pretrained(copy.deepcopy(base), convert_adapter(again, tmp_path / "plain"))
    assert rel(logits(served, input_ids), logits(resumed.eval(), input_ids)) <= 1e-4


def test_compression_is_the_best_low_rank_update(trained, input_ids, tmp_path):
    base, model, out = trained
    converted = convert_adapter(out, tmp_path / "plain")
    lossless = compress_adapter(converted, tmp_path / "r16", rank=16)
    assert lossless.max_error < 1e-6
    served = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r16")
    assert rel(logits(served, input_ids), logits(model, input_ids)) <= 1e-4
    report = compress_adapter(converted, tmp_path / "r4", rank=4)
    assert 0 < report.max_error < 1
    state = load_file(converted / "adapter_model.safetensors")
    name = layer_names(state)[0]
    key_a, key_b = factor_keys(name)
    update = (state[key_b] @ state[key_a]).double()
    S = torch.linalg.svdvals(update)
    assert report.errors[name] == pytest.approx(
        (S[4:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-6
    )
    A4, B4, _ = compress_factors(state[key_a], state[key_b], 4)
    U, S, Vh = torch.linalg.svd(update)
    torch.testing.assert_close((B4 @ A4).double(), (U[:, :4] * S[:4]) @ Vh[:4], rtol=1e-4, atol=1e-6)


def test_merged_model_matches_the_adapter(trained, input_ids, tmp_path):
    base, model, out = trained
    merged = merge_adapter(copy.deepcopy(base), out)
    assert not isinstance(merged, PeftModel)
    assert rel(logits(merged, input_ids), logits(model, input_ids)) <= 1e-4
    merged_plain = merge_adapter(copy.deepcopy(base), convert_adapter(out, tmp_path / "plain"))
    assert rel(logits(merged_plain, input_ids), logits(model, input_ids)) <= 1e-4


def test_save_is_all_or_nothing(tmp_path, monkeypatch):
    model = init_adapter(tiny_llama(), method="milora", r=4)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_adapter(model, tmp_path / "a")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "write_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    _, _, out = trained
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(ValueError, match="which this base model lacks"):
        load_adapter(other, out)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_adapters_and_cache_entries_follow_the_umask(tmp_path, umask):
    """Like any tool: a serving process of another user reads them unless the umask says no."""
    from milora import DecompositionCache

    previous = os.umask(umask)
    try:
        model = init_adapter(tiny_llama(), method="milora", r=4, cache=DecompositionCache(tmp_path / "cache"))
        save_adapter(model, tmp_path / "adapter")
        convert_adapter(tmp_path / "adapter", tmp_path / "served")
    finally:
        os.umask(previous)
    folders, files = 0o777 & ~umask, 0o666 & ~umask
    for root in ("adapter", "served", "cache"):
        written = [tmp_path / root, *(tmp_path / root).rglob("*")]
        assert len(written) > 2
        for path in written:
            expected = folders if path.is_dir() else files
            assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
