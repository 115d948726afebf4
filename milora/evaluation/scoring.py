"""Answer extraction and scoring rules for the evaluation suites.

Stated once here and used by every suite:

* **Exact match / token F1** (company questions): SQuAD normalisation (lower case, drop
  punctuation and the articles a/an/the, collapse spaces); F1 over the bag of tokens.
* **Commonsense labels** (the paper's protocol): the label set of an item is read from its
  instruction's ``Answer format: a/b/c`` line, else from all gold labels in the file; the
  prediction is the *first* label-shaped word in the generated text (longest labels are
  tried first, so ``answer10`` is never read as ``answer1``).
* **GSM8K numbers**: the gold answer is the number after ``####``; the prediction is the
  last number in the generated text, ignoring thousands separators and currency signs,
  keeping a leading minus; the two match when numerically equal (within 1e-6).
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
    """The last number in generated text (GSM8K prediction rule)."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text.replace("$", "")))
    return float(numbers[-1]) if numbers else None


def gsm8k_gold(answer: str) -> float:
    """The number after ``####`` in a GSM8K answer."""
    _, sep, tail = answer.rpartition("####")
    value = parse_number(tail) if sep else None
    if value is None:
        raise ValueError(f"no '#### <number>' final answer in {answer[-80:]!r}")
    return value


def numbers_match(prediction: float | None, gold: float) -> bool:
    return prediction is not None and abs(prediction - gold) <= 1e-6 * max(1.0, abs(gold))
