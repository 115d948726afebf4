"""The singular-value spectrum of a few target weights, with the adapted components marked.

MiLoRA's premise is visible in one picture: the spectrum of each frozen weight, and where
in it the adapter starts. The spectrum comes from the base model's safetensors (only the
chosen weights are read; the values are cached by the weights' content hash, since a base
never changes). The marked components come from the init adapter itself: its initial
factor ``A0 = diag(sqrt(S_r / s)) V_r^T`` has row norms ``S_r / s``, so the singular values
it holds are recovered exactly and drawn on top of the spectrum (for MiLoRA they must sit
on its minor end, for PiSSA on its principal end; plain LoRA has none).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from milora.adapter_io import factor_keys, layer_names, read_manifest
from milora.atomic import atomic_write_text
from milora.cache import weight_fingerprint
from milora.layout import INITIAL_DIR, WEIGHTS
from milora.methods import INIT_METHODS
from milora.preflight import loaded_names
from milora.reporting.data import Spectrum
from milora.targets import matches

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _weight_files(base_dir: Path) -> dict[str, tuple[Path, str]]:
    """``{tensor name in the loaded model: (safetensors file, name in that file)}`` of a
    Hugging Face model folder (sharded or not; see :func:`milora.preflight.loaded_names`)."""
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{base_dir}: no *.safetensors weights to read the spectrum from")
    names = loaded_names(base_dir)
    where: dict[str, tuple[Path, str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            where.update((names.get(key, key), (path, key)) for key in handle.keys())  # noqa: SIM118 (not a dict)
    return where


def pick_layers(names: list[str], target_modules: tuple[str, ...] | list[str] | str, count: int) -> list[str]:
    """Up to ``count`` target layers spread over the model: the first and last block of the
    first and last target kind (e.g. q_proj and down_proj of layers 0 and N-1)."""
    found = [name for name in names if matches(name, target_modules)]
    if not found:
        return []

    def layer(name: str) -> int:
        hit = _LAYER_INDEX.search(name)
        return int(hit.group(1)) if hit else -1

    listed = [] if isinstance(target_modules, str) else [t.rsplit(".", 1)[-1] for t in target_modules]
    kinds: dict[str, list[str]] = {}
    for name in sorted(found, key=lambda n: (layer(n), n)):
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    # Kinds in the order the targets list them (a pattern: in model order).
    order = [kinds[k] for k in sorted(kinds, key=lambda k: listed.index(k) if k in listed else len(listed))]
    chosen: list[str] = []
    for group in [order[0], order[-1], *order[1:-1]]:
        for name in (group[0], group[-1]):
            if name not in chosen and len(chosen) < count:
                chosen.append(name)
    return chosen


def singular_values(weight: torch.Tensor, cache_dir: Path | None = None) -> list[float]:
    """All singular values of a weight, descending (float64), cached by content hash."""
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{weight_fingerprint(weight)}.json"
        if path.is_file():
            return json.loads(path.read_text())
    values = torch.linalg.svdvals(weight.detach().to(torch.float64)).tolist()
    if path is not None:
        atomic_write_text(path, json.dumps(values))
    return values


def adapted_values(init_dir: Path) -> tuple[dict | None, dict[str, list[float]]]:
    """(manifest, ``{layer: singular values held by its initial factor}``) of an init adapter;
    empty for plain LoRA or when the folder has no initial factors."""
    manifest = read_manifest(init_dir)
    weights = init_dir / INITIAL_DIR / WEIGHTS
    if manifest is None or not manifest.get("has_initial_factors") or not weights.is_file():
        return manifest, {}
    state = load_file(weights)
    scale = float(manifest["scale"])
    held = {}
    for name in layer_names(state):
        A0 = state[factor_keys(name)[0]].to(torch.float64)
        held[name] = sorted((scale * A0.square().sum(dim=1)).tolist(), reverse=True)
    return manifest, held


def weight_spectra(
    base_dir: str | os.PathLike[str],
    target_modules: tuple[str, ...] | list[str] | str,
    init_dir: str | os.PathLike[str] | None = None,
    *,
    count: int = 4,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[Spectrum]:
    """Spectra of ``count`` target weights of the base; with ``init_dir``, the components its
    initial factors hold are marked (at the minor end for MiLoRA, principal for PiSSA)."""
    where = _weight_files(Path(base_dir))
    manifest, held = adapted_values(Path(init_dir)) if init_dir is not None else (None, {})
    candidates = sorted(held) or [key.removesuffix(".weight") for key in where if key.endswith(".weight")]
    method = manifest.get("method") if manifest else None
    rank = int(manifest["r"]) if manifest else None
    spectra = []
    for name in pick_layers(candidates, target_modules, count):
        key = f"{name}.weight"
        if key not in where:
            logger.warning("%s: the base model has no %s; skipped in the spectrum plot", base_dir, key)
            continue
        path, stored = where[key]
        with safe_open(path, framework="pt") as handle:
            weight = handle.get_tensor(stored)
        values = singular_values(weight, Path(cache_dir) if cache_dir is not None else None)
        side = INIT_METHODS[method].side if method in INIT_METHODS else None
        adapted = None
        if side and rank and name in held:
            adapted = (len(values) - rank, len(values)) if side == "minor" else (0, rank)
        spectra.append(
            Spectrum(
                name=name,
                shape=(int(weight.shape[0]), int(weight.shape[1])),
                values=values,
                method=method,
                adapted=adapted,
                adapter_values=held.get(name, []),
            )
        )
    return spectra
