"""Evaluation suites: each returns a score, its size and every prediction, as JSON.

Each kind is one entry of :data:`milora.evaluation.kinds.SUITE_KINDS` naming its
``run_<kind>`` function here (settings in, :class:`SuiteResult` out).

* ``qa``: short-answer questions (company held-out set, knowledge probes): exact match,
  token F1 and whether the gold answer appears in the prediction.
* ``image_qa``: the same about images (``images``: paths relative to the suite file), asked
  through a vision-language model's processor and chat template, scored like ``qa``.
* ``commonsense``: LLM-Adapters format (``instruction``, ``answer``), by generation plus
  first-label extraction (the paper's protocol) or by log-likelihood ranking of the labels.
* ``gsm8k``: ``question`` / ``answer`` with ``#### n``, numeric final-answer match.
* ``perplexity``: token perplexity of texts (held-out corpus text), lower is better.

Prompts go through the same renderer as training (the tokenizer's chat template, else the
Alpaca prompt), so a model is asked the way it was taught.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from milora.evaluation.generation import continuation_logprobs, greedy_generate, perplexity
from milora.evaluation.kinds import QA_METRICS
from milora.evaluation.scoring import (
    GSM8K_STOPS,
    answer_labels,
    exact_match,
    first_label,
    gsm8k_gold,
    gsm8k_prediction,
    label_set,
    normalize_answer,
    numbers_match,
    token_f1,
)
from milora.training.examples import prompt_text
from milora.training.multimodal import IMAGES
from milora.training.multimodal import prompt_text as multimodal_prompt

if TYPE_CHECKING:
    from milora.settings import SuiteSettings

COMMONSENSE_TARGET = "the correct answer is {label}"


@dataclass
class SuiteResult:
    suite: str
    metric: str
    score: float
    n: int
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # headline by drop / kind

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> SuiteResult:
        """A result :meth:`write` wrote."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _user_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[str]:
    return [prompt_text(tokenizer, [{"role": "user", "content": text}]) for text in texts]


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[dict[str, Any]], prompt: str, field: str
) -> list[str]:
    """``chat``: ``item[field]`` as a user turn through the training renderer; otherwise
    ``prompt`` is a format string over the item (a base model's own text format)."""
    if prompt == "chat":
        return _user_prompts(tokenizer, [str(item[field]) for item in items])
    try:
        return [prompt.format(**item) for item in items]
    except KeyError as error:
        raise ValueError(f"prompt {prompt!r} names field {error} that an item lacks") from None


def qa_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    *,
    name: str = "qa",
    prompt: str = "chat",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    headline: str = "f1",
) -> SuiteResult:
    """``{"question", "answer"}`` items, asked as ``prompt`` (see :func:`render_prompts`)."""
    if headline not in QA_METRICS:
        raise ValueError(f"qa metric must be one of {QA_METRICS}, got {headline!r}")
    prompts = render_prompts(tokenizer, items, prompt, "question")
    outputs = greedy_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=None if prompt == "chat" else True,  # chat: as in training
    )
    return qa_result(name, items, outputs, headline)


def processor_qa_suite(
    model: PreTrainedModel,
    processor: Any,
    items: Sequence[dict[str, Any]],
    *,
    image_root: str | os.PathLike[str],
    name: str = "image_qa",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    headline: str = "f1",
) -> SuiteResult:
    """``{"question", "answer"[, "images"]}`` items (image paths relative to ``image_root``),
    each asked as a user turn with its images through a vision-language model's processor and
    chat template (text items too: the way that model was trained)."""
    if headline not in QA_METRICS:
        raise ValueError(f"qa metric must be one of {QA_METRICS}, got {headline!r}")
    prompts = [
        multimodal_prompt(
            processor, [{"role": "user", "content": str(item["question"]), IMAGES: item.get("images") or []}]
        )
        for item in items
    ]
    outputs = greedy_generate(
        model,
        processor.tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        images=[[Path(image_root) / path for path in item.get("images") or ()] for item in items],
        processor=processor,
    )
    return qa_result(name, items, outputs, headline)


def qa_result(
    name: str, items: Sequence[dict[str, Any]], outputs: Sequence[str], headline: str
) -> SuiteResult:
    """Each answer scored against its gold (and against a changed fact's old answers)."""
    rows = []
    for item, prediction in zip(items, outputs, strict=True):
        gold, said = normalize_answer(str(item["answer"])), normalize_answer(prediction)
        row = {
            **item,
            "prediction": prediction,
            "exact_match": exact_match(prediction, str(item["answer"])),
            "f1": token_f1(prediction, str(item["answer"])),
            "contains": float(f" {gold} " in f" {said} "),
            "starts_with": float(f"{said} ".startswith(f"{gold} ")),
        }
        if item.get("stale_answers"):  # a fact that changed: does the answer give an old value?
            old = [normalize_answer(str(a)) for a in item["stale_answers"]]
            row["stale"] = float(not row["contains"] and any(f" {o} " in f" {said} " for o in old if o))
        rows.append(row)
    metrics = {key: _mean([r[key] for r in rows]) for key in QA_METRICS}
    changed = [r["stale"] for r in rows if "stale" in r]
    if changed:
        metrics["stale_rate"] = _mean(changed)  # of the facts that changed, answered with an old value
        metrics["changed_facts"] = float(len(changed))
    return SuiteResult(
        name, headline, metrics[headline], len(rows), metrics, rows, _breakdown(rows, headline)
    )


