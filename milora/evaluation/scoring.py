"""Answer extraction and scoring rules for the evaluation suites.

Stated once here and used by every suite:

* **Exact match / token F1** (company questions): SQuAD normalisation (lower case, drop
  punctuation and the articles a/an/the, collapse spaces); F1 over the bag of tokens.
* **Commonsense labels** (the paper's protocol): the label set of an item is read from its
  instruction's ``Answer format: a/b/c`` line, else from all gold labels in the file; the
  prediction is the *first* label-shaped word in the generated text (longest labels are
  tried first, so ``answer10`` is never read as ``answer1``).
* **GSM8K numbers**: the gold answer is the number after ``####``; the prediction is the
  number after the first ``####`` in the generated text when there is one (a model that
  answers and then runs on into a new question is judged by its answer), else the last
  number of the text before any run-on ``Question:``, ignoring thousands separators and
  currency signs, keeping a leading minus; the two match when numerically equal (within 1e-6).
* **Direction and forgetting**: higher is better except for the metrics in
  ``LOWER_IS_BETTER``; forgetting is the drop of a score from the base model to the tuned
  one (for a lower-is-better metric its relative rise), so positive means knowledge lost.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_FORMAT = re.compile(r"answer format:\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
# Where a GSM8K answer ends when the model runs on into a new question (as in the harness's
# gsm8k task, whose generation stops at "Question:").
GSM8K_STOPS = ("Question:",)
LOWER_IS_BETTER = frozenset({"perplexity", "stale_rate"})


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def forgetting(before: float, after: float, metric: str) -> float:
    """How much of ``before`` (base model) was lost at ``after`` (tuned): positive = lost."""
    if lower_is_better(metric) and before:
        return after / before - 1.0
    return before - after


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_labels(instruction: str) -> list[str] | None:
    """Labels listed by an ``Answer format: x/y/z`` line, lower-cased; None if absent."""
    match = _FORMAT.search(instruction)
    if not match:
        return None
    labels = [part.strip().lower() for part in match.group(1).split("/")]
    return [label for label in labels if label] or None


def label_set(items: Iterable[dict], key: str = "answer") -> list[str]:
    """All gold labels of a file, sorted: the fallback label set."""
    return sorted({str(item[key]).strip().lower() for item in items})


def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The first of ``labels`` occurring as a whole word in ``text`` (case-insensitive)."""
    if not labels:
        return None
    options = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(rf"(?<![a-z0-9])({options})(?![a-z0-9])", text.lower())
    return match.group(1) if match else None


def parse_number(text: str) -> float | None:
    """A number written as text (``"1,234"``, ``"$5"``, ``"-3.5"``); None if not one."""
    cleaned = _THOUSANDS.sub("", text.strip()).replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number in ``text``; None if there is none."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text.replace("$", "")))
    return float(numbers[-1]) if numbers else None


def gsm8k_prediction(output: str) -> float | None:
    """The final answer a model gave to a GSM8K question (see the module's rule)."""
    answer = output
    for stop in GSM8K_STOPS:  # a run-on generation starts the next question: cut it there
        answer = answer.split(stop, 1)[0]
    if "####" in answer:
        marked = _NUMBER.search(_THOUSANDS.sub("", answer.split("####", 1)[1].replace("$", "")))
        if marked:
            return float(marked.group())
    return last_number(answer)


def gsm8k_gold(answer: str) -> float:
    """The number after ``####`` in a GSM8K answer."""
    _, sep, tail = answer.rpartition("####")
    value = parse_number(tail) if sep else None
    if value is None:
        raise ValueError(f"no '#### <number>' final answer in {answer[-80:]!r}")
    return value


def numbers_match(prediction: float | None, gold: float) -> bool:
    return prediction is not None and abs(prediction - gold) <= 1e-6 * max(1.0, abs(gold))
