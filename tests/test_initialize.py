"""init_adapter: the wrapped model computes what the base computed, with the right factors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, max_sine, reference_part, rel, tiny_gpt2, tiny_llama
from peft import PeftModel

from milora import init_adapter
from milora.initialize import lora_layers


@pytest.mark.parametrize("method", ["milora", "pissa", "lora"])
def test_wrapped_llama_equals_base(method, input_ids):
    base = tiny_llama()
    expected = logits(base, input_ids)
    model = init_adapter(copy.deepcopy(base), method=method, r=8)
    assert isinstance(model, PeftModel)
    assert rel(logits(model, input_ids), expected) <= 1e-5


@pytest.mark.parametrize("method", ["milora", "pissa"])
def test_gpt2_conv1d_targets(method, input_ids):
    base = tiny_gpt2()
    expected = logits(base, input_ids)
    model = init_adapter(copy.deepcopy(base), method=method, r=6, target_modules=["c_attn", "c_fc", "c_proj"])
    assert model.peft_config["default"].fan_in_fan_out
    assert rel(logits(model, input_ids), expected) <= 1e-5
    # Conv1D stores W^T: the factors must still be those of W (out x in).
    name, layer = next(iter(lora_layers(model).items()))
    W = dict(base.named_modules())[name].weight.detach().T
    _, _, V = reference_part(W, 6, "minor" if method == "milora" else "principal")
    assert max_sine(layer.lora_A["default"].weight.detach().T, V) <= 1e-3


@pytest.mark.parametrize(("method", "side"), [("milora", "minor"), ("pissa", "principal")])
def test_factors_and_residual_hold_the_right_components(method, side):
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if hasattr(m, "weight")}
    r, alpha = 8, 16.0
    model = init_adapter(copy.deepcopy(base), method=method, r=r, lora_alpha=alpha)
    s = alpha / r
    layers = lora_layers(model)
    assert len(layers) == 2 * 5  # q, k, v, up, down in two layers
    for name, layer in layers.items():
        W = weights[name].double()
        U, S, V = reference_part(W, r, side)
        A0 = layer.lora_A["default"].weight.detach().double()
        B0 = layer.lora_B["default"].weight.detach().double()
        target = (U * S) @ V.T
        assert rel(s * B0 @ A0, target) <= 1e-3
        assert max_sine(A0.T, V) <= 1e-3 and max_sine(B0, U) <= 1e-3
        # W_res keeps every other singular value and drops the adapted ones to ~0.
        full = torch.linalg.svdvals(W)
        kept = full[: full.numel() - r] if side == "minor" else full[r:]
        res = torch.linalg.svdvals(layer.get_base_layer().weight.detach().double())
        torch.testing.assert_close(res[: kept.numel()], kept, rtol=1e-5, atol=1e-7)
        assert res[kept.numel() :].max() < 1e-5
        stored = model.milora_init.factors[name]
        assert torch.equal(stored[0], layer.lora_A["default"].weight.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_decompose_in_float64_and_keep_their_dtype(dtype, input_ids):
    base = tiny_llama(dtype=dtype)
    before = {n: m.weight.detach().clone() for n, m in base.named_modules() if hasattr(m, "weight")}
    model = init_adapter(copy.deepcopy(base), method="milora", r=8)
    for name, layer in lora_layers(model).items():
        base_weight = layer.get_base_layer().weight
        assert base_weight.dtype == dtype
        A0 = layer.lora_A["default"].weight.detach().double()
        B0 = layer.lora_B["default"].weight.detach().double()
        rebuilt = base_weight.detach().double() + B0 @ A0
        # Only the final store into the half dtype rounds: error ~ its epsilon.
        eps = torch.finfo(dtype).eps
        assert (rebuilt - before[name].double()).abs().max() <= 2 * eps * before[name].double().abs().max()
    out = logits(model, input_ids)
    assert torch.isfinite(out).all()
    assert rel(out, logits(base, input_ids)) < 0.05


def test_alpha_defaults_follow_the_official_code():
    assert init_adapter(tiny_llama(), method="milora", r=4).peft_config["default"].lora_alpha == 4
    assert init_adapter(tiny_llama(), method="pissa", r=4).peft_config["default"].lora_alpha == 4
    assert init_adapter(tiny_llama(), method="lora", r=4).peft_config["default"].lora_alpha == 8


def test_plain_lora_is_peft_default_and_seeded(input_ids):
    a = init_adapter(tiny_llama(), method="lora", r=4, seed=1)
    b = init_adapter(tiny_llama(), method="lora", r=4, seed=1)
    layer_a = next(iter(lora_layers(a).values()))
    layer_b = next(iter(lora_layers(b).values()))
    assert torch.equal(layer_a.lora_A["default"].weight, layer_b.lora_A["default"].weight)
    assert torch.count_nonzero(layer_a.lora_B["default"].weight) == 0
    assert not a.milora_init.factors


def test_training_mode_is_preserved():
    model = tiny_llama().train()
    assert init_adapter(model, method="milora", r=4).training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decomposition_matches_cpu():
    cpu = init_adapter(tiny_llama(), method="milora", r=8, device="cpu")
    gpu = init_adapter(tiny_llama(), method="milora", r=8, device="cuda")
    for name, (A0, B0) in cpu.milora_init.factors.items():
        torch.testing.assert_close(
            B0 @ A0, gpu.milora_init.factors[name][1] @ gpu.milora_init.factors[name][0]
        )


def test_parallel_and_serial_decomposition_agree():
    serial = init_adapter(tiny_llama(), method="milora", r=8, workers=1)
    parallel = init_adapter(tiny_llama(), method="milora", r=8, workers=2)
    for name, (A0, B0) in serial.milora_init.factors.items():
        A1, B1 = parallel.milora_init.factors[name]
        torch.testing.assert_close(B1 @ A1, B0 @ A0, rtol=1e-5, atol=1e-7)


def test_a_new_init_method_is_one_function_and_one_table_entry(monkeypatch, input_ids):
    """A QR-based start (not from the SVD): A0 spans the first r columns' directions, B0 makes
    s B0 A0 the projection of W on them, so the wrapped model still equals the base."""
    from milora.methods import INIT_METHODS, InitMethod

    def qr_init(weight, spec, components):
        Q, _ = torch.linalg.qr(weight.T.double())  # in x k, orthonormal columns
        basis = Q[:, : spec.r]
        return basis.T.contiguous(), (weight.double() @ basis) / spec.scale

    monkeypatch.setitem(INIT_METHODS, "qr", InitMethod(qr_init, 1.0, None, "QR of W^T"))
    base = tiny_llama()
    model = init_adapter(copy.deepcopy(base), method="qr", r=4)
    assert rel(logits(model, input_ids), logits(base, input_ids)) < 1e-5
    A0, _ = next(iter(model.milora_init.factors.values()))
    torch.testing.assert_close(
        A0.double() @ A0.double().T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert model.peft_config["default"].lora_alpha == 4  # the entry's default scale
