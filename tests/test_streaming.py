"""SVD init streamed from a sharded safetensors checkpoint (milora.streaming): the same adapter
as init_adapter on the loaded model, without loading it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import give_decaying_spectra, logits, rel, tiny_llama

from milora import AdapterSpec, init_adapter, load_adapter, save_adapter
from milora.adapter_io import read_adapter
from milora.cache import DecompositionCache
from milora.streaming import checkpoint_files, init_streamed, target_weights


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny LLaMA saved in several safetensors shards (an index file, like a 7B checkpoint)."""
    path = tmp_path_factory.mktemp("sharded") / "llama"
    model = give_decaying_spectra(tiny_llama(seed=3))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    return path, model


@pytest.mark.parametrize("method", ["milora", "pissa"])
def test_streamed_init_writes_the_in_memory_inits_adapter(sharded, tmp_path, method, input_ids):
    path, model = sharded
    assert len(checkpoint_files(path)) > 2  # really sharded
    spec = AdapterSpec(method, 4, target_modules=("q_proj", "v_proj", "down_proj"))
    state = init_streamed(path, spec, tmp_path / "streamed", progress=False)
    in_memory = init_adapter(copy.deepcopy(model), spec, progress=False)
    save_adapter(in_memory, tmp_path / "loaded")
    streamed, config = read_adapter(tmp_path / "streamed")
    expected, expected_config = read_adapter(tmp_path / "loaded")
    assert streamed.keys() == expected.keys() and len(state.factors) == 2 * 3  # two layers
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    for field in ("r", "lora_alpha", "target_modules", "fan_in_fan_out", "peft_type", "task_type"):
        assert config[field] == expected_config[field], field
    manifest = json.loads((tmp_path / "streamed" / "milora.json").read_text())
    assert manifest["has_initial_factors"] and manifest["streamed"] and manifest["method"] == method
    # On the stock base it computes what the base computes (the residual is formed at load).
    loaded = load_adapter(copy.deepcopy(model), tmp_path / "streamed")
    assert rel(logits(loaded, input_ids), logits(model, input_ids)) < 1e-5


def test_streamed_init_uses_the_decomposition_cache_and_refuses_what_it_cannot_stream(sharded, tmp_path):
    path, _ = sharded
    cache = DecompositionCache(tmp_path / "cache")
    spec = AdapterSpec("milora", 4)
    first = init_streamed(path, spec, tmp_path / "a", cache=cache, progress=False)
    second = init_streamed(path, spec, tmp_path / "b", cache=cache, progress=False)
    assert first.cache_hits == 0 and second.cache_hits == len(target_weights(path, spec.target_modules))
    with pytest.raises(ValueError, match="random factors"):
        init_streamed(path, AdapterSpec("lora", 4), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="no 2-D weight"):
        init_streamed(path, AdapterSpec("milora", 4, target_modules=("nope_proj",)), tmp_path / "d")
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_milora_init_streamed_on_the_command_line(sharded, tmp_path):
    from typer.testing import CliRunner

    from milora.cli import app

    path, _ = sharded
    runner = CliRunner()
    done = runner.invoke(app, ["init", str(path), str(tmp_path / "s"), "-r", "4", "--streamed"])
    assert done.exit_code == 0, done.output
    made = runner.invoke(app, ["init", str(path), str(tmp_path / "m"), "-r", "4"])
    assert made.exit_code == 0, made.output
    streamed, _ = read_adapter(tmp_path / "s")
    loaded, _ = read_adapter(tmp_path / "m")
    assert all(torch.equal(streamed[k], loaded[k]) for k in loaded)
    checked = runner.invoke(app, ["verify", str(path), str(tmp_path / "s")])
    assert checked.exit_code == 0, checked.output
