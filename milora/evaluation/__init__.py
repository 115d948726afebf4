"""Evaluation: did the model learn the company data, and did it keep what it knew?

Names are imported on first use, so the torch-free parts (scoring rules, metric direction)
load without torch.
"""

from __future__ import annotations

from milora._lazy import lazy_exports

_EXPORTS = {
    "read_items": "milora.evaluation.datasets",
    "continuation_logprobs": "milora.evaluation.generation",
    "greedy_generate": "milora.evaluation.generation",
    "perplexity": "milora.evaluation.generation",
    "SUITE_KINDS": "milora.evaluation.kinds",
    "SuiteResult": "milora.evaluation.suites",
    "commonsense_suite": "milora.evaluation.suites",
    "gsm8k_suite": "milora.evaluation.suites",
    "qa_suite": "milora.evaluation.suites",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
