"""A rank and a target set suggested from the base's own spectra, with the reason for each.

The MiLoRA paper fixes r and the targets by hand. What the method needs from a weight is
stated in its premise: the adapter starts in the r smallest singular components, which must
(1) hold little of what the weight knows, and (2) not vanish, or the factors start near zero
and learn slowly (both A0 and B0 scale with the square root of those values). The rule
reads exactly that off each target matrix's singular values ``s_1 >= ... >= s_n``:

- a module's rank is the largest ``r`` of :data:`RANKS` (at most ``n / 4``) whose r minor
  components hold at most ``max_minor_energy`` of ``||W||_F^2`` (minor) and whose median is
  at least ``min_minor_level`` times the median singular value of the whole spectrum (alive:
  most of the r directions start away from zero); none: the module is not suggested;
- a module name (``q_proj``, ...) is a suggested target when at least half its layers have a
  rank; the suggested r is the median of those layers' ranks (rounded down to :data:`RANKS`),
  and layers whose own rank is smaller get it in a ``rank_pattern`` (a layer of a suggested
  name with no rank of its own gets the smallest of :data:`RANKS`, never the shared r).

Per module it also reports the spectrum's shape: effective rank (the exponential of the
entropy of ``s / sum(s)``, Roy and Vetterli 2007), stable rank (``||W||_F^2 / s_1^2``), the energy
of the r smallest and r largest components, and the minor end's flatness (smallest over
largest of the r minor values; 1 is flat).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from milora.targets import exclude_modules, excluded

RANKS = (2, 4, 8, 16, 32, 64)
MAX_MINOR_ENERGY = 0.01  # the r minor components may hold at most 1% of the weight's energy
MIN_MINOR_LEVEL = 0.05  # ... and their median must reach 5% of the median singular value


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, in float64 (eigenvalues of the shorter side's Gram
    matrix: the minor end is exact to ``sqrt(eps) s_1``, plenty for energy shares)."""
    w = weight.detach().to(torch.float64)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


@dataclass(frozen=True)
class ModuleSpectrum:
    """One target matrix's spectrum shape and the rank the rule gives it."""

    name: str
    shape: tuple[int, int]
    effective_rank: float
    stable_rank: float
    minor_energy: float  # share of ||W||_F^2 in the r smallest components (r = the one asked about)
    principal_energy: float  # ... in the r largest
    minor_flatness: float  # smallest / largest of the r minor singular values
    suggested_rank: int  # 0: no rank of RANKS satisfies the rule
    reason: str

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def describe(
    name: str,
    weight: torch.Tensor,
    r: int,
    *,
    max_minor_energy: float = MAX_MINOR_ENERGY,
    min_minor_level: float = MIN_MINOR_LEVEL,
) -> ModuleSpectrum:
    """The spectrum's shape at rank ``r`` and the rule's rank for this matrix."""
    s = singular_values(weight)
    n = s.numel()
    energy = s.square()
    total = float(energy.sum()) or 1.0
    p = s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1.0 / n)
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    median = float(s.median())

    def minor_energy(k: int) -> float:
        return float(energy[n - k :].sum()) / total

    def minor_level(k: int) -> float:
        """The median of the k minor values (a larger k cannot hide dead directions)."""
        return float(s[n - k :].median())

    fits = [
        k
        for k in RANKS
        if k <= n // 4 and minor_energy(k) <= max_minor_energy and minor_level(k) >= min_minor_level * median
    ]
    chosen = max(fits, default=0)
    if chosen:
        reason = (
            f"r={chosen}: its {chosen} minor components hold {minor_energy(chosen):.2%} of the energy "
            f"(<= {max_minor_energy:.0%}), their median {minor_level(chosen) / median:.2f} of the "
            f"spectrum's median (>= {min_minor_level:g})"
        )
    else:
        smallest = RANKS[0]
        why = []
        if smallest > n // 4:
            why.append(f"too small ({n} singular values)")
        if minor_energy(smallest) > max_minor_energy:
            why.append(f"even {smallest} minor components hold {minor_energy(smallest):.2%} of the energy")
        if minor_level(smallest) < min_minor_level * median:
            why.append(
                f"its minor components vanish ({minor_level(smallest) / median:.2g} of the median): "
                "MiLoRA's factors would start near zero"
            )
        reason = "not suggested: " + "; ".join(why)
    k = min(r, n)
    return ModuleSpectrum(
        name=name,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        effective_rank=math.exp(entropy),
        stable_rank=total / float(energy[0]) if float(energy[0]) > 0 else 0.0,
        minor_energy=minor_energy(k),
        principal_energy=float(energy[:k].sum()) / total,
        minor_flatness=float(s[-1] / s[n - k]) if float(s[n - k]) > 0 else 0.0,
        suggested_rank=chosen,
        reason=reason,
    )


