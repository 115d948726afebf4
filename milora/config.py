"""The adapter specification shared by the library, the CLI and the pipeline settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from milora.methods import INIT_METHODS

METHODS: tuple[str, ...] = tuple(INIT_METHODS)
# Decomposition routes (milora.decomposition): auto picks Gram or float64 SVD per matrix.
SOLVERS: tuple[str, ...] = ("auto", "gram", "svd64", "svd32")
# The MiLoRA paper's targets for LLaMA-family models (LLM-Adapters setting).
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def default_alpha(method: str, r: int) -> float:
    """The official code's choice: alpha = r (scale 1) for MiLoRA/PiSSA, 2r for LoRA."""
    return float(INIT_METHODS[method].alpha_per_rank * r)


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to build: method, rank, scale, dropout and target modules."""

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

    def __post_init__(self) -> None:
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
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", default_alpha(self.method, self.r))

    @property
    def scale(self) -> float:
        """``s = lora_alpha / r``, the factor PEFT applies to ``B @ A``."""
        return float(self.lora_alpha) / self.r
