"""Per-layer ranks (PEFT's rank_pattern / alpha_pattern) kept exact through init, save/load,
streaming, conversion to plain LoRA, compression, merge and chained serving."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace

import pytest
import torch
from conftest import logits, pretend_training, rel, tiny_llama
from peft import PeftModel
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from milora import AdapterSpec, compress_adapter, convert_adapter, init_adapter, load_adapter, merge_adapter
from milora.adapter_io import AdapterFolderError, check_adapter_folder, save_adapter, spec_from_manifest
from milora.chain import start_from_champion, write_served
from milora.initialize import lora_layers
from milora.targets import TargetError

TARGETS = ("q_proj", "v_proj", "down_proj")
# v_proj everywhere at 2, one down_proj at 6, the rest at r = 4.
PATTERN = {"v_proj": 2, "model.layers.1.mlp.down_proj": 6}
RANKS = {
    "model.layers.0.self_attn.q_proj": 4,
    "model.layers.0.self_attn.v_proj": 2,
    "model.layers.0.mlp.down_proj": 4,
    "model.layers.1.self_attn.q_proj": 4,
    "model.layers.1.self_attn.v_proj": 2,
    "model.layers.1.mlp.down_proj": 6,
}


def spec(method: str = "milora", **changes) -> AdapterSpec:
    return AdapterSpec(method, 4, target_modules=TARGETS, rank_pattern=PATTERN, **changes)


def plain_ranks(folder) -> dict[str, int]:
    state = load_file(folder / "adapter_model.safetensors")
    suffix = ".lora_A.weight"
    return {
        k.removeprefix("base_model.model.")[: -len(suffix)]: t.shape[0]
        for k, t in state.items()
        if k.endswith(suffix)
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(stock base, ids, the adapter model after a pretend training step, its saved folder)."""
    root = tmp_path_factory.mktemp("pattern")
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    model = init_adapter(copy.deepcopy(base), spec(), progress=False)
    assert rel(logits(model, ids), logits(base, ids)) < 1e-5  # before training: the base
    pretend_training(model, seed=1, size=3.0)
    return base, ids, model.eval(), save_adapter(model, root / "adapter")


def test_the_spec_resolves_layers_as_peft_does():
    s = spec()
    assert s.rank_pattern == (("model.layers.1.mlp.down_proj", 6), ("v_proj", 2))  # sorted pairs
    assert s == AdapterSpec("milora", 4, target_modules=TARGETS, rank_pattern=dict(reversed(PATTERN.items())))
    assert dict(s.alpha_pattern) == {"v_proj": 2.0, "model.layers.1.mlp.down_proj": 6.0}  # scale 1 everywhere
    hash(s)  # still a frozen, hashable value
    for name, rank in RANKS.items():
        assert s.rank_of(name) == rank and s.scale_of(name) == 1.0
        key = get_pattern_key(list(dict(s.rank_pattern)), name)
        assert dict(s.rank_pattern).get(key, s.r) == rank  # PEFT's own resolution
    assert AdapterSpec("lora", 4, rank_pattern={"v_proj": 2}).scale_of("a.v_proj") == 2.0  # lora keeps 2
    explicit = AdapterSpec("milora", 4, lora_alpha=4.0, rank_pattern={"v_proj": 2})
    assert explicit.alpha_pattern == () and explicit.scale_of("a.v_proj") == 2.0  # PEFT's meaning of alpha
    plain = AdapterSpec("milora", 4)
    assert plain.for_layer("x") is plain and plain.patterns() == {} and plain.scale_of("x") == plain.scale
    # asdict (what a run key hashes) holds the classic fields only: unchanged for specs without patterns.
    classic = {"method", "r", "lora_alpha", "target_modules", "lora_dropout", "solver"}
    assert set(asdict(plain)) == set(asdict(s)) == classic and s != plain
    assert (
        replace(s, r=8).rank_pattern == s.rank_pattern
        and "rank_pattern" in repr(s)
        and "pattern" not in repr(plain)
    )
    for bad in ({"v_proj": 0}, {"v_proj": 2.5}, {"": 2}, {"v_proj": True}, {"(": 2}):
        with pytest.raises(ValueError):
            AdapterSpec("milora", 4, rank_pattern=bad)
    with pytest.raises(ValueError, match="alpha_pattern"):
        AdapterSpec("milora", 4, alpha_pattern={"v_proj": -1.0})


