"""The adapter specification shared by the library, the CLI and the pipeline settings."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass, field, fields, replace
from typing import Any

from milora.methods import INIT_METHODS

METHODS: tuple[str, ...] = tuple(INIT_METHODS)
# Decomposition routes (milora.decomposition): auto picks Gram or float64 SVD per matrix.
SOLVERS: tuple[str, ...] = ("auto", "gram", "svd64", "svd32")
# The MiLoRA paper's targets for LLaMA-family models (LLM-Adapters setting).
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

RankPattern = tuple[tuple[str, int], ...]
AlphaPattern = tuple[tuple[str, float], ...]


def default_alpha(method: str, r: int) -> float:
    """The official code's choice: alpha = r (scale 1) for MiLoRA/PiSSA, 2r for LoRA."""
    return float(INIT_METHODS[method].alpha_per_rank * r)


def pattern_key(keys: Iterable[str], name: str) -> str:
    """The key of a ``rank_pattern``/``alpha_pattern`` that applies to the layer ``name`` (its
    name in the base model): PEFT's own ``get_pattern_key``, so the project and PEFT never
    disagree. A key is a regular expression matched against the end of the name at a dot
    (``q_proj``, ``layers.0.mlp.down_proj`` or the full name); the first matching key in
    order wins, and ``name`` itself is returned when none matches."""
    from peft.utils.other import get_pattern_key  # imported late: the settings load without torch

    return get_pattern_key(list(keys), name)


