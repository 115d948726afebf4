"""Finding and vetting the layers an adapter will wrap.

On a vision-language model (LLaVA-style: ``model.language_model``, ``model.vision_tower``,
``model.multi_modal_projector``; the other names in :data:`VISION_PARTS`) only the language
model is adapted by default: the vision tower and the projector are left out through PEFT's
own ``exclude_modules`` (:func:`exclude_modules`) unless a target names them (a full or
dotted name containing the part's name, or a pattern that does). :func:`find_targets`
applies the same exclusion, by PEFT's rule, so it lists exactly the layers PEFT wraps.
"""

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


# Parts of a vision-language model adapted only when a target names them, with their labels.
# LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3: vision_tower + multi_modal_projector; Qwen2-VL and
# Qwen2.5-VL: visual (its merger inside; its MLP layers are named up_proj/down_proj too);
# Idefics3, SmolVLM, Mllama: vision_model (+ connector).
VISION_PARTS: dict[str, str] = {
    "vision_tower": "vision tower",
    "visual": "vision tower",
    "vision_model": "vision tower",
    "multi_modal_projector": "projector",
    "connector": "projector",
}
LANGUAGE_MODEL = "language model"


def part_of(name: str) -> str | None:
    """The vision part (a :data:`VISION_PARTS` key) a module name lies in; None elsewhere."""
    components = name.split(".")
    return next((part for part in VISION_PARTS if part in components), None)


def model_parts(model: nn.Module) -> set[str]:
    """The :data:`VISION_PARTS` a model has (empty for a causal LM)."""
    return {part for name, _ in model.named_modules() if (part := part_of(name)) is not None}


def exclude_modules(model: nn.Module, targets: tuple[str, ...] | str) -> str | None:
    """PEFT's ``exclude_modules`` (a pattern, fully matched) keeping the model's vision parts
    out of the adapter except where ``targets`` name them; None when nothing is left out
    (always for a causal LM, so its config is unchanged).

    A list: a part's layers are excluded unless matched (PEFT's suffix rule) by a target
    that contains the part's name, so ``("q_proj", "vision_tower.encoder.layers.0.self_attn.q_proj")``
    adapts the language model's q_proj and that one vision layer. A pattern that contains a
    part's name decides that part's layers itself.
    """
    return exclude_pattern(model_parts(model), targets)


def exclude_pattern(parts: set[str], targets: tuple[str, ...] | str) -> str | None:
    """:func:`exclude_modules` for a model with these :data:`VISION_PARTS` (known from its
    module names alone, as the streamed init knows them)."""
    rules = []
    for part in sorted(parts):
        inside = rf"(?:.*\.)?{re.escape(part)}\..*"
        if isinstance(targets, str):
            if part not in targets:
                rules.append(inside)
            continue
        named = [re.escape(t) for t in targets if part in t]
        rules.append(f"(?!(?:.*\\.)?(?:{'|'.join(named)})$){inside}" if named else inside)
    if not rules:
        return None
    return rules[0] if len(rules) == 1 else "|".join(f"(?:{rule})" for rule in rules)


def excluded(name: str, exclude: str | None) -> bool:
    """PEFT's rule for a pattern ``exclude_modules``: the full name matches it."""
    return exclude is not None and re.fullmatch(exclude, name) is not None


def find_targets(model: nn.Module, targets: tuple[str, ...] | str, r: int) -> list[Target]:
    """The layers matching ``targets``, each checked; raises with what to do otherwise.

    On a vision-language model, the layers :func:`exclude_modules` leaves out are skipped,
    as PEFT skips them."""
    exclude = exclude_modules(model, targets)
    found: list[Target] = []
    for name, module in model.named_modules():
        if not name or not matches(name, targets) or excluded(name, exclude):
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
    adaptable = _adaptable(model)
    if isinstance(targets, str):
        if not found:
            raise TargetError(f"target_modules pattern {targets!r} matches no linear layer; {adaptable}")
        return
    hit = {t for t in targets for f in found if f.name == t or f.name.endswith("." + t)}
    missing = [t for t in targets if t not in hit]
    if missing:
        where = "the language model's" if model_parts(model) else "the model's"
        raise TargetError(f"target modules {missing} not found among {where} linear layers; {adaptable}")


def _adaptable(model: nn.Module) -> str:
    """The adaptable (linear) layer names, by part on a vision-language model."""
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not model_parts(model):
        return f"adaptable names are {sorted({n.rsplit('.', 1)[-1] for n in linear})}"
    by_part: dict[str, list[str]] = {}
    for name in linear:
        by_part.setdefault(part_of(name) or LANGUAGE_MODEL, []).append(name)
    said = [f"{LANGUAGE_MODEL}: {sorted({n.rsplit('.', 1)[-1] for n in by_part.get(LANGUAGE_MODEL, [])})}"]
    for part, label in VISION_PARTS.items():
        if part in by_part:
            names = by_part[part]
            said.append(
                f"{label} ({part}): {sorted({n.rsplit('.', 1)[-1] for n in names})}, e.g. {names[0]!r}"
            )
    return (
        "adaptable names are, by part, "
        + "; ".join(said)
        + " (the vision tower and projector are adapted only when a target names them: a full or "
        "dotted name containing the part's name in parentheses, or a pattern such as "
        "r'.*vision_tower.*\\.q_proj')"
    )
