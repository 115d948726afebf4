"""Training adapters with Hugging Face's Trainer: response-only, resumable, distributed.

Names are imported on first use so :class:`TrainConfig` (read by the pipeline settings)
loads without transformers.
"""

from __future__ import annotations

from milora._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "milora.training.config",
    "alpaca_messages": "milora.training.examples",
    "encode": "milora.training.examples",
    "prompt_text": "milora.training.examples",
    "NonFiniteLossError": "milora.training.loop",
    "TrainResult": "milora.training.loop",
    "last_complete_checkpoint": "milora.training.loop",
    "train_adapter": "milora.training.loop",
    "run_training": "milora.training.run",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
