"""Gap-drawn LoRA dropout: the same Bernoulli distribution as torch's, its gradient, replays."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from milora import init_adapter
from milora.modeling import load_base_model
from milora.training.dropout import GapDropout, dropped_positions, use_gap_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_are_a_bernoulli_process(p):
    generator = torch.Generator().manual_seed(0)
    n, trials = 2_000, 3_000
    counts = torch.zeros(n)
    pairs = 0
    for _ in range(trials):
        positions = dropped_positions(n, p, generator)
        assert positions.dtype == torch.long
        assert bool((positions.diff() > 0).all()) and int(positions.min()) >= 0 and int(positions.max()) < n
        counts[positions] += 1
        dropped = torch.zeros(n, dtype=torch.bool)
        dropped[positions] = True
        pairs += int((dropped[1:] & dropped[:-1]).sum())
    # Every position drops at rate p (a chi-square test of uniformity across positions) ...
    rate = counts.sum() / (n * trials)
    assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / (n * trials))
    expected = trials * p
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - p))).sum())
    assert abs(chi2 - n) < 6 * math.sqrt(2 * n)
    # ... and neighbours drop independently (both dropped at rate p^2).
    both = pairs / ((n - 1) * trials)
    assert abs(both - p * p) < 6 * math.sqrt(p * p / ((n - 1) * trials))


def test_no_drops_and_tiny_inputs():
    assert dropped_positions(0, 0.1).numel() == 0
    assert dropped_positions(100, 0.0).numel() == 0
    generator = torch.Generator().manual_seed(1)
    sizes = [dropped_positions(1, 0.5, generator).numel() for _ in range(2_000)]
    assert set(sizes) == {0, 1} and abs(sum(sizes) / len(sizes) - 0.5) < 0.05


def test_forward_and_backward_drop_the_same_elements_and_scale_the_rest():
    torch.manual_seed(0)
    x = (torch.rand(64, 300) + 0.5).requires_grad_()
    layer = GapDropout(0.1).train()
    out = layer(x)
    kept = out != 0
    assert 0.05 < 1 - kept.float().mean() < 0.15
    torch.testing.assert_close(out[kept], x.detach()[kept] / 0.9)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad / 0.9, 0.0))


def test_non_contiguous_inputs_drop_the_same_elements_forward_and_backward():
    layer = GapDropout(0.2).train()
    torch.manual_seed(3)
    wide = (torch.rand(40, 8) + 0.5).t().requires_grad_()  # not contiguous
    out = layer(wide)
    assert out.shape == wide.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], wide.detach()[kept] / 0.8)
    grad = (torch.rand(40, 8) + 0.5).t()  # not contiguous either
    out.backward(grad)
    torch.testing.assert_close(wide.grad, torch.where(kept, grad / 0.8, 0.0))


def test_eval_and_the_cases_left_to_torch(monkeypatch):
    x = torch.randn(8, 40)
    assert torch.equal(GapDropout(0.2).eval()(x), x)
    calls = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    GapDropout(0.7).train()(x)  # p > 1/2: torch's
    GapDropout(0.2, inplace=True).train()(x.clone())
    assert calls == [0.7, 0.2]
    GapDropout(0.2).train()(x)  # the gap-drawn path does not call torch's dropout
    assert calls == [0.7, 0.2]


def test_seeded_runs_and_checkpointing_replay_the_same_drops():
    x = torch.randn(32, 64)
    weight = torch.randn(64, 64, requires_grad=True)
    layer = GapDropout(0.3).train()

    def block(inputs):
        return layer(inputs) @ weight

    torch.manual_seed(7)
    plain = block(x).square().sum()
    (expected,) = torch.autograd.grad(plain, weight)
    torch.manual_seed(7)
    again = checkpoint(block, x, use_reentrant=False).square().sum()
    (replayed,) = torch.autograd.grad(again, weight)
    torch.testing.assert_close(again, plain)
    torch.testing.assert_close(replayed, expected)


def test_the_lora_layers_get_it_and_keep_their_p(chat_model_dir):
    model = init_adapter(load_base_model(chat_model_dir), method="milora", r=4, lora_dropout=0.07)
    before = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    replaced = use_gap_dropout(model)
    assert replaced == before > 0
    layers = [m for m in model.modules() if isinstance(m, GapDropout)]
    assert len(layers) == replaced and {m.p for m in layers} == {0.07}
    assert use_gap_dropout(model) == 0  # once is enough


def test_the_dropout_choice_leaves_a_runs_key_as_it_was():
    """Same distribution, so a run trained before the gap dropout is still this run."""
    from milora.config import AdapterSpec
    from milora.training import TrainConfig
    from milora.training.run import run_key

    conversations = [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]]
    keys = [
        run_key("base", conversations, AdapterSpec(), TrainConfig(max_steps=2, gap_dropout=gap))
        for gap in (True, False)
    ]
    assert keys[0] == keys[1]
    assert keys[0] != run_key("base", conversations, AdapterSpec(), TrainConfig(max_steps=3))
