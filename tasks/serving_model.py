"""The registered model: the unmodified base plus the served plain-LoRA adapter, as MLflow pyfunc.

MLflow "models from code": ``tasks.register`` logs this file (not a pickled object), and
``mlflow.pyfunc.load_model("models:/<name>@champion")`` runs it to rebuild the model. It
must stay cheap to execute (MLflow runs it at logging time too): the base model is loaded
only in ``load_context``. It imports nothing from ``tasks`` (only this file is copied into the
model; the ``milora`` package is logged next to it as code).

``model_config``: ``base_model`` (absolute path of a local Hugging Face folder, loaded
offline, safetensors only, no remote code), ``max_new_tokens``, ``batch_size``, ``dtype`` and
``device`` (null: CUDA when present). ``predict`` takes a DataFrame with a ``prompt`` column
(the signature MLflow enforces), renders each prompt as a user turn through the tokenizer's
chat template, as in training, and returns the greedy answers (``params={"max_new_tokens": N}``
sets their length). On a vision-language base, an optional ``images`` column gives each
prompt's pictures as a list of base64 texts (or ``data:`` URIs), never paths: a served model does not
read the server's files at a request's word. They go through the model's processor, as in
training; a text model given images says so.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from collections.abc import Mapping
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"  # key of the served adapter folder in the model's artifacts
PROMPT_COLUMN = "prompt"
IMAGES_COLUMN = "images"  # optional: each row's pictures, base64
# What a request's picture may be: the common raster formats (never EPS and the like, which
# PIL hands to other programs) within a side bound (as validation's default max_side).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_IMAGE_SIDE = 8192


def _prompts(model_input: Any) -> list[str]:
    """The prompts of a DataFrame's ``prompt`` column (a Series or a list when called directly)."""
    if isinstance(model_input, pd.DataFrame):
        if PROMPT_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a {PROMPT_COLUMN!r} column, got {list(model_input.columns)}")
        model_input = model_input[PROMPT_COLUMN]
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts = list(model_input)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {sorted(set(bad))}")
    return prompts


def _images(model_input: Any, rows: int) -> list[list[Any]]:
    """Each row's pictures from the ``images`` column (a list of base64 texts, or nothing;
    MLflow's signature takes lists), decoded: a row and picture that do not decode, are of
    another format or too large are named."""
    from PIL import Image

    if not isinstance(model_input, pd.DataFrame) or IMAGES_COLUMN not in model_input.columns:
        return [[] for _ in range(rows)]
    decoded: list[list[Any]] = []
    for row, cell in enumerate(model_input[IMAGES_COLUMN]):
        texts = [cell] if isinstance(cell, str) else [] if cell is None or _missing(cell) else list(cell)
        pictures = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"row {row}, image {index}: base64 text expected, got {type(text).__name__}")
            payload = text.split(",", 1)[1] if text.startswith("data:") else text
            try:
                image = Image.open(
                    io.BytesIO(base64.b64decode(payload, validate=True)), formats=IMAGE_FORMATS
                )
                if max(image.size) > MAX_IMAGE_SIDE:
                    raise ValueError(f"{image.size[0]}x{image.size[1]} pixels, above {MAX_IMAGE_SIDE} a side")
                image.load()
            except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as error:
                raise ValueError(
                    f"row {row}, image {index} is not a base64-encoded picture in {'/'.join(IMAGE_FORMATS)} "
                    f"within {MAX_IMAGE_SIDE} pixels a side ({error}); send the image file's bytes in base64"
                ) from None
            pictures.append(image)
        decoded.append(pictures)
    return decoded


def _missing(cell: Any) -> bool:
    """A cell pandas fills when a row gives no images (NaN)."""
    return isinstance(cell, float) and cell != cell


class AdapterOnStockBase(PythonModel):
    """Greedy chat answers from the base model named in ``model_config`` plus the logged adapter."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the base model and put the adapter on it (once, when MLflow loads the model)."""
        import torch

        from milora.offline import OFFLINE_ENV

        for key, value in OFFLINE_ENV.items():  # never reach a model hub or telemetry endpoint
            os.environ.setdefault(key, value)
        from milora.adapter_io import load_adapter
        from milora.modeling import is_vision_language, load_base_model, load_processor, load_tokenizer

        config: Mapping[str, Any] = context.model_config or {}
        base = config.get("base_model")
        missing = [key for key in ("base_model", "max_new_tokens") if not config.get(key)]
        if missing:
            raise ValueError(f"model_config lacks {missing} (base_model: the base model folder)")
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.config = dict(config)
        self.processor = load_processor(base) if is_vision_language(base) else None
        self.tokenizer = self.processor.tokenizer if self.processor is not None else load_tokenizer(base)
        model = load_base_model(base, dtype=str(config.get("dtype", "float32")), device=device)
        self.model = load_adapter(model, context.artifacts[ADAPTER_ARTIFACT])
        self.model.eval()
        logger.info("serving %s + adapter %s on %s", base, context.artifacts[ADAPTER_ARTIFACT], device)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """One answer per prompt; ``params["max_new_tokens"]`` overrides the configured length."""
        from milora.evaluation.generation import greedy_generate
        from milora.training import multimodal
        from milora.training.examples import prompt_text

        prompts = _prompts(model_input)
        if not prompts:
            return []
        images = _images(model_input, len(prompts))
        limit = (params or {}).get("max_new_tokens") or self.config["max_new_tokens"]
        if self.processor is None:
            pictured = [row for row, pictures in enumerate(images) if pictures]
            if pictured:
                raise ValueError(
                    f"this model reads text only ({self.config['base_model']} is not a vision-language "
                    f"model): rows {pictured[:5]} carry images"
                )
            rendered = [prompt_text(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        else:
            rendered = [
                multimodal.prompt_text(
                    self.processor, [{"role": "user", "content": p, multimodal.IMAGES: pictures}]
                )
                for p, pictures in zip(prompts, images, strict=True)
            ]
        return greedy_generate(
            self.model,
            self.tokenizer,
            rendered,
            max_new_tokens=int(limit),
            batch_size=int(self.config.get("batch_size", 8)),
            first_line=False,
            images=images if self.processor is not None else None,
            processor=self.processor,
        )


mlflow.models.set_model(AdapterOnStockBase())
