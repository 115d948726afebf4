"""MiLoRA: LoRA initialised in the minor singular subspace of each frozen weight.

One call starts an adapter (:func:`init_adapter`); the rest saves, reloads, converts for
serving on the stock base, compresses and merges it.
"""

from milora.adapter_io import load_adapter, save_adapter
from milora.cache import DecompositionCache
from milora.config import DEFAULT_TARGETS, METHODS, AdapterSpec
from milora.conversion import compress_adapter, convert_adapter, merge_adapter
from milora.decomposition import Components, decompose
from milora.initialize import init_adapter

__all__ = [
    "DEFAULT_TARGETS",
    "METHODS",
    "AdapterSpec",
    "Components",
    "DecompositionCache",
    "compress_adapter",
    "convert_adapter",
    "decompose",
    "init_adapter",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
]

__version__ = "0.1.0"
