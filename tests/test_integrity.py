"""Faults injected into what the pipeline reads: hostile configs, corrupted caches, tampered
adapter folders, secrets in URIs. Each must end in a specific error (or a recomputation),
never in a silent wrong result."""

from __future__ import annotations

import time

import pytest

from milora.settings import SettingsError, load_settings
from milora.yamlfile import YamlBudgetError, safe_load_bounded

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
)  # 10^9 strings once expanded


def test_a_yaml_alias_bomb_in_params_is_refused_at_once(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(BOMB + "\nbase_model: m\n")
    started = time.perf_counter()
    with pytest.raises(
        SettingsError, match=r"params\.yaml: refused: its aliases expand to more than 100,000 nodes"
    ):
        load_settings(params)
    assert time.perf_counter() - started < 2


def test_yaml_aliases_within_the_budget_and_recursive_ones():
    assert safe_load_bounded("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}
    assert safe_load_bounded("") is None
    with pytest.raises(YamlBudgetError, match="recursive"):
        safe_load_bounded("a: &a [1, *a]\n")


# --------------------------------------------------------------------------- secrets in URIs
def test_redact_masks_passwords_tokens_and_secret_query_values():
    from milora.redact import redact

    assert redact("API request to https://milora:s3cret@mlflow.example:5000/api failed") == (
        "API request to https://milora:***@mlflow.example:5000/api failed"
    )
    assert redact("git clone https://ghp_token123@github.com/x") == "git clone https://***@github.com/x"
    assert redact("s3://b/k?X-Amz-Signature=abc123&x=1 and postgresql://u:p%40ss@db/m?password=p2") == (
        "s3://b/k?X-Amz-Signature=***&x=1 and postgresql://u:***@db/m?password=***"
    )
    plain = "sqlite:////tmp/mlflow.db, http://127.0.0.1:5000, a=b"
    assert redact(plain) == plain


def test_log_records_and_tracebacks_lose_their_credentials(capsys):
    import logging

    from milora.redact import install_log_redaction

    install_log_redaction()
    install_log_redaction()  # idempotent
    handler = logging.StreamHandler()  # added after: covered all the same
    logger = logging.getLogger("milora.test_redaction")
    logger.addHandler(handler)
    try:
        logger.warning("store %s unreachable", "http://u:topsecret@127.0.0.1:1")
        try:
            raise ConnectionError("to http://u:topsecret@127.0.0.1:1/api")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert (
        "topsecret" not in err
        and "unreachable" in err
        and "ConnectionError: to http://u:***@127.0.0.1:1" in err
    )


# --------------------------------------------------------------------------- adapter folders
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from conftest import tiny_llama

    from milora import init_adapter
    from milora.adapter_io import save_adapter

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(init_adapter(tiny_llama(), method="milora", r=4), folder)
    return folder


def _tampered(saved, tmp_path, **config_changes):
    import json
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"use_dora": True}, r"use_dora = True \(a LoRA variant the methods here do not use\)"),
        ({"use_rslora": True}, "use_rslora = True"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 8}, r"r = 8, but milora.json says 4"),
        ({"lora_alpha": 99}, "lora_alpha = 99, but milora.json says"),
        ({"target_modules": ["q_proj"]}, r"target_modules = \['q_proj'\], but milora.json says"),
    ],
)
def test_an_adapter_config_that_disagrees_or_uses_a_variant_is_refused(
    saved_adapter, tmp_path, changes, says
):
    from conftest import tiny_llama

    from milora.adapter_io import AdapterFolderError, load_adapter, read_adapter

    folder = _tampered(saved_adapter, tmp_path, **changes)
    with pytest.raises(AdapterFolderError, match=says):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(AdapterFolderError, match=says):
        read_adapter(folder)


def test_links_inside_an_adapter_folder_are_refused(saved_adapter, tmp_path):
    from conftest import tiny_llama

    from milora.adapter_io import AdapterFolderError, load_adapter
    from tasks.register import adapter_files
    from tasks.registry import RegistryError

    folder = _tampered(saved_adapter, tmp_path)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").symlink_to("/etc/hostname")
    with pytest.raises(AdapterFolderError, match=r"README\.md: a symbolic link inside an adapter folder"):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(RegistryError, match="symbolic link"):
        adapter_files(folder)


