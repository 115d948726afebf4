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


def _flip_data_bytes(path, count: int = 64) -> None:
    """Flip sign bits in the tensor data (past the safetensors header), as a bad disk would."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for offset in range(header + 3, min(len(raw), header + 3 + 4 * count), 4):
        raw[offset] ^= 0x80
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage",
    [
        _flip_data_bytes,
        lambda path: path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:]),  # a broken header
        lambda path: path.write_bytes(path.read_bytes()[:4000]),  # truncated
    ],
    ids=["flipped-bits", "bad-header", "truncated"],
)
def test_a_damaged_entry_is_named_removed_and_recomputed(tmp_path, caplog, damage):
    cache = DecompositionCache(tmp_path / "cache")
    clean = init_adapter(tiny_llama(), method="milora", r=8, cache=cache)
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    damage(entries[0])
    again = DecompositionCache(tmp_path / "cache")
    with caplog.at_level("WARNING", logger="milora.cache"):
        rebuilt = init_adapter(tiny_llama(), method="milora", r=8, cache=again)
    assert again.misses == 1 and again.hits == 9  # the damaged entry only
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "milora.cache"]
    assert str(entries[0]) in warning and "removed, recomputing it" in warning
    for name, (A0, B0) in clean.milora_init.factors.items():  # the same factors as before
        assert torch.equal(rebuilt.milora_init.factors[name][0], A0)
        assert torch.equal(rebuilt.milora_init.factors[name][1], B0)
    assert DecompositionCache._read(entries[0]) is not None  # rewritten whole, and it reads back
