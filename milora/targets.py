"""Finding and vetting the layers an adapter will wrap."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from milora.errors import UserFacingError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TargetError(ValueError, UserFacingError):
    """The target modules do not fit the model (missing, mixed kinds, rank too large)."""


@dataclass(frozen=True)
class Target:
    """One layer to adapt. ``fan_in_fan_out`` marks GPT-2 style Conv1D (weight is in x out)."""

    name: str
    module: nn.Module
    fan_in_fan_out: bool

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), whatever the storage orientation."""
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)


def matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's rule: a string is a full regular expression, a list matches name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: tuple[str, ...] | str, r: int) -> list[Target]:
    """The layers matching ``targets``, each checked; raises with what to do otherwise."""
    found: list[Target] = []
    for name, module in model.named_modules():
        if not name or not matches(name, targets):
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        _check_weight(name, module)
        target = Target(name, module, isinstance(module, Conv1D))
        if r > min(target.shape):
            raise TargetError(
                f"rank r={r} exceeds min(out, in)={min(target.shape)} of {name} "
                f"(shape {target.shape[0]}x{target.shape[1]}); choose r <= {min(target.shape)}"
            )
        found.append(target)
    _check_all_named(model, targets, found)
    if len({t.fan_in_fan_out for t in found}) > 1:
        raise TargetError("targets mix nn.Linear and Conv1D layers; adapt them in separate adapters")
    return found


def _check_weight(name: str, module: nn.Module) -> None:
    weight = module.weight
    quantized = (
        not weight.is_floating_point()
        or hasattr(weight, "quant_state")
        or hasattr(module, "quant_config")
        or "4bit" in type(module).__name__
        or "8bit" in type(module).__name__
    )
    if quantized:
        raise TypeError(
            f"{name} holds a quantized or non-float weight ({type(module).__name__}, "
            f"{weight.dtype}); initialise on a float32/bfloat16/float16 copy of the base and "
            "quantize the residual model afterwards"
        )
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {weight.dtype}; use float32/bfloat16/float16")
    if weight.device.type == "meta":
        raise TargetError(f"{name} is on the meta device: load real weights before initialising")


def _check_all_named(model: nn.Module, targets: tuple[str, ...] | str, found: list[Target]) -> None:
    adaptable = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    )
    if isinstance(targets, str):
        if not found:
            raise TargetError(
                f"target_modules pattern {targets!r} matches no linear layer; adaptable names are {adaptable}"
            )
        return
    hit = {t for t in targets for f in found if f.name == t or f.name.endswith("." + t)}
    missing = [t for t in targets if t not in hit]
    if missing:
        raise TargetError(
            f"target modules {missing} not found among the model's linear layers; "
            f"adaptable names are {adaptable}"
        )
