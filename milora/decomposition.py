"""Partial singular value decomposition of frozen weights.

MiLoRA needs only the r smallest (PiSSA: largest) singular triplets of each weight, never
the full SVD. Both official implementations run a full float32 ``torch.linalg.svd`` per
matrix, which is slow and, for the minor end of a decaying spectrum, not even accurate
(its subspace error is ~1e-3 on LLaMA-like spectra). Here the Gram matrix of the shorter
side is formed in float64 (exact for float32/bf16/fp16 inputs up to rounding), and only the
wanted eigenpairs are computed: LAPACK's subset eigensolver on the CPU, ``eigh`` on CUDA.
Squaring the spectrum is harmless in float64 as long as the wanted singular values are not
tiny relative to the largest; when they are, the solver falls back to a float64 SVD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from milora.config import SOLVERS

logger = logging.getLogger(__name__)

Side = Literal["minor", "principal"]
Solver = Literal["auto", "gram", "svd64", "svd32"]
SIDES: tuple[str, ...] = ("minor", "principal")

# A squared singular value below this multiple of (n * eps64 * sigma_max^2) is not resolved
# reliably by the Gram route; such matrices take the float64 SVD instead.
_GRAM_SAFETY = 1e4


@dataclass(frozen=True)
class Components:
    """Singular triplets of one weight, ``W ~ U diag(S) V^T`` restricted to ``rank`` of them.

    ``S`` is in descending order, as in an SVD; for the minor side these are the last
    (smallest) values of the full spectrum. Tensors are float64 on the CPU.
    """

    U: torch.Tensor  # out x k
    S: torch.Tensor  # k
    V: torch.Tensor  # in x k
    side: str

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def truncate(self, rank: int) -> Components:
        """The ``rank`` most minor (or most principal) triplets of these."""
        if rank > self.rank:
            raise ValueError(f"asked for {rank} components, only {self.rank} were computed")
        part = slice(self.rank - rank, None) if self.side == "minor" else slice(0, rank)
        return Components(self.U[:, part], self.S[part], self.V[:, part], self.side)


def decompose(weight: torch.Tensor, rank: int, side: str = "minor", solver: str = "auto") -> Components:
    """The ``rank`` minor or principal singular triplets of a 2-D weight (out x in).

    The computation runs on the weight's device; results come back as float64 on the CPU.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if not 0 < rank <= min(n_out, n_in):
        raise ValueError(f"rank {rank} is outside 1..{min(n_out, n_in)} for a {n_out}x{n_in} weight")
    if not weight.is_floating_point():
        raise TypeError(f"cannot decompose a {weight.dtype} weight; dequantize it first")
    if solver == "svd32":
        return _svd(weight.float(), rank, side)
    if solver == "svd64":
        return _svd(weight.double(), rank, side)
    components = _gram(weight, rank, side)
    if components is None:
        logger.debug("minor singular values too small for the Gram route; using float64 SVD")
        return _svd(weight.double(), rank, side)
    return components


def _svd(weight: torch.Tensor, rank: int, side: str) -> Components:
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    part = slice(S.numel() - rank, None) if side == "minor" else slice(0, rank)
    return Components(U[:, part].double().cpu(), S[part].double().cpu(), Vh[part].T.double().cpu(), side)


def _gram(weight: torch.Tensor, rank: int, side: str) -> Components | None:
    """Eigenpairs of the float64 Gram matrix of the shorter side, or None when unsafe."""
    tall = weight.shape[0] >= weight.shape[1]
    if weight.device.type == "cpu":
        eigvals, eigvecs, top = _gram_eig_lapack(weight, rank, side, tall)
    else:
        eigvals, eigvecs, top = _gram_eig_torch(weight, rank, side, tall)
    # eigvals ascending; turn them into descending singular values.
    order = torch.arange(rank - 1, -1, -1)
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    n = eigvecs.shape[0]
    floor = _GRAM_SAFETY * n * torch.finfo(torch.float64).eps * top
    if eigvals.min().item() <= floor:
        return None
    S = eigvals.sqrt()
    w64 = weight.to(eigvecs.device, torch.float64)
    # Recover the other side's vectors: W V = U S (tall) or W^T U = V S (wide).
    other = (w64 @ eigvecs if tall else w64.T @ eigvecs) / S
    U, V = (other, eigvecs) if tall else (eigvecs, other)
    return Components(U.cpu(), S.cpu(), V.cpu(), side)


def _gram_eig_lapack(
    weight: torch.Tensor, rank: int, side: str, tall: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    from scipy.linalg import eigh
    from scipy.linalg.blas import dsyrk

    a = weight.detach().to(torch.float64).numpy()
    # a is C-ordered (out x in); a.T is the same memory as a Fortran (in x out) array, so
    # syrk forms the lower triangle of a^T a (tall) or a a^T (wide) without a copy.
    gram = dsyrk(1.0, a.T, trans=0 if tall else 1, lower=1)
    n = gram.shape[0]
    top = float(np.square(a).sum())  # Frobenius^2 >= largest eigenvalue: a safe bound
    index = [0, rank - 1] if side == "minor" else [n - rank, n - 1]
    values, vectors = eigh(
        gram, lower=True, subset_by_index=index, driver="evr", overwrite_a=True, check_finite=False
    )
    return torch.from_numpy(values), torch.from_numpy(np.ascontiguousarray(vectors)), top


def _gram_eig_torch(
    weight: torch.Tensor, rank: int, side: str, tall: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    w64 = weight.detach().to(torch.float64)
    gram = w64.T @ w64 if tall else w64 @ w64.T
    values, vectors = torch.linalg.eigh(gram)
    top = float(values[-1])
    part = slice(0, rank) if side == "minor" else slice(values.numel() - rank, None)
    return values[part], vectors[:, part], top
