"""The rank and target suggestion (milora.suggestion) on matrices whose spectra are known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from milora.suggestion import ModuleSpectrum, describe, singular_values, suggest


def with_spectrum(values: list[float], seed: int = 0, rows: int | None = None) -> torch.Tensor:
    """``U diag(values) V^T`` with random orthonormal U (rows x n) and V (n x n)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    u, _ = torch.linalg.qr(torch.randn(rows or n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def test_singular_values_are_the_spectrum_it_was_built_with():
    values = [float(2**-i) for i in range(12)]
    found = singular_values(with_spectrum(values, rows=20).T)  # a wide matrix too
    assert torch.allclose(found, torch.tensor(values, dtype=torch.float64), rtol=1e-6)


def test_a_flat_spectrum_has_no_minor_subspace():
    flat = describe("layers.0.q_proj", with_spectrum([1.0] * 64), r=16)
    assert flat.effective_rank == pytest.approx(64) and flat.stable_rank == pytest.approx(64)
    assert flat.minor_energy == pytest.approx(16 / 64) and flat.minor_flatness == pytest.approx(1.0)
    assert flat.suggested_rank == 0 and "even 2 minor components hold 3.12% of the energy" in flat.reason


def test_a_vanishing_minor_end_is_refused_and_a_small_alive_one_sets_the_rank():
    vanishing = describe("v", with_spectrum([1.0] * 48 + [0.01] * 16), r=16)
    assert vanishing.minor_energy < 1e-4
    assert vanishing.suggested_rank == 0 and "vanish" in vanishing.reason
    alive = describe("a", with_spectrum([1.0] * 48 + [0.1] * 16), r=16)
    # r = 16 holds 0.33% of the energy at 0.1 of the median; r = 32 would reach into the ones.
    assert alive.suggested_rank == 16
    assert alive.minor_energy == pytest.approx(0.16 / 48.16)
    assert "r=16: its 16 minor components hold 0.33% of the energy" in alive.reason
    assert describe("a", with_spectrum([1.0] * 48 + [0.1] * 16), r=4).principal_energy == pytest.approx(
        4 / 48.16
    )


def test_rank_one_weights_have_effective_and_stable_rank_near_one():
    spiky = describe("s", with_spectrum([1.0] + [1e-6] * 31), r=4)
    assert spiky.stable_rank == pytest.approx(1.0, abs=1e-6) and spiky.effective_rank < 1.01


def spectrum(name: str, rank: int) -> ModuleSpectrum:
    return ModuleSpectrum(name, (64, 64), 10.0, 2.0, 0.0, 0.5, 0.5, rank, f"r={rank}" if rank else "no")


def test_the_suggestion_takes_module_names_most_of_whose_layers_qualify():
    modules = [
        spectrum("layers.0.q_proj", 16), spectrum("layers.1.q_proj", 32), spectrum("layers.2.q_proj", 0),
        spectrum("layers.0.up_proj", 8), spectrum("layers.1.up_proj", 16), spectrum("layers.2.up_proj", 16),
        spectrum("layers.0.k_proj", 0), spectrum("layers.1.k_proj", 0), spectrum("layers.2.k_proj", 4),
    ]  # fmt: skip
    advice = suggest(modules)
    assert advice.target_modules == ("q_proj", "up_proj")
    assert advice.rank == 16  # median of 16, 32, 8, 16, 16
    # Smaller own ranks, and the smallest rank for a chosen name's layer without one.
    assert advice.rank_pattern == {"layers.0.up_proj": 8, "layers.2.q_proj": 2}
    assert advice.reasons["k_proj"].startswith("skip: 2 of 3 layers fail (no)")
    assert advice.reasons["q_proj"].startswith("adapt: 2 of 3 layers")
    assert suggest([spectrum("layers.0.k_proj", 0)]).rank == 0


def test_milora_inspect_suggest_on_a_model(llama_dir):
    from typer.testing import CliRunner

    from milora.cli import app

    done = CliRunner().invoke(app, ["inspect", llama_dir, "--suggest", "--json", "-r", "4"])
    assert done.exit_code == 0, done.output
    found = json.loads(done.output.strip().splitlines()[-1])
    kinds = {m["name"].rsplit(".", 1)[-1] for m in found["modules"]}
    assert {"q_proj", "o_proj", "down_proj"} <= kinds and "lm_head" not in kinds
    assert all(math.isfinite(m["effective_rank"]) for m in found["modules"])
    shown = CliRunner().invoke(app, ["inspect", llama_dir, "--suggest", "--targets", "q_proj,v_proj"])
    assert shown.exit_code == 0 and "rule: per layer, the largest r" in shown.output
    assert "q_proj" in shown.output and "down_proj" not in shown.output


def test_dead_directions_are_not_hidden_behind_a_larger_rank():
    """60 vanishing values under healthy ones: at r = 64 the 4 healthy ones would lift the
    largest minor value, but the median of the 64 stays dead, so no rank is suggested."""
    weight = with_spectrum([1.0] * 452 + [1e-4] * 60)
    found = describe("layers.0.down_proj", weight, r=64)
    assert found.minor_energy <= 0.01  # minor enough: only liveness refuses it
    assert found.suggested_rank == 0 and "vanish" in found.reason
