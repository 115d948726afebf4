"""Where in each weight's spectrum an adapter lives.

MiLoRA's claim is structural: its update starts in, and should mostly stay near, the minor
singular directions of W. This reports per layer the spectrum's ends and, for an adapter,
the share of its A rows' energy inside the r minor and r principal right singular
subspaces of the *stock* weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from milora.decomposition import decompose
from milora.targets import find_targets


@dataclass(frozen=True)
class LayerSpectrum:
    name: str
    shape: tuple[int, int]
    sigma_max: float
    sigma_min: float
    minor_top: float  # largest of the r minor singular values: where the minor block begins
    minor_share: float | None = None  # of the adapter's A energy, in the minor r subspace
    principal_share: float | None = None

    @property
    def condition(self) -> float:
        return self.sigma_max / self.sigma_min if self.sigma_min > 0 else float("inf")


def _share(A: torch.Tensor, V: torch.Tensor) -> float:
    A64 = A.double()
    total = A64.square().sum()
    return float((A64 @ V).square().sum() / total) if total > 0 else 0.0


def spectrum_report(
    model: nn.Module,
    target_modules: tuple[str, ...] | str,
    r: int,
    adapter_A: dict[str, torch.Tensor] | None = None,
) -> list[LayerSpectrum]:
    """One row per target layer; ``adapter_A`` maps layer name to that layer's lora_A."""
    rows = []
    for target in find_targets(model, target_modules, r):
        weight = target.weight.detach()
        weight = weight.T if target.fan_in_fan_out else weight
        minor = decompose(weight, r, "minor")
        principal = decompose(weight, r, "principal")
        A = (adapter_A or {}).get(target.name)
        rows.append(
            LayerSpectrum(
                name=target.name,
                shape=target.shape,
                sigma_max=float(principal.S[0]),
                sigma_min=float(minor.S[-1]),
                minor_top=float(minor.S[0]),
                minor_share=None if A is None else _share(A, minor.V),
                principal_share=None if A is None else _share(A, principal.V),
            )
        )
    return rows
