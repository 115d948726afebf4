"""Loading base models and tokenizers the safe way: local folders, safetensors, no remote code."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from milora.errors import UserFacingError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelFolderError(FileNotFoundError, UserFacingError):
    """The base model folder is missing or not a Hugging Face model (a setting to fix, not an
    I/O fault to retry)."""


def parse_dtype(name: str) -> torch.dtype | str:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def load_base_model(
    path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local Hugging Face folder; refuses pickled weights."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=parse_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if device is not None:
        model = model.to(device)
    model.eval()
    logger.info("loaded %s (%s, %.1fM parameters)", folder, model.dtype, model.num_parameters() / 1e6)
    return model


def load_tokenizer(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code)