def pattern_value(pattern: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """What ``pattern`` gives the layer ``name`` (``default`` when no key applies), exactly as
    PEFT's LoRA model resolves ``rank_pattern``/``alpha_pattern`` for that layer. ``pattern``
    is taken in sorted key order, the order PEFT reads it back from a saved adapter_config."""
    if not pattern:
        return default
    ordered = dict(sorted(pattern.items()))
    return ordered.get(pattern_key(ordered, name), default)


def matching_keys(pattern: Mapping[str, Any] | Iterable[tuple[str, Any]], name: str) -> list[str]:
    """Every key of ``pattern`` that, alone, would apply to the layer ``name`` (PEFT's rule)."""
    keys = pattern.keys() if isinstance(pattern, Mapping) else [k for k, _ in pattern]
    return [key for key in keys if pattern_key([key], name) == key]


def _pattern(value: Any, what: str, integer: bool) -> tuple[tuple[str, Any], ...]:
    """A rank or alpha pattern as ``((key, value), ...)`` sorted by key, validated."""
    if value is None:
        return ()
    items = list(value.items()) if isinstance(value, Mapping) else [tuple(pair) for pair in value]
    out: dict[str, Any] = {}
    for item in items:
        if len(item) != 2:
            raise ValueError(f"{what} entries must be (layer key, value) pairs, got {item!r}")
        key, number = item
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what} keys must be non-empty layer names, got {key!r}")
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"{what} key {key!r} is not a valid pattern: {error}") from None
        if key in out:
            raise ValueError(f"{what} names {key!r} twice")
        if integer:
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ValueError(f"{what}[{key!r}] must be a positive integer, got {number!r}")
        else:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not number > 0:
                raise ValueError(f"{what}[{key!r}] must be positive, got {number!r}")
            number = float(number)
        out[key] = number
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to build: method, rank, scale, dropout and target modules.

    ``rank_pattern`` (``{layer key: rank}``) gives some layers their own rank, ``alpha_pattern``
    their own alpha: PEFT's options of the same names and matching rule (:func:`pattern_key`;
    a key is a module name suffix or a full layer name). Both are kept as ``((key, value), ...)``
    sorted by key, the order PEFT reads them back in; pass a dict. With ``lora_alpha`` left to
    its default, every ``rank_pattern`` key also gets the alpha that keeps the method's scale
    (alpha = its rank for milora/pissa: scale 1 everywhere); with an explicit ``lora_alpha`` a
    layer of another rank has scale ``lora_alpha / its rank``, as in PEFT.
    """

    method: str = field(default="milora", metadata={"help": f"one of {', '.join(METHODS)}"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "scale numerator; None = r for milora/pissa, 2r for lora"}
    )
    target_modules: tuple[str, ...] | str = field(
        default=DEFAULT_TARGETS,
        metadata={"help": "module name suffixes, or one regular expression (PEFT's rule)"},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    solver: str = field(default="auto", metadata={"help": f"decomposition solver: {SOLVERS}"})
    # Per-layer ranks and alphas: init arguments kept as attributes (``((key, value), ...)``),
    # not dataclass fields, so ``asdict(spec)`` (what a run key hashes) of a spec without them is
    # what it always was; :meth:`patterns` gives them where they are set. Equality, hashing,
    # repr and ``dataclasses.replace`` include them.
    rank_pattern: InitVar[RankPattern | Mapping[str, int] | None] = None
    alpha_pattern: InitVar[AlphaPattern | Mapping[str, float] | None] = None

    def __post_init__(self, rank_pattern: Any, alpha_pattern: Any) -> None:
        if self.method not in INIT_METHODS:
            raise ValueError(f"method must be one of {tuple(INIT_METHODS)}, got {self.method!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules is empty: name the modules to adapt")
        else:
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules must be non-empty names, got {targets!r}")
            object.__setattr__(self, "target_modules", targets)
        ranks = _pattern(rank_pattern, "rank_pattern", integer=True)
        alphas = dict(_pattern(alpha_pattern, "alpha_pattern", integer=False))
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", default_alpha(self.method, self.r))
            # A layer of its own rank keeps the method's scale (PEFT would keep alpha instead).
            for key, rank in ranks:
                alphas.setdefault(key, default_alpha(self.method, rank))
        object.__setattr__(self, "rank_pattern", ranks)
        object.__setattr__(self, "alpha_pattern", tuple(sorted(alphas.items())))

    def _key(self) -> tuple[Any, ...]:
        return (*(getattr(self, f.name) for f in fields(self)), self.rank_pattern, self.alpha_pattern)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)]
        parts += [f"{name}={value!r}" for name, value in self.patterns().items()]
        return f"{type(self).__qualname__}({', '.join(parts)})"

    @property
    def scale(self) -> float:
        """``s = lora_alpha / r``, the factor PEFT applies to ``B @ A`` (of a layer no pattern
        names; :meth:`scale_of` for any layer)."""
        return float(self.lora_alpha) / self.r

    @property
    def has_patterns(self) -> bool:
        return bool(self.rank_pattern or self.alpha_pattern)

    def rank_of(self, layer: str) -> int:
        """The rank of the layer ``layer`` (its name in the base model), PEFT's way."""
        return pattern_value(dict(self.rank_pattern), layer, self.r)

    def alpha_of(self, layer: str) -> float:
        """The lora_alpha of the layer ``layer``, PEFT's way."""
        return pattern_value(dict(self.alpha_pattern), layer, self.lora_alpha)

    def scale_of(self, layer: str) -> float:
        """``alpha / r`` of the layer ``layer``: what PEFT's layer multiplies ``B @ A`` by."""
        if not self.has_patterns:
            return self.scale
        return float(self.alpha_of(layer)) / self.rank_of(layer)

    def for_layer(self, layer: str) -> AdapterSpec:
        """This spec as one layer sees it: its own rank and alpha, no patterns (what a
        method's ``init`` reads ``r`` and ``scale`` from)."""
        if not self.has_patterns:
            return self
        return replace(
            self, r=self.rank_of(layer), lora_alpha=self.alpha_of(layer), rank_pattern=(), alpha_pattern=()
        )

    def check_layers(self, layers: Iterable[str]) -> None:
        """Refuse patterns that do not say one thing per adapted layer: a key that names none
        of ``layers`` (a typo would silently keep r), or a layer two keys give different
        values (PEFT would take the first in sorted order, whatever was meant)."""
        layers = list(layers)
        for what, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            values = dict(pattern)
            used: set[str] = set()
            for layer in layers:
                keys = matching_keys(pattern, layer)
                used.update(keys)
                if len({values[k] for k in keys}) > 1:
                    raise ValueError(
                        f"{what}: layer {layer!r} matches keys {keys} with different values "
                        f"{[values[k] for k in keys]}; make the keys name disjoint layers"
                    )
            unused = [key for key in values if key not in used]
            if unused:
                raise ValueError(
                    f"{what} keys {unused} match none of the {len(layers)} adapted layers "
                    f"(e.g. {layers[:2]}); a key is a module name suffix or a full layer name"
                )

    def patterns(self) -> dict[str, dict[str, Any]]:
        """``{"rank_pattern": {...}, "alpha_pattern": {...}}``, only those that are set (what a
        manifest records; an adapter without patterns records nothing new)."""
        return {
            name: dict(pattern)
            for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern))
            if pattern
        }
