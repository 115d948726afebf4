"""Optional bridge to EleutherAI's lm-evaluation-harness, for users with hub access.

The default suites (``milora.evaluation.suites``) need nothing beyond this package. This
module lets the same in-memory model (base, PEFT adapter or merged) be scored on the
harness's public tasks, or on local task YAMLs, so results are comparable with published
numbers. ``lm_eval`` is imported inside the functions: importing this module never needs it.

The model is handed to ``HFLM`` as an instance (``pretrained=<model>``), not as a hub name,
so nothing is reloaded and a ``peft.PeftModel`` is evaluated as it is, adapter active. Public
tasks download their data sets from the hub; local tasks (``include_path``) need no network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM

logger = logging.getLogger(__name__)

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'milora[harness]'"

# Keys of a task's entry in the harness's "results" that are labels, not metrics.
_NON_METRIC_KEYS = frozenset({"alias", "name", "sample_len", "samples"})


def _require_lm_eval() -> None:
    """Fail with an install hint rather than a bare ModuleNotFoundError deep in a run."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error


def harness_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> HFLM:
    """Wrap an already loaded causal LM (plain, PEFT or merged) as the harness's ``HFLM``.

    Passing the instance keeps the weights in memory as they are: no reload from a path,
    no second copy, and for a ``PeftModel`` the active adapter takes part in every forward
    pass (HFLM only calls ``model(input_ids).logits`` and ``model.generate``). HFLM puts the
    model in eval mode and, if the tokenizer has no pad token, sets one (unk, else eos).
    ``max_length`` defaults to the model config's context length.
    """
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    # HFLM ignores ``device`` for an instance and reads ``model.device``; it never moves it.
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _jsonable(value: Any) -> Any:
    """The harness's results hold numpy scalars, tuples and dtypes: make them plain JSON."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's ``results`` (numeric values only).

    The harness keys metrics as ``"acc,none"`` (metric, filter); the default filter
    ``none`` is dropped, any other stays (``"exact_match,strict-match"``). Stderrs the
    harness could not compute (``"N/A"``) are left out.
    """
    summary: dict[str, dict[str, float]] = {}
    for task, entry in results.items():
        metrics: dict[str, float] = {}
        for key, value in entry.items():
            if key in _NON_METRIC_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else key
            metrics[name] = float(value)
        summary[task] = metrics
    return summary


def run_harness(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on harness ``tasks``; return a JSON-serialisable summary.

    ``include_path`` adds local task YAMLs (data from local files needs no network).
    ``include_defaults=False`` skips indexing the ~15k built-in tasks (over ten seconds on a
    small CPU) when only local tasks are run. ``limit`` caps the documents per task (a
    fraction if < 1). ``bootstrap_iters`` only matters for metrics without a closed-form
    stderr (accuracy has one). The model's train/eval mode is restored afterwards.

    Returns ``{"summary": {task: {metric: value}}, "results": <harness results>,
    "n_samples": {task: n}, "versions": ..., "n_shot": ..., "lm_eval_version": ...}`` and,
    with ``log_samples``, ``"samples"``: every document's requests and responses.
    """
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_list = list(tasks)
    if not task_list:
        raise ValueError("run_harness needs at least one task name")
    if include_path is not None and not isinstance(include_path, (str, Path)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    # Without include_path the harness's own default manager (built-in tasks) is used.
    task_manager = (
        TaskManager(include_path=include_path, include_defaults=include_defaults)
        if include_path or not include_defaults
        else None
    )

    was_training = model.training
    logger.info("lm-eval: tasks %s (limit %s, %s-shot)", task_list, limit, num_fewshot)
    try:
        raw = lm_eval.simple_evaluate(
            model=harness_model(model, tokenizer, batch_size=batch_size),
            tasks=task_list,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            task_manager=task_manager,
        )
    finally:
        model.train(was_training)
    if raw is None:  # only on non-zero ranks of a distributed run, which this bridge is not
        raise RuntimeError("lm-eval returned no results")

    results = _jsonable(raw["results"])
    out: dict[str, Any] = {
        "summary": summarize(results),
        "results": results,
        "n_samples": {task: n.get("effective") for task, n in _jsonable(raw.get("n-samples", {})).items()},
        "versions": _jsonable(raw.get("versions", {})),
        "n_shot": _jsonable(raw.get("n-shot", {})),
        "lm_eval_version": raw.get("lm_eval_version"),
    }
    if log_samples:
        out["samples"] = _jsonable(raw.get("samples", {}))
    for task, metrics in out["summary"].items():
        logger.info("lm-eval %s: %s", task, metrics)
    return out
