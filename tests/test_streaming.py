"""SVD init streamed from a sharded safetensors checkpoint (milora.streaming): the same adapter
as init_adapter on the loaded model, without loading it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import give_decaying_spectra, logits, rel, tiny_llama

from milora import AdapterSpec, init_adapter, load_adapter, save_adapter
from milora.adapter_io import read_adapter
from milora.cache import DecompositionCache
from milora.config import DEFAULT_TARGETS
from milora.streaming import checkpoint_files, init_streamed, target_weights
from milora.targets import TargetError


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
    with pytest.raises(
        TargetError, match=r"\['nope_proj'\] not found among .* adaptable names are \[.*'q_proj'"
    ):
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


# --------------------------------------------------------------------------- several processes
SHARED_INIT = """
import sys, torch
from safetensors.torch import save_file
from milora import AdapterSpec, init_adapter
from milora.cache import DecompositionCache
from milora.modeling import load_base_model
from milora.sharding import process_group
from milora.streaming import init_streamed

base, out, cache = sys.argv[1:4]
spec = AdapterSpec("milora", 4)
with process_group() as (rank, size):
    assert size == 2
    streamed = init_streamed(base, spec, out, cache=DecompositionCache(cache), progress=False)
    loaded = init_adapter(load_base_model(base), spec, progress=False).milora_init
    save_file(
        {f"{how}/{name}/{i}": f.contiguous().to(torch.float32)
         for how, state in (("streamed", streamed), ("loaded", loaded))
         for name, pair in state.factors.items() for i, f in enumerate(pair)},
        f"{out}-rank{rank}.safetensors",
    )
"""


def test_plan_shares_matrices_out_by_cost():
    from milora.sharding import decomposition_cost, plan

    shapes = {f"layers.{i}.{m}": s for i in range(4) for m, s in
              (("q_proj", (4096, 4096)), ("up_proj", (11008, 4096)), ("down_proj", (4096, 11008)))}  # fmt: skip
    owners = plan(shapes, 3)
    assert owners == plan(dict(reversed(shapes.items())), 3)  # the same plan whatever the order
    loads = [sum(decomposition_cost(shapes[n]) for n, r in owners.items() if r == rank) for rank in range(3)]
    assert max(loads) - min(loads) <= max(map(decomposition_cost, shapes.values()))
    assert set(plan(shapes, 1).values()) == {0}


def test_two_processes_share_the_init_and_hold_the_same_factors(sharded, tmp_path):
    """torchrun, 2 CPU processes on gloo: each matrix decomposed by one process, every process
    holds the factors one process computes, streamed and on the loaded model alike."""
    from conftest import free_port
    from safetensors.torch import load_file

    path, _ = sharded
    script = tmp_path / "shared_init.py"
    script.write_text(SHARED_INIT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(script), str(path), str(tmp_path / "two"), str(tmp_path / "cache"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"two-rank{rank}.safetensors") for rank in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process ran
    try:
        one = init_streamed(path, AdapterSpec("milora", 4), tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    matrices = target_weights(path, DEFAULT_TARGETS)
    assert len(ranks[0]) == len(ranks[1]) == 2 * 2 * len(matrices)
    for name, pair in one.factors.items():
        for i, expected in enumerate(pair):
            for how in ("streamed", "loaded"):
                key = f"{how}/{name}/{i}"
                assert torch.equal(ranks[0][key], expected) and torch.equal(ranks[1][key], expected), key
    manifest = json.loads((tmp_path / "two" / "milora.json").read_text())
    per_process = manifest["matrices_per_process"]
    assert sum(per_process) == len(matrices) and min(per_process) > 0  # each matrix once
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(matrices)
    two, _ = read_adapter(tmp_path / "two")
    single, _ = read_adapter(tmp_path / "one")
    assert all(torch.equal(two[k], single[k]) for k in single)


def test_streamed_targets_follow_peft_s_suffix_rule(sharded, tmp_path):
    path, _ = sharded
    dotted = target_weights(path, ("self_attn.q_proj", "mlp.down_proj"))
    assert dotted and all(n.endswith(("self_attn.q_proj", "mlp.down_proj")) for n in dotted)
    assert dotted.keys() == target_weights(path, ("q_proj", "down_proj")).keys()
