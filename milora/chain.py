"""Adapters in a chain: a month that starts from the champion, served as one plain LoRA.

Retraining can build on the champion instead of the stock base. By *refolding*, the champion
is merged into the weights (W1 = W0 + D1, D1 its plain-LoRA delta) and a new MiLoRA adapter
is initialised in the minor subspace of W1, so what earlier months taught joins the frozen
principal weights. Its converted delta D2 is relative to W1: the model it serves is
W0 + D1 + D2. Plain-LoRA deltas add by stacking factors,

    sum_i s_i B_i A_i = s * [B_1 s_1/s, ..., B_k s_k/s] [A_1; ...; A_k],

a plain LoRA of rank sum(r_i) at one scale s, exact, for the *stock* base; a server with a
rank limit (vLLM's ``max_lora_rank``) gets it truncated by :func:`compress_factors`, its
relative error reported. Only factors are touched, never a full weight matrix. With
per-layer ranks (PEFT's ``rank_pattern``) a layer's rank is the sum of its ranks in the
chain, each member's layer at its own scale, and a rank limit truncates only the layers
above it.

:func:`start_from_champion` is where such a month begins: ``continue`` keeps training the
champion's own adapter (its initial factors rebuild the residual, so the served delta stays
relative to the stock base), ``refold`` merges the champion and initialises afresh in the
merged weights' minor subspace. Either way the untrained model *is* the champion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from milora.adapter_io import (
    factor_keys,
    layer_names,
    load_adapter,
    read_manifest,
    write_adapter,
)
from milora.config import AdapterSpec
from milora.conversion import (
    PATTERNS,
    compress_factors,
    convert_adapter,
    layer_patterns,
    layer_rank_alpha,
    merge_adapter,
    plain_lora,
    plain_lora_config,
)
from milora.layout import FROM_VERSION, PARENT_RECORD, WEIGHTS

logger = logging.getLogger(__name__)

CHAIN_KEY = "chain"  # milora.json of a chained adapter: the adapters it sums, in order
STARTS = ("continue", "refold")  # how a run from the champion begins (see start_from_champion)


@dataclass(frozen=True)
class ChainReport:
    """What :func:`chain_adapters` wrote: the rank (the largest layer's, with per-layer ranks),
    and per layer the relative error of a truncation to ``serve_rank`` (only the layers
    truncated; empty when the sum was kept whole)."""

    rank: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def chain_state(
    deltas: Sequence[tuple[dict[str, torch.Tensor], float | Mapping[str, float]]],
) -> dict[str, torch.Tensor]:
    """The stacked factors of a sum of plain-LoRA deltas ``(state, scale)``, at scale 1
    (``scale``: one for every layer, or ``{layer: its scale}``); a layer's rank is the sum
    of its ranks in the deltas."""
    if not deltas:
        raise ValueError("a chain needs at least one adapter")
    names = layer_names(deltas[0][0])
    for state, _ in deltas[1:]:
        if layer_names(state) != names:
            raise ValueError("the adapters of a chain must adapt the same layers")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        key_a, key_b = factor_keys(name)
        out[key_a] = torch.cat([state[key_a] for state, _ in deltas], dim=0)
        out[key_b] = torch.cat(
            [
                state[key_b] * (scale[name] if isinstance(scale, Mapping) else scale)
                for state, scale in deltas
            ],
            dim=1,
        )
    return out


def chain_adapters(
    adapter_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    serve_rank: int | None = None,
) -> ChainReport:
    """Write one plain LoRA for the stock base that applies every adapter of ``adapter_dirs``
    (oldest first, each trained on the weights the ones before it merged into), truncated to
    ``serve_rank`` when given and smaller than the sum's rank."""
    deltas, config = [], None
    for path in adapter_dirs:
        state, found = plain_lora(path)
        plain_lora_config(found, int(found["r"]), float(found["lora_alpha"]))  # refuses rsLoRA
        if found.get("rank_pattern") or found.get("alpha_pattern"):  # each layer its own scale
            scale: float | dict[str, float] = {}
            for name in layer_names(state):
                own_rank, own_alpha = layer_rank_alpha(found, name)
                scale[name] = own_alpha / own_rank
        else:
            scale = float(found["lora_alpha"]) / int(found["r"])
        if config is not None and found.get("fan_in_fan_out") != config.get("fan_in_fan_out"):
            raise ValueError(f"{path}: fan_in_fan_out differs from the chain's first adapter")
        config = config or found
        deltas.append((state, scale))
    state = chain_state(deltas)
    ranks = {name: state[factor_keys(name)[0]].shape[0] for name in layer_names(state)}
    errors: dict[str, float] = {}
    if serve_rank is not None:
        for name in layer_names(state):
            if serve_rank < ranks[name]:  # layers already within the limit stay exact
                key_a, key_b = factor_keys(name)
                state[key_a], state[key_b], errors[name] = compress_factors(
                    state[key_a], state[key_b], serve_rank
                )
                ranks[name] = serve_rank
    # Scale 1 everywhere: each layer's alpha is its rank.
    r, alpha, rank_pattern, alpha_pattern = layer_patterns({n: (k, float(k)) for n, k in ranks.items()})
    rank = max(ranks.values())
    config = plain_lora_config(config or {}, r, alpha, rank_pattern, alpha_pattern)
    write_adapter(
        Path(out_dir),
        state,
        config,
        {
            **{  # base model, targets, versions of the first; not what described it alone
                k: v
                for k, v in (read_manifest(adapter_dirs[0]) or {}).items()
                if k not in ("training", CHAIN_KEY, *PATTERNS) and not k.startswith("compressed")
            },
            "method": "lora",
            "r": r,
            "lora_alpha": alpha,
            **{key: config[key] for key in PATTERNS if config.get(key)},
            "has_initial_factors": False,
            # Relative to the chained folder: a run folder moves (published by a rename) and
            # the registry holds its adapters side by side.
            CHAIN_KEY: [os.path.relpath(Path(p).resolve(), Path(out_dir).resolve()) for p in adapter_dirs],
            **({"compressed_max_error": max(errors.values())} if errors else {}),
        },
    )
    report = ChainReport(rank, errors)
    logger.info(
        "chained %d adapters -> plain LoRA r=%d at %s%s",
        len(deltas),
        rank,
        out_dir,
        f" (truncated, worst relative error {report.max_error:.3g})" if errors else "",
    )
    return report


@dataclass(frozen=True)
class ChampionStart:
    """The champion a run starts from, as the registry holds it: its trained ``adapter`` (raw,
    with initial factors), its ``served`` plain LoRA for the stock base, and the plain LoRA its
    own weights started from (``start_weights``; None when it was trained on the stock base)."""

    strategy: str
    adapter: Path
    served: Path
    start_weights: Path | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STARTS:
            raise ValueError(f"start strategy {self.strategy!r} is not one of {STARTS}")

    @property
    def weights(self) -> Path | None:
        """The plain LoRA folded into the stock weights before the run: the champion itself
        (refold), or what the champion started from (continue)."""
        return self.served if self.strategy == "refold" else self.start_weights

    def identity(self) -> dict[str, str]:
        """What makes two starts the same start (for a run's key): strategy and adapters' bytes."""
        from milora.layout import adapter_digest

        folders = [self.adapter if self.strategy == "continue" else self.served]
        folders += [self.start_weights] if self.strategy == "continue" and self.start_weights else []
        return {"start": self.strategy, "start_sha256": adapter_digest(*folders)}


def start_from_champion(
    base_model: nn.Module,
    champion_dir: str | os.PathLike[str],
    strategy: str,
    spec: AdapterSpec | None = None,
    **init_options: object,
) -> nn.Module:
    """The trainable model a run from the champion starts with; before training it computes
    what the champion computes.

    ``continue``: the champion's adapter on ``base_model`` (the weights it was trained on),
    trainable (its method, rank and initial factors are kept; ``spec`` must be None).
    ``refold``: the champion (a plain LoRA, its served adapter) merged into ``base_model``'s
    weights, then :func:`milora.init_adapter` with ``spec`` (and ``init_options``: cache,
    device, seed) on the merged weights; its delta is relative to them, so serve the run
    with :func:`chain_adapters` ``[champion, run]``."""
    if strategy == "continue":
        if spec is not None:
            raise ValueError("continue keeps the champion's adapter: its method and rank cannot change")
        return load_adapter(base_model, champion_dir, is_trainable=True)
    if strategy == "refold":
        from milora.initialize import init_adapter

        merged = merge_adapter(base_model, champion_dir)
        return init_adapter(merged, spec, **init_options)  # type: ignore[arg-type]
    raise ValueError(f"start strategy {strategy!r} is not one of {STARTS}")


def write_served(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    start_weights: str | os.PathLike[str] | None = None,
    serve_rank: int | None = None,
) -> ChainReport:
    """The served plain LoRA for the stock base of a trained adapter: converted (rank 2r) from
    a run on the stock weights, chained ``[start_weights, adapter]`` from a run that started
    on folded weights, truncated to ``serve_rank`` when that is smaller."""
    if start_weights is None and serve_rank is None:
        manifest = read_manifest(convert_adapter(adapter_dir, out_dir)) or {}
        if manifest.get("rank_pattern"):  # the largest layer's rank (what a server must allow)
            return ChainReport(max(layer_ranks(out_dir).values()), {})
        return ChainReport(int(manifest.get("r", 0)), {})
    members = [start_weights, adapter_dir] if start_weights is not None else [adapter_dir]
    return chain_adapters(members, out_dir, serve_rank=serve_rank)


def layer_ranks(adapter_dir: str | os.PathLike[str]) -> dict[str, int]:
    """``{layer: rank}`` of a saved adapter, from its safetensors header (no tensor read)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / WEIGHTS), framework="pt") as handle:
        keys = list(handle.keys())
        return {
            name: handle.get_slice(factor_keys(name)[0]).get_shape()[0]
            for name in layer_names(dict.fromkeys(keys))
        }


def conversation_digest(conversation: Sequence[Any]) -> str:
    """A conversation's identity across datasets (its messages, canonical JSON): 16 hex digits."""
    text = json.dumps(list(conversation), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RowsSince:
    """A run from the champion's training rows: ``new`` (not in the champion's dataset: new
    facts and the records that supersede old ones) and ``earlier`` (a sample of the
    still-valid records the champion's dataset held), out of ``earlier_total``."""

    new: list[Any]
    earlier: list[Any]
    earlier_total: int

    @property
    def rows(self) -> list[Any]:
        return self.new + self.earlier


def rows_since(
    conversations: Sequence[Any], parent_digests: set[str] | frozenset[str], earlier_share: float, seed: int
) -> RowsSince:
    """Split the current dataset against the champion's: every new row, plus
    ``round(earlier_share * earlier)`` earlier ones chosen by ``seed`` alone (the same data
    and seed give the same sample, in the dataset's order). A record the champion's data held
    that was since superseded or retired is no longer in ``conversations``: never replayed."""
    new, earlier = [], []
    for conversation in conversations:
        (earlier if conversation_digest(conversation) in parent_digests else new).append(conversation)

    def draw(conversation: Any) -> str:
        return hashlib.sha256(f"{seed}:{conversation_digest(conversation)}".encode()).hexdigest()

    keep = {id(c) for c in sorted(earlier, key=draw)[: round(earlier_share * len(earlier))]}
    return RowsSince(new, [c for c in earlier if id(c) in keep], len(earlier))


CHAIN_VS_MERGED = "chained adapter vs the chain merged in turn"


@torch.no_grad()
def verify_chain(
    load_base: Callable[[], nn.Module], chained_dir: str | os.PathLike[str], input_ids: torch.Tensor
) -> float:
    """Relative logit difference between a chained adapter on the stock base and its chain
    applied in turn (each adapter merged into the weights the ones before it made)."""
    manifest = read_manifest(chained_dir) or {}
    members = manifest.get(CHAIN_KEY)
    if not members:
        raise ValueError(f"{chained_dir} is not a chained adapter (milora.json lists no {CHAIN_KEY!r})")
    model = load_base()
    for member in members:
        model = merge_adapter(model, Path(chained_dir) / member)  # relative to the chained folder
    reference = model.eval()(input_ids).logits.double()
    served = load_adapter(load_base(), chained_dir).eval()(input_ids).logits.double()
    return ((served - reference).norm() / reference.norm()).item()


def read_parent(
    folder: str | os.PathLike[str], strategy: str
) -> tuple[dict[str, Any], ChampionStart | None, set[str]]:
    """A parent folder's ``parent.json``, the start it offers under ``strategy`` (None: the
    stock base) and the digests of the parent's dataset rows."""
    from milora.layout import CHAIN_RECORD, RAW_ADAPTER, SERVED_ADAPTER, START_WEIGHTS

    folder = Path(folder)
    path = folder / PARENT_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; fetch the run's parent first (python -m tasks.parent)")
    record = json.loads(path.read_text())
    if record.get("start") != FROM_VERSION:
        return record, None, set()
    weights = folder / START_WEIGHTS
    start = ChampionStart(
        strategy, folder / RAW_ADAPTER, folder / SERVED_ADAPTER, weights if weights.is_dir() else None
    )
    rows = json.loads((folder / CHAIN_RECORD).read_text()).get("dataset_rows", [])
    return record, start, set(rows)
