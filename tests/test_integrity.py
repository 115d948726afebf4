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