def test_the_untampered_adapter_loads(saved_adapter):
    from conftest import tiny_llama

    from milora.adapter_io import load_adapter

    assert load_adapter(tiny_llama(), saved_adapter).milora_init.spec.r == 4


# --------------------------------------------------------------------------- output folders
def test_an_output_folder_is_claimed_only_inside_the_project_and_when_it_is_ours(tmp_path):
    from milora.atomic import ForeignOutputError, claim_output, mark_output

    root = tmp_path / "project"
    (root / "data" / "company").mkdir(parents=True)
    with pytest.raises(ForeignOutputError, match=r"ingest.out_dir: .* is not inside the project"):
        claim_output(tmp_path / "elsewhere", root, "ingest.out_dir")
    with pytest.raises(ForeignOutputError, match="is the project folder itself"):
        claim_output(root, root, "ingest.out_dir")
    with pytest.raises(ForeignOutputError, match=r"would hold the input .*company"):
        claim_output(root / "data", root, "ingest.out_dir", inputs=[root / "data" / "company"])
    foreign = root / "shared"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    with pytest.raises(ForeignOutputError, match=r"holds files this pipeline did not write \(notes.txt\)"):
        claim_output(foreign, root, "ingest.out_dir")
    assert claim_output(foreign, root, "k", adopt=True) == foreign.resolve()  # recorded by dvc.lock
    mark_output(foreign)
    assert claim_output(foreign, root, "k") == foreign.resolve()
    assert claim_output(root / "new" / "out", root, "k") == (root / "new" / "out").resolve()


def test_ingest_never_replaces_a_folder_of_other_files(tmp_path, chat_model_dir):
    """`ingest.out_dir` at a folder holding someone's file, or at the project's data folder:
    refused before anything is read, and every file stays; the stage's own folder is replaced."""
    from conftest import stage_settings

    from milora.atomic import OUTPUT_MARKER, ForeignOutputError
    from tasks.ingest import ingest

    settings = stage_settings(
        tmp_path,
        chat_model_dir,
        **{"ingest.watch": "data/company", "ingest.sources": ["data/company/*.jsonl"]},
    )
    (tmp_path / "data" / "company").mkdir(parents=True)
    (tmp_path / "drop.jsonl").rename(tmp_path / "data" / "company" / "drop.jsonl")
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "keep.csv").write_text("a,b\n")
    with pytest.raises(ForeignOutputError, match=r"holds files this pipeline did not write \(keep.csv\)"):
        ingest(settings.with_overrides({"ingest.out_dir": "exports"}))
    assert (tmp_path / "exports" / "keep.csv").read_text() == "a,b\n"
    with pytest.raises(ForeignOutputError, match=r"would hold the input .*data/company"):
        ingest(settings.with_overrides({"ingest.out_dir": "data"}))  # the project's data folder
    with pytest.raises(ForeignOutputError, match="is the project folder itself"):
        ingest(settings.with_overrides({"ingest.out_dir": "."}))
    report = ingest(settings)
    assert (report.out_dir / OUTPUT_MARKER).is_file()
    ingest(settings)  # its own folder: replaced


def test_a_source_outside_the_watched_folder_is_refused(tmp_path, chat_model_dir):
    """DVC's ingest stage depends on ingest.watch: a source elsewhere could change unseen."""
    from conftest import stage_settings

    from tasks.ingest import ingest, unwatched_sources

    settings = stage_settings(tmp_path, chat_model_dir, **{"ingest.watch": "company"})
    (tmp_path / "company").mkdir()
    (problem,) = unwatched_sources(settings)
    assert problem.startswith("ingest.sources: drop.jsonl lies outside ingest.watch (company)")
    with pytest.raises(SettingsError, match=r"drop\.jsonl lies outside ingest\.watch"):
        ingest(settings)
    assert not (tmp_path / "ingested").exists()


def test_a_garbled_store_is_named_before_any_stage(tmp_path, monkeypatch):
    from conftest import make_settings

    from tasks.registry import RegistryError, check_registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(b"not a database, just bytes\x00" * 100)
    settings = make_settings(tmp_path, {"registry.tracking_uri": "sqlite:///mlflow.db"})
    with pytest.raises(
        RegistryError, match=r"the MLflow registry at sqlite:///.*mlflow\.db cannot be used: "
    ):
        check_registry(settings)
