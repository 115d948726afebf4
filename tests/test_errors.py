"""Bad requests fail before anything is changed, saying what to do."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_llama

from milora import AdapterSpec, init_adapter


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 97}, ValueError, r"rank r=97 exceeds min\(out, in\)=64 of model.layers.0.self_attn.q_proj"),
        ({"target_modules": ["q_proj", "qkv"]}, ValueError, r"\['qkv'\] not found.*adaptable names are"),
        ({"target_modules": "nothing.*"}, ValueError, "matches no linear layer"),
        ({"method": "dora"}, ValueError, "method must be one of"),
        ({"r": 0}, ValueError, "r must be a positive integer"),
        ({"lora_alpha": -1.0}, ValueError, "lora_alpha must be positive"),
        ({"lora_dropout": 1.5}, ValueError, "lora_dropout must be in"),
        ({"solver": "magic"}, ValueError, "solver must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(error, match=match):
        init_adapter(model, **{"method": "milora", "r": 4, **kwargs})
    after = _weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantized_weight_is_refused():
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="q_proj holds a quantized or non-float weight"):
        init_adapter(model, method="milora", r=4)


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        init_adapter(model, method="pissa", r=4)


def test_spec_rejects_empty_targets():
    with pytest.raises(ValueError, match="target_modules"):
        AdapterSpec(target_modules=())


def test_prefect_temporary_server_start_is_one_line_without_a_link():
    import flows  # noqa: F401  (installs the filter on Prefect's logger)

    record = logging.LogRecord(
        "prefect",
        logging.INFO,
        __file__,
        0,
        "Starting temporary server on http://127.0.0.1:8765\nSee https://www.prefect.io/docs/v3/concepts/"
        "server#how-to-guides for more information on running a dedicated Prefect server.",
        None,
        None,
    )
    assert all(f.filter(record) for f in logging.getLogger("prefect").filters)
    assert record.getMessage() == (
        "temporary Prefect server on http://127.0.0.1:8765 (set PREFECT_API_URL to use a server of your own)"
    )