def test_init_gives_each_layer_its_rank_and_the_base_unchanged(trained):
    _, _, model, folder = trained
    layers = lora_layers(model)
    assert {name: layer.lora_A["default"].weight.shape[0] for name, layer in layers.items()} == RANKS
    assert {name: layer.lora_B["default"].weight.shape[1] for name, layer in layers.items()} == RANKS
    assert all(layer.scaling["default"] == 1.0 for layer in layers.values())
    assert all(A0.shape[0] == RANKS[n] for n, (A0, _) in model.milora_init.factors.items())
    config = json.loads((folder / "adapter_config.json").read_text())
    manifest = json.loads((folder / "milora.json").read_text())
    assert config["rank_pattern"] == manifest["rank_pattern"] == PATTERN
    assert config["alpha_pattern"] == manifest["alpha_pattern"] == {k: float(v) for k, v in PATTERN.items()}
    assert spec_from_manifest(manifest) == spec()


def test_save_and_load_round_trip_exactly(trained):
    base, ids, model, folder = trained
    loaded = load_adapter(copy.deepcopy(base), folder)
    assert loaded.milora_init.spec == spec()
    for name, layer in lora_layers(loaded).items():  # the residual rebuilt bit for bit, per layer
        original = lora_layers(model)[name]
        assert torch.equal(layer.get_base_layer().weight, original.get_base_layer().weight), name
        assert torch.equal(layer.lora_A["default"].weight, original.lora_A["default"].weight), name
    assert torch.equal(logits(loaded.eval(), ids), logits(model, ids))


