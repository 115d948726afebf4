"""Loading base models and tokenizers the safe way: local folders, safetensors, no remote code.

A causal LM loads through ``AutoModelForCausalLM``. A vision-language checkpoint (a config
with ``vision_config`` and ``text_config``, LLaVA-style ``image-text-to-text``) whose type
``AutoModelForCausalLM`` does not know loads through ``AutoModelForImageTextToText``; the
adapter then goes on its language model only (:func:`milora.targets.exclude_modules`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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


KINDS = ("auto", "causal-lm", "image-text-to-text")
AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM, "image-text-to-text": AutoModelForImageTextToText}


def model_kind(config: dict) -> str:
    """``image-text-to-text`` for a vision-language config (``vision_config`` and
    ``text_config``) of a type ``AutoModelForCausalLM`` does not load; ``causal-lm`` otherwise
    (so every model that loaded as a causal LM still does)."""
    vision_language = "vision_config" in config and "text_config" in config
    if vision_language and config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "image-text-to-text"
    return "causal-lm"


def is_vision_language(path: str | os.PathLike[str]) -> bool:
    """Whether a model folder holds a vision-language model :func:`load_base_model` loads
    through ``AutoModelForImageTextToText``."""
    config = Path(path) / "config.json"
    return config.is_file() and model_kind(json.loads(config.read_text())) == "image-text-to-text"


def load_base_model(
    path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    kind: str = "auto",
) -> PreTrainedModel:
    """A causal LM, or a vision-language model (``kind``: ``auto`` from its config, see
    :func:`model_kind`), from a local Hugging Face folder; refuses pickled weights."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = model_kind(json.loads((folder / "config.json").read_text()))
    model = AUTO_CLASSES[kind].from_pretrained(
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


# Put before a vision-language chat template, it turns text content into the content parts
# such templates iterate (LLaVA-1.5's renders a text-only string turn as nothing at all).
TEXT_AS_PARTS = (
    "{%- set parts = namespace(messages=[]) -%}{%- for m in messages -%}"
    "{%- set parts.messages = parts.messages + [{'role': m['role'], 'content': "
    "([{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'])}] -%}"
    "{%- endfor -%}{%- set messages = parts.messages -%}"
)


def load_tokenizer(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The base's tokenizer; a vision-language base's chat template also takes plain text
    turns (:data:`TEXT_AS_PARTS`), so text suites and checks render as the processor would."""
    tokenizer = AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code)
    if is_vision_language(path):
        text_as_parts(tokenizer)
    return tokenizer


def text_as_parts(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer`` with :data:`TEXT_AS_PARTS` before its chat template (once)."""
    template = tokenizer.chat_template
    if isinstance(template, str) and not template.startswith(TEXT_AS_PARTS):
        tokenizer.chat_template = TEXT_AS_PARTS + template
    return tokenizer


class ProcessorError(ModelFolderError):
    """A vision-language base without the processor its image inputs need."""


def load_processor(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> ProcessorMixin:
    """The processor of a vision-language base (image preprocessing, tokenizer and the chat
    template that places the image tokens): training and evaluation ask the model through it,
    exactly as it was taught."""
    folder = Path(path)
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise ProcessorError(
            f"{folder}: no processor for image inputs could be loaded ({error}); a vision-language "
            "base folder needs its processor files (processor_config.json / preprocessor_config.json, "
            "the tokenizer and its chat template), as the model's hub repository ships them"
        ) from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ProcessorError(f"{folder}: {type(processor).__name__} is not an image-and-text processor")
    if not processor.chat_template:
        raise ProcessorError(
            f"{folder}: the processor has no chat template (chat_template.jinja / chat_template.json); "
            "image records are rendered through it"
        )
    return processor