@dataclass(frozen=True)
class Suggestion:
    """The rank and targets the rule suggests, with one reason line per module name."""

    rank: int
    target_modules: tuple[str, ...]
    rank_pattern: dict[str, int] = field(default_factory=dict)  # layer name -> its smaller rank
    reasons: dict[str, str] = field(default_factory=dict)  # module name -> why (not) suggested


def suggest(modules: Iterable[ModuleSpectrum]) -> Suggestion:
    """The rule's rank and targets over every layer of every module name (module docstring)."""
    by_kind: Mapping[str, list[ModuleSpectrum]] = defaultdict(list)
    for module in modules:
        by_kind[module.kind].append(module)
    chosen: dict[str, list[ModuleSpectrum]] = {}
    reasons: dict[str, str] = {}
    for kind, layers in sorted(by_kind.items()):
        ranked = [m for m in layers if m.suggested_rank]
        if 2 * len(ranked) >= len(layers):
            chosen[kind] = layers
            ranks = sorted(m.suggested_rank for m in ranked)
            reasons[kind] = (
                f"adapt: {len(ranked)} of {len(layers)} layers have a minor subspace that is small and "
                f"alive (ranks {ranks[0]}..{ranks[-1]}, median {statistics.median_low(ranks)})"
            )
        else:
            failing = next(m for m in layers if not m.suggested_rank)
            reasons[kind] = (
                f"skip: {len(layers) - len(ranked)} of {len(layers)} layers fail ({failing.reason})"
            )
    if not chosen:
        return Suggestion(0, (), {}, reasons)
    ranks = [m.suggested_rank for layers in chosen.values() for m in layers if m.suggested_rank]
    median = statistics.median_low(ranks)
    rank = max(k for k in RANKS if k <= median)
    pattern = {
        m.name: m.suggested_rank
        for layers in chosen.values()
        for m in layers
        if m.suggested_rank and m.suggested_rank < rank
    }
    # A chosen module name's layers without any rank take the smallest, never an unsafe r.
    pattern.update({m.name: RANKS[0] for layers in chosen.values() for m in layers if not m.suggested_rank})
    return Suggestion(rank, tuple(sorted(chosen)), pattern, reasons)


def candidate_modules(model: nn.Module, targets: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """``{layer name: weight (out x in)}`` of ``targets`` (module names), or by default of every
    linear layer inside the model's blocks (the output head and embeddings excluded; on a
    vision-language model, its language model's, as the init adapts by default)."""
    found: dict[str, torch.Tensor] = {}
    exclude = exclude_modules(model, targets or ())
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or "." not in name or excluded(name, exclude):
            continue
        kind = name.rsplit(".", 1)[-1]
        if (targets is not None and kind not in targets) or (targets is None and kind == "lm_head"):
            continue
        found[name] = module.weight.T if isinstance(module, Conv1D) else module.weight
    return found


def suggest_for_model(
    model: nn.Module, r: int = 16, targets: tuple[str, ...] | None = None
) -> tuple[list[ModuleSpectrum], Suggestion]:
    """Every candidate layer described at rank ``r``, and the rule's suggestion over them."""
    described = [describe(name, weight, r) for name, weight in candidate_modules(model, targets).items()]
    return described, suggest(described)