def test_conversion_and_merge_on_the_stock_base(trained, tmp_path):
    base, ids, model, folder = trained
    expected = logits(model, ids)
    assert rel(logits(base, ids), expected) > 1e-3  # training changed the model
    plain = convert_adapter(folder, tmp_path / "plain")
    config = json.loads((plain / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {k: 2 * v for k, v in PATTERN.items()}
    assert plain_ranks(plain) == {name: 2 * r for name, r in RANKS.items()}
    check_adapter_folder(plain, json.loads((plain / "milora.json").read_text()))
    served = PeftModel.from_pretrained(copy.deepcopy(base), plain)
    assert {
        n: lay.lora_A["default"].weight.shape[0] for n, lay in lora_layers(served).items()
    } == plain_ranks(plain)
    assert rel(logits(served, ids), expected) < 1e-5
    assert rel(logits(merge_adapter(copy.deepcopy(base), folder), ids), expected) < 1e-5
    assert rel(logits(merge_adapter(copy.deepcopy(base), plain), ids), expected) < 1e-5


def test_compression_to_a_rank_between_the_patterns_ranks(trained, tmp_path):
    base, ids, model, folder = trained
    plain = convert_adapter(folder, tmp_path / "plain")  # layer ranks 4, 8 and 12
    report = compress_adapter(plain, tmp_path / "r6", 6)
    source, compressed = (
        load_file(plain / "adapter_model.safetensors"),
        load_file(tmp_path / "r6" / "adapter_model.safetensors"),
    )
    assert plain_ranks(tmp_path / "r6") == {name: min(6, 2 * r) for name, r in RANKS.items()}
    for name, r in RANKS.items():
        if 2 * r <= 6:  # already within the rank: kept exactly
            assert report.errors[name] == 0.0
            assert all(torch.equal(compressed[k], source[k]) for k in source if f".{name}." in f".{k}")
        else:
            assert report.errors[name] > 0
    served = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r6")  # shapes and scales load
    assert all(layer.scaling["default"] == 1.0 for layer in lora_layers(served).values())
    assert 0 < rel(logits(served, ids), logits(model, ids)) < rel(logits(base, ids), logits(model, ids))
    lossless = compress_adapter(plain, tmp_path / "r12", 12)
    assert lossless.max_error < 1e-6
    whole = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r12")
    assert rel(logits(whole, ids), logits(model, ids)) < 1e-5


def test_streamed_init_equals_the_in_memory_init_bit_for_bit(tmp_path):
    from milora.adapter_io import read_adapter
    from milora.streaming import init_streamed

    base = tiny_llama(seed=3)
    base.save_pretrained(tmp_path / "base", safe_serialization=True, max_shard_size="60KB")
    init_streamed(tmp_path / "base", spec("pissa"), tmp_path / "streamed", progress=False)
    save_adapter(init_adapter(copy.deepcopy(base), spec("pissa"), progress=False), tmp_path / "loaded")
    for sub in ("", "initial"):
        streamed, config = read_adapter(tmp_path / "streamed" / sub)
        expected, expected_config = read_adapter(tmp_path / "loaded" / sub)
        assert streamed.keys() == expected.keys()
        assert all(torch.equal(streamed[k], expected[k]) for k in expected)
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"):
            assert config[key] == expected_config[key], key
    manifest = json.loads((tmp_path / "streamed" / "milora.json").read_text())
    assert spec_from_manifest(manifest) == spec("pissa")


def test_two_runs_with_patterns_chain_into_one_plain_lora(trained, tmp_path):
    """Run 2 refolds run 1's served adapter and starts afresh with another pattern; its served
    adapter (chained) is one plain LoRA for the stock base whose layer ranks add up."""
    base, ids, _, folder = trained
    first = write_served(folder, tmp_path / "served1")
    assert first.rank == 12
    second_spec = AdapterSpec("milora", 2, target_modules=TARGETS, rank_pattern={"q_proj": 3})
    model = start_from_champion(
        copy.deepcopy(base), tmp_path / "served1", "refold", second_spec, progress=False
    )
    pretend_training(model, seed=2, size=3.0)
    expected = logits(model.eval(), ids)
    second = save_adapter(model, tmp_path / "adapter2")
    report = write_served(second, tmp_path / "served2", start_weights=tmp_path / "served1")
    second_ranks = {name: 3 if name.endswith("q_proj") else 2 for name in RANKS}
    ranks = {name: 2 * RANKS[name] + 2 * second_ranks[name] for name in RANKS}
    assert (
        plain_ranks(tmp_path / "served2") == ranks
        and report.rank == max(ranks.values())
        and not report.errors
    )
    served = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "served2")
    assert rel(logits(served, ids), expected) < 1e-5
    check_adapter_folder(tmp_path / "served2", json.loads((tmp_path / "served2" / "milora.json").read_text()))
    # A server's rank limit truncates only the layers above it.
    limited = write_served(second, tmp_path / "served8", start_weights=tmp_path / "served1", serve_rank=8)
    assert plain_ranks(tmp_path / "served8") == {name: min(8, r) for name, r in ranks.items()}
    assert set(limited.errors) == {name for name, r in ranks.items() if r > 8} and limited.rank == 8
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "served8")


def test_patterns_that_do_not_fit_the_model_are_refused(tmp_path):
    base = tiny_llama()
    with pytest.raises(TargetError, match=r"\['o_proj'\] match none"):
        init_adapter(
            copy.deepcopy(base), AdapterSpec("milora", 4, target_modules=TARGETS, rank_pattern={"o_proj": 2})
        )
    with pytest.raises(TargetError, match="different values"):  # q_proj and layers.0 q_proj disagree
        init_adapter(
            copy.deepcopy(base),
            AdapterSpec(
                "milora",
                4,
                target_modules=TARGETS,
                rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 3},
            ),
        )
    with pytest.raises(TargetError, match="exceeds min"):
        init_adapter(
            copy.deepcopy(base), AdapterSpec("milora", 4, target_modules=TARGETS, rank_pattern={"v_proj": 40})
        )


