"""MiLoRA: LoRA initialised in the minor singular subspace of each frozen weight.

One call starts an adapter (:func:`init_adapter`); the rest saves, reloads, converts for
serving on the stock base, compresses and merges it. Names are imported on first use, so
``milora.data`` and ``milora.settings`` load without torch (the pipeline's data stages
start in a second, not ten).
"""

from __future__ import annotations

from milora._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "load_adapter": "milora.adapter_io",
    "save_adapter": "milora.adapter_io",
    "DecompositionCache": "milora.cache",
    "AdapterSpec": "milora.config",
    "DEFAULT_TARGETS": "milora.config",
    "METHODS": "milora.config",
    "compress_adapter": "milora.conversion",
    "convert_adapter": "milora.conversion",
    "merge_adapter": "milora.conversion",
    "Components": "milora.decomposition",
    "decompose": "milora.decomposition",
    "init_adapter": "milora.initialize",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
