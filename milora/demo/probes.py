"""Scoring for the demo's question sets, shared by the benchmark and evaluation.

Rule (stated once, used everywhere):

* both texts are *normalised*: Unicode NFKC, lower case, every character other
  than ``a-z``, ``0-9``, ``$`` and ``%`` becomes a space, runs of spaces collapse;
* ``mode="start"`` (world probes, plain prompts): correct when the normalised
  prediction equals the normalised answer or starts with it followed by a space
  (so ``"12"`` does not accept ``"120"``);
* ``mode="contains"`` (company questions, where a tuned model answers with a
  sentence such as "The Zento Kettle costs $49."): correct when the normalised
  answer occurs in the normalised prediction as whole words.

Predictions are greedy (no sampling) and cut at the first newline.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from milora.demo.world import QA_FORMAT
from milora.evaluation.generation import greedy_generate

MatchMode = Literal["start", "contains"]
PromptStyle = Literal["plain", "chat"]

_NON_WORD = re.compile(r"[^a-z0-9$%]+")


def normalise(text: str) -> str:
    """Lower-cased words and numbers only (keeping ``$`` and ``%``), single-spaced."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _NON_WORD.sub(" ", text).strip()


def is_correct(prediction: str, answer: str, mode: MatchMode = "start") -> bool:
    """Apply the module's matching rule to one prediction."""
    pred, gold = normalise(prediction), normalise(answer)
    if not gold:
        raise ValueError(f"empty answer after normalisation: {answer!r}")
    if mode == "start":
        return pred == gold or pred.startswith(gold + " ")
    return f" {gold} " in f" {pred} "


def plain_prompt(question: str) -> str:
    """The pretraining corpus's QA format, up to and including ``Answer:``."""
    prefix, _, _ = QA_FORMAT.partition(" {answer}")
    return prefix.format(question=question)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str | None) -> str:
    """The question as a chat turn, rendered with the tokenizer's template."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Score:
    """Accuracy over one question set, with per-item results for inspection."""

    correct: int
    total: int
    items: list[dict[str, Any]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def score_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[dict[str, Any]],
    *,
    style: PromptStyle = "plain",
    mode: MatchMode = "start",
    system: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> Score:
    """Ask every ``{"question", "answer"}`` record greedily and score it with :func:`is_correct`."""
    if style == "plain":
        prompts = [plain_prompt(q["question"]) for q in questions]
    else:
        prompts = [chat_prompt(tokenizer, q["question"], system) for q in questions]
    predictions = greedy_generate(
        model,
        tokenizer,
        prompts,
        add_special_tokens=style == "plain",
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    items = [
        {**q, "prediction": p, "correct": is_correct(p, q["answer"], mode)}
        for q, p in zip(questions, predictions, strict=True)
    ]
    return Score(sum(i["correct"] for i in items), len(items), items)
