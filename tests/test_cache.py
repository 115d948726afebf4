"""The decomposition cache: a second initialisation of the same base decomposes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import milora.initialize as initialize
from milora import DecompositionCache, init_adapter
from milora.cache import weight_fingerprint


def _no_decomposition(*args, **kwargs):
    raise AssertionError("decompose() ran although the cache held the components")


def test_second_init_uses_the_cache(tmp_path, monkeypatch):
    cache = DecompositionCache(tmp_path / "cache")
    first = init_adapter(tiny_llama(), method="milora", r=8, cache=cache)
    assert cache.misses == 10 and cache.hits == 0
    monkeypatch.setattr(initialize, "decompose", _no_decomposition)
    for r in (8, 3):  # same rank and a smaller one
        again = init_adapter(tiny_llama(), method="milora", r=r, cache=DecompositionCache(tmp_path / "cache"))
        assert again.milora_init.cache_hits == 10
        if r == 8:
            for name, (A0, B0) in first.milora_init.factors.items():
                assert torch.equal(again.milora_init.factors[name][0], A0)
                assert torch.equal(again.milora_init.factors[name][1], B0)
    with pytest.raises(AssertionError, match="cache held"):
        init_adapter(tiny_llama(), method="pissa", r=8, cache=cache)  # other side: a miss


def test_larger_rank_recomputes_and_replaces(tmp_path):
    cache = DecompositionCache(tmp_path)
    init_adapter(tiny_llama(), method="milora", r=4, cache=cache)
    init_adapter(tiny_llama(), method="milora", r=8, cache=cache)
    assert cache.misses == 20
    init_adapter(tiny_llama(), method="milora", r=8, cache=cache)
    assert cache.hits == 10


def test_fingerprint_sees_content_dtype_and_shape():
    w = torch.randn(6, 4)
    assert weight_fingerprint(w) == weight_fingerprint(w.clone())
    changed = w.clone()
    changed[0, 0] += 1e-6
    assert weight_fingerprint(changed) != weight_fingerprint(w)
    assert weight_fingerprint(w.to(torch.bfloat16)) != weight_fingerprint(w)
    assert weight_fingerprint(w.reshape(4, 6)) != weight_fingerprint(w)
