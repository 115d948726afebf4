"""The kinds of evaluation suite, as one table: what an item holds, what a kind reports, and
the function that scores it.

A new kind is one entry of :data:`SUITE_KINDS` plus its ``run_<kind>`` function in
:mod:`milora.evaluation.suites`; the settings (which kinds and metrics exist), the runner
(how items are read and scored) and the gate (via the metric's direction in
:mod:`milora.evaluation.scoring`) read everything from here. This module imports nothing
heavy: the settings validate against it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from milora.evaluation.suites import SuiteResult

SUITES_MODULE = "milora.evaluation.suites"  # where every kind's function lives
QA_METRICS = ("f1", "exact_match", "contains", "starts_with")


@dataclass(frozen=True)
class SuiteKind:
    """One kind of suite."""

    run: str  # its function in SUITES_MODULE: (model, tokenizer, items, suite settings, name=, batch_size=[, processor=, image_root=])
    required_keys: tuple[str, ...]  # fields every item must have
    metrics: tuple[str, ...]  # headline metrics it can report; the first is the default
    text_lines: bool = False  # a .txt file is one item per line ({"text": line})
    # The field of each prediction row holding that item's score (``metric``: the row field
    # named like the suite's headline metric); None: only an aggregate (no paired comparison).
    item_field: str | None = "metric"
    # Items name images (paths relative to their file) that the model sees through its
    # processor: the base must be a vision-language model.
    images: bool = False
    # Its function takes a vision-language base's processor (processor=, image_root=) and asks
    # through it; the other kinds use the tokenizer.
    takes_processor: bool = False

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    def item_scores(self, rows: list[dict[str, Any]], metric: str) -> list[float] | None:
        """Each item's score in prediction ``rows`` (same order as the items), or None."""
        if self.item_field is None:
            return None
        field = metric if self.item_field == "metric" else self.item_field
        return [float(row[field]) for row in rows]

    def score(self, *args: Any, **kwargs: Any) -> SuiteResult:
        """Run the kind's function (loads the model-side code on first use)."""
        return getattr(import_module(SUITES_MODULE), self.run)(*args, **kwargs)


SUITE_KINDS: dict[str, SuiteKind] = {
    "qa": SuiteKind("run_qa", ("question", "answer"), QA_METRICS, takes_processor=True),
    "image_qa": SuiteKind(
        "run_image_qa", ("question", "answer", "images"), QA_METRICS, images=True, takes_processor=True
    ),
    "commonsense": SuiteKind(
        "run_commonsense", ("instruction", "answer"), ("accuracy",), item_field="correct"
    ),
    "gsm8k": SuiteKind("run_gsm8k", ("question", "answer"), ("accuracy",), item_field="correct"),
    "perplexity": SuiteKind("run_perplexity", (), ("perplexity",), text_lines=True, item_field=None),
}
