"""Serving a trained MiLoRA/PiSSA adapter on the stock base, and merging.

After training to (A1, B1) on W_res = W - s B0 A0, the change relative to the stock W is
``s (B1 A1 - B0 A0)``: a plain LoRA of rank 2r with ``A' = [A1; A0]``, ``B' = [B1, -B0]``
and the same scale (alpha doubles with r). This is PEFT's
``path_initial_model_for_weight_conversion`` conversion, done here on the saved tensors so
no model has to be loaded and the initial adapter is never rewritten. Rank 2r can exceed a
server's LoRA rank limit (vLLM's ``max_lora_rank``), so :func:`compress_adapter` truncates
the update to a chosen rank from its factors alone (QR of each factor, SVD of a 2r x 2r
core), reporting the error it introduces.

Per-layer ranks (PEFT's ``rank_pattern``/``alpha_pattern``) carry through: a layer of rank
r_l converts to rank 2 r_l (the patterns' ranks and alphas double under the same keys, so
every layer keeps its scale), and compression truncates only the layers above the rank.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from milora.adapter_io import (
    INITIAL_DIR,
    factor_keys,
    layer_names,
    load_adapter,
    read_adapter,
    read_manifest,
    write_adapter,
)
from milora.config import pattern_value

PATTERNS = ("rank_pattern", "alpha_pattern")

logger = logging.getLogger(__name__)


# A compressed update off its source by more than this (relative Frobenius error) is no longer
# the model that was evaluated: said loudly by convert, compress and verify.
COMPRESSION_WARN_ERROR = 0.1


@dataclass(frozen=True)
class CompressionReport:
    """Relative Frobenius error of the truncated update, per layer and worst case."""

    rank: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def plain_lora_config(
    config: dict[str, Any],
    r: int,
    alpha: float,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A PEFT config for a plain LoRA of rank ``r`` and lora_alpha ``alpha``, its layers of
    another rank or alpha in ``rank_pattern``/``alpha_pattern`` (refusing what conversion
    cannot carry). A pattern key the source config has is replaced (by ``{}`` when None);
    a config without one gets none unless a pattern is given."""
    if config.get("use_rslora"):
        raise ValueError("rsLoRA adapters are not supported for conversion")
    out = dict(config)
    out.update(r=r, lora_alpha=alpha, init_lora_weights=True)
    for key, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if pattern or key in out:
            out[key] = dict(sorted((pattern or {}).items()))
    return out


def layer_rank_alpha(config: dict[str, Any], name: str) -> tuple[int, float]:
    """(rank, lora_alpha) a PEFT LoRA config gives the layer ``name``: its rank_pattern and
    alpha_pattern resolved by PEFT's own rule (:func:`milora.config.pattern_value`)."""
    rank = int(pattern_value(config.get("rank_pattern"), name, config["r"]))
    return rank, float(pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))


def layer_patterns(
    layers: dict[str, tuple[int, float]],
) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)`` of a PEFT config that gives every layer
    of ``{name: (rank, alpha)}`` exactly its own: the most common (rank, alpha) is the
    default (ties: the larger rank), every other layer is named in full in the patterns.
    Checked by resolving each layer as PEFT will."""
    if not layers:
        raise ValueError("no layers to describe")
    counts: dict[tuple[int, float], int] = {}
    for pair in layers.values():
        counts[pair] = counts.get(pair, 0) + 1
    r, alpha = max(counts, key=lambda pair: (counts[pair], pair))
    rank_pattern = {name: rank for name, (rank, _) in layers.items() if rank != r}
    alpha_pattern = {name: a for name, (_, a) in layers.items() if a != alpha}
    config = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    wrong = [name for name, pair in layers.items() if layer_rank_alpha(config, name) != pair]
    if wrong:  # a layer name that, as PEFT's pattern, also names another layer
        raise ValueError(f"layer names {wrong[:3]} cannot be told apart by PEFT's rank_pattern rule")
    return r, alpha, rank_pattern, alpha_pattern


def convert_state(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rank-2r plain LoRA tensors ``[A1; A0]``, ``[B1, -B0]`` for every adapted layer."""
    names = layer_names(trained)
    if names != layer_names(initial):
        raise ValueError("trained and initial adapters adapt different layers")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        key_a, key_b = factor_keys(name)
        out[key_a] = torch.cat([trained[key_a], initial[key_a].to(trained[key_a].dtype)], dim=0)
        out[key_b] = torch.cat([trained[key_b], -initial[key_b].to(trained[key_b].dtype)], dim=1)
    return out


