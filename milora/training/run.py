"""A training run from folders: base model + conversations file -> run folder, resumable.

Start or resume is decided by the run folder alone: if it holds this run's initial adapter
(``init/``) and a complete checkpoint, the stock base gets its residual rebuilt from the
saved initial factors (no SVD) and training continues from the checkpoint; otherwise the
adapter is initialised afresh. Under ``torchrun`` every process runs this same code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from milora.adapter_io import load_adapter, save_adapter
from milora.cache import DecompositionCache
from milora.config import AdapterSpec
from milora.initialize import init_adapter
from milora.modeling import load_base_model, load_tokenizer
from milora.training.config import TrainConfig
from milora.training.examples import Message, alpaca_messages
from milora.training.loop import (
    INITIAL_ADAPTER,
    TrainResult,
    is_main_process,
    last_complete_checkpoint,
    train_adapter,
)

logger = logging.getLogger(__name__)


def read_conversations(path: str | os.PathLike[str]) -> list[list[Message]]:
    """JSON lines of ``{"messages": [...]}`` or Alpaca ``{"instruction", "input", "output"}``."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if "messages" in record:
                conversations.append(record["messages"])
            elif {"instruction", "output"} <= record.keys():
                conversations.append(
                    alpaca_messages(record["instruction"], record.get("input", ""), record["output"])
                )
            else:
                raise ValueError(f"{path}:{number}: expected 'messages' or 'instruction'/'output' fields")
    return conversations


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_training(
    base_path: str | os.PathLike[str],
    conversations: Sequence[Sequence[Message]],
    run_dir: str | os.PathLike[str],
    spec: AdapterSpec,
    config: TrainConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Initialise (or restore) the adapter and train it; see the module docstring."""
    run_dir = Path(run_dir)
    base = load_base_model(base_path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(base_path, trust_remote_code=trust_remote_code)
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is not None and (run_dir / INITIAL_ADAPTER / "milora.json").is_file():
        logger.info("resuming from %s", checkpoint)
        model = load_adapter(base, run_dir / INITIAL_ADAPTER, is_trainable=True)
    else:
        checkpoint = None
        cache = DecompositionCache(cache_dir) if cache_dir else None
        model = init_adapter(base, spec, cache=cache, seed=config.seed, progress=is_main_process())
        if is_main_process():
            save_adapter(model, run_dir / INITIAL_ADAPTER, base_model=str(base_path), overwrite=True)
    model.train()
    result = train_adapter(
        model, tokenizer, conversations, run_dir, config, resume_from=checkpoint, base_model=str(base_path)
    )
    _barrier()
    return result
