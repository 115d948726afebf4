"""Settings checked before any stage runs: the base model folder and the target modules."""

from __future__ import annotations

import json
import shutil

from conftest import DEMO_TOKENIZER

from milora.preflight import base_model_problems, tensor_names

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def test_the_demo_base_passes_and_its_tensor_names_are_read_from_the_header():
    assert base_model_problems(DEMO_TOKENIZER, TARGETS) == []
    assert "model.layers.0.self_attn.q_proj.weight" in tensor_names(DEMO_TOKENIZER)


def test_each_problem_names_the_key_to_fix(tmp_path):
    assert base_model_problems(tmp_path / "typo", TARGETS) == [
        f"base_model: {tmp_path / 'typo'} is not a Hugging Face model folder (no config.json)"
    ]
    (problem,) = base_model_problems(DEMO_TOKENIZER, ["q_proj", "qkv_proj"])
    assert problem.startswith("train.target_modules: ['qkv_proj'] are not layers of") and "k_proj" in problem
    assert base_model_problems(DEMO_TOKENIZER, ".*proj") == []  # a regex is PEFT's to match

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(DEMO_TOKENIZER / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    problems = base_model_problems(pickled, TARGETS)
    assert any("only pickled pytorch_model.bin" in p for p in problems)
    assert any("has no tokenizer" in p for p in problems)


def test_a_sharded_base_is_read_from_its_index(tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(DEMO_TOKENIZER, sharded)
    for path in sharded.glob("*.safetensors"):
        path.unlink()
    index = {"weight_map": {"model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert base_model_problems(sharded, ["q_proj"]) == []
    assert "['v_proj']" in base_model_problems(sharded, ["q_proj", "v_proj"])[0]
