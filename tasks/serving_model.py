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
sets their length).
"""

from __future__ import annotations

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


class AdapterOnStockBase(PythonModel):
    """Greedy chat answers from the base model named in ``model_config`` plus the logged adapter."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the base model and put the adapter on it (once, when MLflow loads the model)."""
        import torch

        from milora.offline import OFFLINE_ENV

        for key, value in OFFLINE_ENV.items():  # never reach a model hub or telemetry endpoint
            os.environ.setdefault(key, value)
        from milora.adapter_io import load_adapter
        from milora.modeling import load_base_model, load_tokenizer

        config: Mapping[str, Any] = context.model_config or {}
        base = config.get("base_model")
        missing = [key for key in ("base_model", "max_new_tokens") if not config.get(key)]
        if missing:
            raise ValueError(f"model_config lacks {missing} (base_model: the base model folder)")
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.config = dict(config)
        self.tokenizer = load_tokenizer(base)
        model = load_base_model(base, dtype=str(config.get("dtype", "float32")), device=device)
        self.model = load_adapter(model, context.artifacts[ADAPTER_ARTIFACT])
        self.model.eval()
        logger.info("serving %s + adapter %s on %s", base, context.artifacts[ADAPTER_ARTIFACT], device)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """One answer per prompt; ``params["max_new_tokens"]`` overrides the configured length."""
        from milora.evaluation.generation import greedy_generate
        from milora.training.examples import prompt_text

        prompts = _prompts(model_input)
        if not prompts:
            return []
        limit = (params or {}).get("max_new_tokens") or self.config["max_new_tokens"]
        rendered = [prompt_text(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        return greedy_generate(
            self.model,
            self.tokenizer,
            rendered,
            max_new_tokens=int(limit),
            batch_size=int(self.config.get("batch_size", 8)),
            first_line=False,
        )


mlflow.models.set_model(AdapterOnStockBase())
