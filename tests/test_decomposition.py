"""The partial SVD: right components, right subspace, safe fallback, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import decaying_matrix, max_sine, reference_part

from milora.decomposition import decompose
from milora.methods import factors_from_components


@pytest.mark.parametrize("shape", [(96, 64), (64, 160), (80, 80)])
@pytest.mark.parametrize("side", ["minor", "principal"])
@pytest.mark.parametrize("solver", ["auto", "gram", "svd64"])
def test_components_match_float64_svd(shape, side, solver):
    W = decaying_matrix(*shape, seed=3).float()
    r = 8
    comp = decompose(W, r, side, solver)
    U, S, V = reference_part(W, r, side)
    torch.testing.assert_close(comp.S, S, rtol=1e-6, atol=0)
    A0, B0 = factors_from_components(comp, scale=2.0)
    product = 2.0 * B0 @ A0
    target = (U * S) @ V.T
    assert ((product - target).norm() / target.norm()).item() <= 1e-3
    assert max_sine(A0.T, V) <= 1e-3
    assert max_sine(B0, U) <= 1e-3


def test_float32_reference_solver_is_less_accurate_on_the_minor_end():
    """The official code's float32 SVD misses the minor subspace by far more than ours."""
    W = decaying_matrix(256, 192, seed=5, low=-4.0).float()
    _, _, V = reference_part(W, 8, "minor")
    ours = max_sine(decompose(W, 8, "minor", "gram").V, V)
    theirs = max_sine(decompose(W, 8, "minor", "svd32").V, V)
    assert ours < 1e-6
    assert theirs > 100 * ours


def test_rank_deficient_weight_falls_back_to_svd():
    low_rank = decaying_matrix(64, 20, seed=1) @ decaying_matrix(20, 48, seed=2)
    comp = decompose(low_rank.float(), 4, "minor", "gram")
    assert comp.S.max().item() < 1e-5  # the null space, found by the float64 SVD
    assert torch.allclose(comp.U.T @ comp.U, torch.eye(4, dtype=torch.float64), atol=1e-8)


def test_truncate_keeps_the_most_minor_and_most_principal():
    W = decaying_matrix(40, 30, seed=4).float()
    minor = decompose(W, 10, "minor")
    principal = decompose(W, 10, "principal")
    torch.testing.assert_close(minor.truncate(3).S, decompose(W, 3, "minor").S)
    torch.testing.assert_close(principal.truncate(3).S, decompose(W, 3, "principal").S)
    with pytest.raises(ValueError, match="only 10 were computed"):
        minor.truncate(11)


@pytest.mark.parametrize(
    ("weight", "rank", "side", "match"),
    [
        (torch.zeros(8, 4), 5, "minor", "outside 1..4"),
        (torch.zeros(8, 4), 0, "minor", "outside 1..4"),
        (torch.zeros(8, 4), 2, "middle", "side must be"),
        (torch.zeros(8, 4, dtype=torch.int8), 2, "minor", "dequantize"),
        (torch.zeros(8), 2, "minor", "2-D"),
    ],
)
def test_bad_requests_are_refused(weight, rank, side, match):
    with pytest.raises((ValueError, TypeError), match=match):
        decompose(weight, rank, side)


@pytest.mark.parametrize("side", ["minor", "principal"])
def test_accelerator_route_is_as_exact(side, monkeypatch):
    """The CUDA route (torch ``eigh`` of the float64 Gram), exercised on the CPU."""
    import milora.decomposition as decomposition

    monkeypatch.setattr(decomposition, "_gram_eig_lapack", decomposition._gram_eig_torch)
    for shape in [(96, 64), (64, 160)]:
        W = decaying_matrix(*shape, seed=11).float()
        comp = decompose(W, 8, side, "gram")
        U, S, V = reference_part(W, 8, side)
        torch.testing.assert_close(comp.S, S, rtol=1e-6, atol=0)
        assert max_sine(comp.V, V) <= 1e-6 and max_sine(comp.U, U) <= 1e-6