def _breakdown(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """The headline metric per drop and per kind, for items that say theirs."""
    found: dict[str, dict[str, float]] = {}
    for field_name in ("drop", "kind"):
        groups: dict[str, list[float]] = {}
        for row in rows:
            if row.get(field_name):
                groups.setdefault(str(row[field_name]), []).append(row[metric])
        if groups:
            found[field_name] = {value: _mean(scores) for value, scores in sorted(groups.items())}
    return found


def perplexity_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    *,
    name: str = "perplexity",
    template: str = "{text}",
    max_length: int = 256,
) -> SuiteResult:
    """Perplexity of each item rendered through ``template`` (lower is better)."""
    texts = [template.format(**item) for item in items]
    value = perplexity(model, tokenizer, texts, max_length=max_length)
    rows = [{"text": text} for text in texts]
    return SuiteResult(name, "perplexity", value, len(rows), {"perplexity": value}, rows)


def commonsense_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    *,
    name: str = "commonsense",
    mode: str = "generate",
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> SuiteResult:
    """Accuracy on LLM-Adapters-format items, by ``generate`` or ``loglik``."""
    if mode not in ("generate", "loglik"):
        raise ValueError(f"mode must be 'generate' or 'loglik', got {mode!r}")
    fallback = label_set(items)
    texts = [f"{i['instruction']}\n\n{i['input']}" if i.get("input") else i["instruction"] for i in items]
    prompts = _user_prompts(tokenizer, texts)
    labels = [answer_labels(i["instruction"]) or fallback for i in items]
    if mode == "generate":
        outputs = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        chosen = [first_label(text, options) for text, options in zip(outputs, labels, strict=True)]
    else:
        pairs = [
            (p, COMMONSENSE_TARGET.format(label=option))
            for p, options in zip(prompts, labels, strict=True)
            for option in options
        ]
        scores = iter(continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size))
        chosen = []
        for options in labels:
            option_scores = [next(scores) for _ in options]
            chosen.append(options[max(range(len(options)), key=option_scores.__getitem__)])
        outputs = [None] * len(items)
    rows = [
        {
            "answer": str(i["answer"]).lower(),
            "labels": opts,
            "output": out,
            "prediction": pick,
            "correct": pick == str(i["answer"]).lower(),
        }
        for i, opts, out, pick in zip(items, labels, outputs, chosen, strict=True)
    ]
    accuracy = _mean([float(r["correct"]) for r in rows])
    return SuiteResult(name, "accuracy", accuracy, len(rows), {"accuracy": accuracy, "mode": mode}, rows)


def gsm8k_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    *,
    name: str = "gsm8k",
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> SuiteResult:
    """Numeric final-answer accuracy on GSM8K-format items (generation stops at the next
    ``Question:``, as in lm-evaluation-harness; see :func:`gsm8k_prediction`)."""
    golds = [gsm8k_gold(i["answer"]) for i in items]
    prompts = _user_prompts(tokenizer, [i["question"] for i in items])
    outputs = greedy_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        first_line=False,
        stop=GSM8K_STOPS,
    )
    rows = []
    for item, gold, output in zip(items, golds, outputs, strict=True):
        predicted = gsm8k_prediction(output)
        rows.append(
            {
                "question": item["question"],
                "gold": gold,
                "output": output,
                "prediction": predicted,
                "correct": numbers_match(predicted, gold),
            }
        )
    accuracy = _mean([float(r["correct"]) for r in rows])
    return SuiteResult(name, "accuracy", accuracy, len(rows), {"accuracy": accuracy}, rows)


# --------------------------------------------------------------------------- per-kind runners
# What milora.evaluation.kinds.SUITE_KINDS names: a suite's settings -> the function's arguments.
Items = Sequence[dict[str, Any]]


def _tokens(suite: SuiteSettings) -> dict[str, int]:
    return {"max_new_tokens": suite.max_new_tokens} if suite.max_new_tokens else {}


def run_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Items,
    suite: SuiteSettings,
    *,
    processor: Any = None,
    image_root: Path = Path("."),
    **common: Any,
) -> SuiteResult:
    headline = suite.metric or QA_METRICS[0]
    if processor is not None and suite.prompt == "chat":  # a vision-language base: as it trained
        return processor_qa_suite(
            model, processor, items, image_root=image_root, headline=headline, **common, **_tokens(suite)
        )
    return qa_suite(
        model, tokenizer, items, prompt=suite.prompt, headline=headline, **common, **_tokens(suite)
    )


def run_image_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Items,
    suite: SuiteSettings,
    *,
    processor: Any,
    image_root: Path,
    **common: Any,
) -> SuiteResult:
    headline = suite.metric or QA_METRICS[0]
    return processor_qa_suite(
        model, processor, items, image_root=image_root, headline=headline, **common, **_tokens(suite)
    )


def run_commonsense(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Items,
    suite: SuiteSettings,
    **common: Any,
) -> SuiteResult:
    return commonsense_suite(model, tokenizer, items, mode=suite.mode, **common, **_tokens(suite))


def run_gsm8k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Items,
    suite: SuiteSettings,
    **common: Any,
) -> SuiteResult:
    return gsm8k_suite(model, tokenizer, items, **common, **_tokens(suite))


def run_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Items,
    suite: SuiteSettings,
    **common: Any,
) -> SuiteResult:
    return perplexity_suite(model, tokenizer, items, name=common["name"], template=suite.template)
