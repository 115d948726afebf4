"""The ``milora`` command line on a model folder, as a user would run it."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from milora import load_adapter
from milora.cli import app

runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture
def adapter(llama_dir, tmp_path):
    out = tmp_path / "adapter"
    run("init", llama_dir, str(out), "--rank", "4", "--cache-dir", str(tmp_path / "cache"))
    return out


def test_init_writes_an_adapter_and_reuses_the_cache(llama_dir, adapter, tmp_path):
    assert (adapter / "initial" / "adapter_model.safetensors").is_file()
    output = run(
        "init", llama_dir, str(tmp_path / "again"), "-r", "2", "--cache-dir", str(tmp_path / "cache")
    )
    assert "10 from cache" in output


def test_convert_compress_and_merge(llama_dir, adapter, tmp_path, input_ids):
    run("convert", str(adapter), str(tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 8
    output = run("convert", str(adapter), str(tmp_path / "small"), "--rank", "4")
    assert "worst relative error" in output
    previous = os.umask(0o022)
    try:
        run("merge", llama_dir, str(adapter), str(tmp_path / "merged"))
    finally:
        os.umask(previous)
    weights = tmp_path / "merged" / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644  # readable by a serving user, as umask 022 says
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    served = PeftModel.from_pretrained(base, tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, served(input_ids).logits, rtol=1e-4, atol=1e-4)


def test_inspect_locates_the_initial_adapter_in_the_minor_subspace(llama_dir, adapter):
    rows = json.loads(
        run("inspect", llama_dir, "--adapter", str(adapter), "--initial", "--json").splitlines()[-1]
    )
    assert len(rows) == 10
    assert all(row["minor_share"] > 0.999 and row["principal_share"] < 1e-3 for row in rows)
    table = run("inspect", llama_dir)
    assert "σ max" in table


def test_unknown_target_gives_a_clear_error(llama_dir, tmp_path):
    result = runner.invoke(app, ["init", llama_dir, str(tmp_path / "x"), "--targets", "qkv_proj"])
    assert result.exit_code != 0
    assert "not found among the model's linear layers" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_loaded_adapter_keeps_its_method(llama_dir, adapter):
    model = load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), adapter)
    assert model.milora_init.spec.method == "milora" and len(model.milora_init.factors) == 10


def test_compression_that_changes_the_model_is_said_and_verify_measures_it(llama_dir, adapter, tmp_path):
    """Trained-looking factors (B no longer zero): rank 1 of a rank-8 update loses much of it."""
    from milora.adapter_io import read_adapter, write_adapter

    state, config = read_adapter(adapter)
    gen = torch.Generator().manual_seed(0)
    trained = {
        k: (v + 0.5 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v) for k, v in state.items()
    }
    write_adapter(tmp_path / "trained", trained, config, json.loads((adapter / "milora.json").read_text()))
    shutil.copytree(adapter / "initial", tmp_path / "trained" / "initial")
    loud = run("convert", str(tmp_path / "trained"), str(tmp_path / "r1"), "--rank", "1")
    assert "WARNING" in loud and "different model" in loud
    manifest = json.loads((tmp_path / "r1" / "milora.json").read_text())
    assert manifest["compressed_max_error"] > 0.1 and manifest["compressed_from_rank"] == 8
    failed = runner.invoke(app, ["verify", llama_dir, str(tmp_path / "r1")])
    assert (
        failed.exit_code == 1 and "FAILED" in failed.output and "compressed from r=8 to r=1" in failed.output
    )
    assert "compressed adapter vs its source" in failed.output
    quiet = run("convert", str(tmp_path / "trained"), str(tmp_path / "r8"), "--rank", "8")
    assert "WARNING" not in quiet
    ok = run("verify", llama_dir, str(tmp_path / "r8"))
    assert "compressed from r=8 to r=8" in ok and "OK" in ok


def test_verify_reports_identity_conversion_and_merge(llama_dir, adapter):
    output = run("verify", llama_dir, str(adapter))
    assert "OK" in output and "converted plain LoRA" in output


def test_init_refuses_an_existing_folder_before_any_work(llama_dir, tmp_path, monkeypatch):
    import milora.cli

    out = tmp_path / "taken"
    out.mkdir()
    monkeypatch.setattr(milora.cli, "load_base_model", lambda *a, **k: pytest.fail("loaded the base first"))
    result = runner.invoke(app, ["init", llama_dir, str(out)])
    assert result.exit_code == 2 and "pass --overwrite to replace it" in result.output


def test_merge_keeps_the_chat_template_and_processor_files(llama_dir, adapter, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "preprocessor_config.json").write_text("{}")
    run("merge", str(base), str(adapter), str(tmp_path / "merged"))
    for name in ("chat_template.jinja", "preprocessor_config.json"):
        assert (tmp_path / "merged" / name).read_text() == (base / name).read_text(), name