def test_a_manifest_and_config_disagreeing_on_the_pattern_are_refused(trained, tmp_path):
    import shutil

    _, _, _, folder = trained
    copied = shutil.copytree(folder, tmp_path / "copy")
    manifest = json.loads((copied / "milora.json").read_text())
    manifest.pop("rank_pattern")
    with pytest.raises(AdapterFolderError, match="rank_pattern"):
        check_adapter_folder(copied, manifest)


def test_milora_init_takes_a_rank_pattern_on_the_command_line(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from milora.cli import app

    runner = CliRunner()
    done = runner.invoke(
        app,
        [
            "init",
            llama_dir,
            str(tmp_path / "a"),
            "-r",
            "4",
            "--targets",
            "q_proj,v_proj",
            "--rank-pattern",
            "v_proj=2",
        ],
    )
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 2} and config["alpha_pattern"] == {"v_proj": 2.0}
    bad = runner.invoke(app, ["init", llama_dir, str(tmp_path / "b"), "--rank-pattern", "v_proj"])
    assert bad.exit_code != 0 and "layer=rank" in bad.output


SHARE_OUT = """
import sys, torch
from safetensors.torch import save_file
from milora.sharding import process_group, share_out

shapes = {"a": (6, 5), "b": (7, 4), "c": (8, 8), "d": (3, 9)}
ranks = {"a": 1, "b": 3, "c": 2, "d": 3}

def compute(name):
    gen = torch.Generator().manual_seed(ord(name))
    out, inp = shapes[name]
    return torch.randn(ranks[name], inp, generator=gen), torch.randn(out, ranks[name], generator=gen)

with process_group() as (rank, size):
    assert size == 2
    shared = share_out(shapes, ranks, compute, progress=False)
    assert 0 < len(shared.computed_here) < len(shapes)
    save_file({f"{n}/{i}": f.to(torch.float32).contiguous() for n, pair in shared.factors.items()
               for i, f in enumerate(pair)}, f"{sys.argv[1]}-rank{rank}.safetensors")
"""


def test_two_processes_share_out_matrices_of_different_ranks(tmp_path):
    """torchrun, 2 CPU processes on gloo: every process receives each matrix at its own rank."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    script = tmp_path / "share_out.py"
    script.write_text(SHARE_OUT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(script), str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = [load_file(tmp_path / f"out-rank{rank}.safetensors") for rank in (0, 1)]
    assert got[0].keys() == got[1].keys() and all(torch.equal(got[0][k], got[1][k]) for k in got[0])
    assert [got[0][f"{n}/0"].shape[0] for n in "abcd"] == [1, 3, 2, 3]


def test_adapters_without_patterns_record_none(tmp_path):
    """Manifests and configs of adapters without patterns are what they always were."""
    base = tiny_llama()
    model = init_adapter(
        copy.deepcopy(base), AdapterSpec("milora", 2, target_modules=("q_proj",)), progress=False
    )
    folder = save_adapter(model, tmp_path / "a")
    plain = convert_adapter(folder, tmp_path / "plain")
    compress_adapter(plain, tmp_path / "r2", 2)
    write_served(folder, tmp_path / "served", serve_rank=3)
    for sub in ("a", "plain", "r2", "served"):
        manifest = json.loads((tmp_path / sub / "milora.json").read_text())
        config = json.loads((tmp_path / sub / "adapter_config.json").read_text())
        assert "rank_pattern" not in manifest and "alpha_pattern" not in manifest, sub
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}, sub