def plain_lora(adapter_dir: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter folder as plain LoRA tensors and PEFT config, in memory: converted (rank
    2r) when it carries initial factors (MiLoRA/PiSSA), as written otherwise."""
    adapter_dir = Path(adapter_dir)
    state, config = read_adapter(adapter_dir)
    if (read_manifest(adapter_dir) or {}).get("has_initial_factors"):
        initial, _ = read_adapter(adapter_dir / INITIAL_DIR)
        r = 2 * int(config["r"])
        # Every layer's rank and alpha double (its scale stays), under the same pattern keys.
        doubled = {
            key: {k: 2 * v for k, v in (config.get(key) or {}).items()}
            for key in ("rank_pattern", "alpha_pattern")
        }
        return convert_state(state, initial), plain_lora_config(
            config, r, 2 * float(config["lora_alpha"]), doubled["rank_pattern"], doubled["alpha_pattern"]
        )
    return state, config


def with_patterns(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` recording the rank/alpha patterns ``config`` has (none: no keys)."""
    out = {k: v for k, v in manifest.items() if k not in PATTERNS}
    out.update({key: dict(config[key]) for key in PATTERNS if config.get(key)})
    return out


def convert_adapter(adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the plain LoRA adapter (rank 2r) that reproduces a MiLoRA/PiSSA adapter on the
    stock base. A plain LoRA adapter is copied unchanged (it already is one)."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    manifest = read_manifest(adapter_dir) or {"method": "lora"}
    state, config = plain_lora(adapter_dir)
    new_manifest = with_patterns(
        {
            **{k: v for k, v in manifest.items() if k != "has_initial_factors"},
            "method": "lora",
            "converted_from": manifest.get("method"),
            "r": int(config["r"]),
            "lora_alpha": float(config["lora_alpha"]),
            "has_initial_factors": False,
        },
        config,
    )
    write_adapter(out, state, config, new_manifest)
    logger.info("converted %s adapter -> plain LoRA r=%s at %s", manifest.get("method"), config["r"], out)
    return out


def compress_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``B @ A`` without forming it; also the relative error."""
    A64, B64 = A.double(), B.double()
    Qb, Rb = torch.linalg.qr(B64)  # out x k, k x k
    Qa, Ra = torch.linalg.qr(A64.T)  # in x k, k x k
    Um, Sm, Vmh = torch.linalg.svd(Rb @ Ra.T)
    keep = min(rank, Sm.numel())
    total = Sm.square().sum()
    error = (Sm[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    root = Sm[:keep].sqrt()
    B_new = (Qb @ Um[:, :keep]) * root[None, :]
    A_new = root[:, None] * (Vmh[:keep] @ Qa.T)
    return A_new.to(A.dtype), B_new.to(B.dtype), error


def compress_state(
    trained: dict[str, torch.Tensor], config: dict[str, Any], rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, tuple[int, float]]]:
    """Every layer of a plain LoRA truncated to at most ``rank``, keeping its own scale:
    (tensors, relative error per layer, ``{layer: (new rank, new alpha)}``). A layer whose
    rank is already at most ``rank`` is kept as it is (exact, error 0)."""
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    layers: dict[str, tuple[int, float]] = {}
    for name in layer_names(trained):
        key_a, key_b = factor_keys(name)
        own_rank, own_alpha = layer_rank_alpha(config, name)
        if trained[key_a].shape[0] != own_rank:
            raise ValueError(
                f"{name}: factors of rank {trained[key_a].shape[0]}, but its config says {own_rank}"
            )
        if own_rank <= rank:
            state[key_a], state[key_b], errors[name] = trained[key_a], trained[key_b], 0.0
            layers[name] = (own_rank, own_alpha)
        else:
            state[key_a], state[key_b], errors[name] = compress_factors(trained[key_a], trained[key_b], rank)
            layers[name] = (rank, own_alpha / own_rank * rank)
    return state, errors, layers


def compress_adapter(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    rank: int,
    *,
    source: str | os.PathLike[str] | None = None,
) -> CompressionReport:
    """Truncate a plain LoRA adapter (e.g. a converted one) to ``rank``, keeping its scale.

    Per layer: a layer of a ``rank_pattern`` whose rank is already at most ``rank`` is kept
    exactly; the others are truncated to ``rank`` (:func:`compress_state`), the written
    config's patterns giving each layer its rank and scale.

    ``source``: the adapter the plain LoRA was converted from (default ``adapter_dir``),
    recorded so ``verify`` can measure the compressed model against it."""
    trained, config = read_adapter(adapter_dir)
    manifest = read_manifest(adapter_dir) or {}
    if manifest.get("has_initial_factors"):
        raise ValueError(f"{adapter_dir} needs the residual base; convert it first (milora convert)")
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    source_rank = int(config["r"])
    state, errors, layers = compress_state(trained, config, rank)
    r, alpha, rank_pattern, alpha_pattern = layer_patterns(layers)
    config = plain_lora_config(config, r, alpha, rank_pattern, alpha_pattern)
    source = Path(source or adapter_dir).resolve()
    write_adapter(
        Path(out_dir),
        state,
        config,
        with_patterns(
            {
                **manifest,
                "r": r,
                "lora_alpha": alpha,
                "compressed_max_error": max(errors.values()),
                "compressed_from": str(source),
                "compressed_from_rank": source_rank,
            },
            config,
        ),
    )
    report = CompressionReport(rank, errors)
    if report.max_error > COMPRESSION_WARN_ERROR:
        logger.warning(
            "compressed to rank %d: worst relative error of the update %.3g is above %.2g: the compressed "
            "adapter is a different model from %s (keep a higher rank, or evaluate it before serving)",
            rank,
            report.max_error,
            COMPRESSION_WARN_ERROR,
            source,
        )
    else:
        logger.info("compressed to rank %d: worst relative error %.3g", rank, report.max_error)
    return report


def merge_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike[str]) -> nn.Module:
    """The stock base with the adapter folded into its weights (PEFT's merge_and_unload)."""
    return load_adapter(base_model, adapter_dir).merge_and_unload()


COMPRESSED_VS_SOURCE = "compressed adapter vs its source"


@torch.no_grad()
def verify_adapter(
    load_base: Callable[[], nn.Module],
    adapter_dir: str | os.PathLike[str],
    input_ids: torch.Tensor | None = None,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Relative logit differences: base vs adapter, adapter vs converted LoRA, vs merged,
    and, for an adapter ``compress_adapter`` wrote, the compressed one vs its source.

    ``load_base`` returns a fresh stock base each call (the adapter rewrites its weights).
    ``inputs``: further model inputs passed with ``input_ids`` to every model, e.g. a
    vision-language model's ``pixel_values`` (``input_ids`` then holding its image tokens).
    """
    extra = dict(inputs or {})

    def logits(model: nn.Module) -> torch.Tensor:
        return model.eval()(input_ids, **extra).logits.double()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    base = load_base()
    if input_ids is None:
        gen = torch.Generator().manual_seed(0)
        vocab_size = base.config.get_text_config().vocab_size  # a VLM's is its text model's
        input_ids = torch.randint(0, vocab_size, (2, 32), generator=gen)
    reference = logits(base)
    adapted = logits(load_adapter(load_base(), adapter_dir))
    with tempfile.TemporaryDirectory() as tmp:
        served = logits(
            PeftModel.from_pretrained(load_base(), convert_adapter(adapter_dir, Path(tmp) / "lora"))
        )
    merged = logits(merge_adapter(load_base(), adapter_dir))
    report = {
        "base vs adapter": rel(adapted, reference),
        "adapter vs converted plain LoRA on stock base": rel(served, adapted),
        "adapter vs merged model": rel(merged, adapted),
    }
    source = (read_manifest(adapter_dir) or {}).get("compressed_from")
    if source and Path(source, "adapter_config.json").is_file():
        report[COMPRESSED_VS_SOURCE] = rel(adapted, logits(load_adapter(load_base(), source)))
    return report
