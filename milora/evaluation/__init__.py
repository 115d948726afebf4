"""Evaluation: did the model learn the company data, and did it keep what it knew?"""

from milora.evaluation.datasets import read_items
from milora.evaluation.generation import continuation_logprobs, greedy_generate, perplexity
from milora.evaluation.suites import SuiteResult, commonsense_suite, gsm8k_suite, qa_suite

__all__ = [
    "SuiteResult",
    "commonsense_suite",
    "continuation_logprobs",
    "greedy_generate",
    "gsm8k_suite",
    "perplexity",
    "qa_suite",
    "read_items",
]
