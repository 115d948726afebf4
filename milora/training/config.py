"""Training hyperparameters, defaulting to the paper's LLM-Adapters setting."""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is the global batch: per optimiser step, across
    every process, as in the paper (16); ``micro_batch_size`` is what one process holds
    at once. Gradient accumulation makes up the difference, so 1 or N processes train the
    same way."""

    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    num_epochs: float = field(
        default=3.0, metadata={"help": "passes over the data (ignored if max_steps > 0)"}
    )
    max_steps: int = field(default=-1, metadata={"help": "optimiser steps; -1 = from num_epochs"})
    batch_size: int = field(default=16, metadata={"help": "global batch per optimiser step"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per process per forward"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    lr_scheduler: str = field(default="linear", metadata={"help": f"one of {SCHEDULERS}"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = field(default=512, metadata={"help": "tokens per sequence; longer ones are cut"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N optimiser steps"})
    save_total_limit: int | None = field(default=3, metadata={"help": "checkpoints kept"})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "keep checkpoints after success (they are for resuming)"}
    )
    logging_steps: int = 10
    seed: int = 42
    group_by_length: bool = field(
        default=True, metadata={"help": "batch sequences of similar length (less padding)"}
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "padding-free micro-batches: each one's sequences in one row, attention kept "
            "within each sequence (milora.training.packing); models that cannot (not sdpa, "
            "sliding windows) are padded instead"
        },
    )
    gap_dropout: bool = field(
        default=True,
        metadata={
            "help": "LoRA dropout on a CPU draws the gaps between drops, ~p random numbers per "
            "element instead of one, same distribution (milora.training.dropout); off: torch's"
        },
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (GPU)"})
    gradient_checkpointing: bool = False
    replay_share: float = field(
        default=0.0,
        metadata={"help": "share of every batch taken by general (replay) data; 0: company data only"},
    )

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("batch_size and micro_batch_size must be positive")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}"
            )
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_epochs > 0")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if not 0.0 <= self.replay_share < 1.0:
            raise ValueError(f"replay_share must be in [0, 1), got {self.replay_share}")
        if self.replay_share and self.replay_rows_per_batch() == 0:
            raise ValueError(
                f"replay_share {self.replay_share} x batch_size {self.batch_size} rounds to no replay row "
                "per batch; raise it or set 0"
            )
        if self.max_length < 8:
            raise ValueError(f"max_length {self.max_length} is too small")
        if self.save_steps < 1 or self.logging_steps < 1:
            raise ValueError("save_steps and logging_steps must be positive")

    def replay_rows_per_batch(self) -> int:
        """Replay rows in each global batch (the rest are company rows)."""
        return min(self.batch_size - 1, round(self.replay_share * self.batch_size))

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimiser step on each of ``world_size`` processes."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {world_size} processes"
            )
        return self.batch_size // per_step
