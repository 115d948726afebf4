"""Initialisation methods: one function each, as PEFT's ``*_init`` methods, in one table.

A method decides how a target weight's adapter starts. Its ``init(weight, spec,
components)`` returns the initial factors ``(A0, B0)`` for one weight ``W`` (out x in,
already oriented), after which the frozen base becomes ``W_res = W - s B0 A0`` and the
wrapped model computes exactly what the base computed; or None to keep PEFT's own LoRA
start (Kaiming ``A``, zero ``B``, ``W`` untouched). ``components(weight, rank, side)`` gives
the weight's singular triplets, served from the decomposition cache and computed on the
configured device otherwise, so methods never deal with caching or devices. ``spec`` is the
layer's own (:meth:`~milora.config.AdapterSpec.for_layer`): under a ``rank_pattern`` its
``r`` and ``scale`` are that layer's, so a method never deals with patterns either.

A new method is one function and one entry of :data:`INIT_METHODS`; the adapter spec, the
settings, the CLI and the reports read the names, default scales and spectrum side here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the model, not with the settings that name a method
    import torch

    from milora.config import AdapterSpec
    from milora.decomposition import Components

    ComponentsOf = Callable[[torch.Tensor, int, str], Components]
    Factors = tuple[torch.Tensor, torch.Tensor]


def factors_from_components(comp: Components, scale: float) -> Factors:
    """(A0, B0) in float64 with ``scale * B0 @ A0 = U diag(S) V^T``:
    ``A0 = diag(sqrt(S / s)) V^T``, ``B0 = U diag(sqrt(S / s))``."""
    root = (comp.S / scale).sqrt()
    return root[:, None] * comp.V.T, comp.U * root[None, :]


def milora_init(weight: torch.Tensor, spec: AdapterSpec, components: ComponentsOf) -> Factors:
    """MiLoRA: the r *smallest* singular triplets, the directions the base uses least."""
    return factors_from_components(components(weight, spec.r, "minor"), spec.scale)


def pissa_init(weight: torch.Tensor, spec: AdapterSpec, components: ComponentsOf) -> Factors:
    """PiSSA: the r largest singular triplets."""
    return factors_from_components(components(weight, spec.r, "principal"), spec.scale)


InitFunction = Callable[["torch.Tensor", "AdapterSpec", "ComponentsOf"], "Factors"]


@dataclass(frozen=True)
class InitMethod:
    """One initialisation method."""

    init: InitFunction | None  # None: PEFT's LoRA init, base weights untouched
    alpha_per_rank: float  # default lora_alpha = alpha_per_rank * r (the official code's choice)
    side: str | None  # the spectrum end A0/B0 hold (reports mark it); None: not from the SVD
    summary: str


INIT_METHODS: dict[str, InitMethod] = {
    "milora": InitMethod(milora_init, 1.0, "minor", "minor singular components (arXiv 2406.09044)"),
    "pissa": InitMethod(pissa_init, 1.0, "principal", "principal singular components (arXiv 2404.02948)"),
    "lora": InitMethod(None, 2.0, None, "plain LoRA: Kaiming A, zero B"),
}
