"""Training adapters with Hugging Face's Trainer: response-only, resumable, distributed."""

from milora.training.config import TrainConfig
from milora.training.examples import alpaca_messages, encode, prompt_text
from milora.training.loop import NonFiniteLossError, TrainResult, last_complete_checkpoint, train_adapter
from milora.training.run import run_training

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "alpaca_messages",
    "encode",
    "last_complete_checkpoint",
    "prompt_text",
    "run_training",
    "train_adapter",
]
