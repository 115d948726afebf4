"""Wrapping a causal LM with an adapter started by one of :data:`~milora.methods.INIT_METHODS`.

PEFT builds the LoRA layers; this module asks the method for each layer's starting values
and overwrites them and the frozen base weights. For MiLoRA, a target weight W (out x in),
with s = alpha / r:

    W = U diag(S) V^T,  keep r triplets (minor for MiLoRA, principal for PiSSA)
    A0 = diag(sqrt(S_r / s)) V_r^T,  B0 = U_r diag(sqrt(S_r / s)),  W_res = W - s B0 A0

so the wrapped model computes exactly what the base computed. With a ``rank_pattern`` /
``alpha_pattern`` each layer has its own r and s (:meth:`AdapterSpec.for_layer`, PEFT's
matching rule), and everything above holds per layer. The initial factors are
kept on the model (``model.milora_init``) and saved with every adapter: they are needed to
rebuild W_res from the stock base and to convert the trained adapter for serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from milora.cache import DecompositionCache, weight_fingerprint
from milora.config import DEFAULT_TARGETS, AdapterSpec
from milora.decomposition import Components, decompose
from milora.methods import INIT_METHODS, InitMethod
from milora.sharding import share_out, world
from milora.targets import TargetError, exclude_modules, find_targets

logger = logging.getLogger(__name__)

# PEFT names a wrapped layer "base_model.model.<name in the base model>".
PEFT_PREFIX = "base_model.model."


@dataclass
class InitialFactors:
    """The adapter's starting point: spec and, per base-model layer name, (A0, B0)."""

    spec: AdapterSpec
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    seconds: float = 0.0
    cache_hits: int = 0


def init_adapter(
    model: nn.Module,
    spec: AdapterSpec | None = None,
    *,
    method: str = "milora",
    r: int = 16,
    lora_alpha: float | None = None,
    target_modules: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS,
    lora_dropout: float = 0.05,
    solver: str = "auto",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    cache: DecompositionCache | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    workers: int | None = None,
    adapter_name: str = "default",
    progress: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA adapter initialised by ``method``.

    Pass either a validated ``spec`` or the method, rank, alpha, targets, dropout, solver
    and per-layer rank/alpha patterns (PEFT's ``rank_pattern``/``alpha_pattern``) as
    keywords. ``device`` is where decompositions run (default: CUDA when available, one
    matrix at a time, else where the weight lives). ``cache`` skips
    decompositions already done for these exact weights. ``seed`` fixes plain LoRA's
    random A. ``workers`` > 1 decomposes that many matrices at once on the CPU, each
    with one BLAS thread (default 1: on a 2-core machine that was faster, see README).
    """
    if spec is None:
        spec = AdapterSpec(
            method=method,
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
            lora_dropout=lora_dropout,
            solver=solver,
            rank_pattern=rank_pattern or {},
            alpha_pattern=alpha_pattern or {},
        )
    found = find_targets(model, spec.target_modules, min([spec.r, *dict(spec.rank_pattern).values()]))
    check_layer_ranks(spec, {t.name: t.shape for t in found})
    fan_in_fan_out = found[0].fan_in_fan_out
    # Vision-language bases: the vision tower and projector stay out unless named (PEFT's own
    # exclude_modules, saved with the adapter so every load wraps the same layers).
    config = lora_config(spec, fan_in_fan_out, exclude_modules(model, spec.target_modules))
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    peft_model.train(was_training)  # new dropout layers follow the model's mode
    state = InitialFactors(spec=spec, fan_in_fan_out=fan_in_fan_out)
    method = INIT_METHODS[spec.method]
    if method.init is not None:
        started = time.perf_counter()
        layers = lora_layers(peft_model, adapter_name)
        hits_before = cache.hits if cache is not None else 0
        factors = _initial_factors(
            layers, spec, method, fan_in_fan_out, cache, _compute_device(device), workers, progress
        )
        for name, layer in layers.items():
            state.factors[name] = _apply_factors(
                layer, adapter_name, *factors[name], spec.for_layer(name), fan_in_fan_out
            )
        state.seconds = time.perf_counter() - started
        state.cache_hits = (cache.hits - hits_before) if cache is not None else 0
        logger.info(
            "%s init of %d matrices (r=%d%s) in %.2f s, %d from cache",
            spec.method,
            len(layers),
            spec.r,
            f", {len(spec.rank_pattern)} rank_pattern keys" if spec.rank_pattern else "",
            state.seconds,
            state.cache_hits,
        )
    peft_model.milora_init = state
    return peft_model


def check_layer_ranks(spec: AdapterSpec, shapes: dict[str, tuple[int, int]]) -> None:
    """Every layer's own rank fits its ``(out, in)`` shape, and the spec's patterns say one
    thing per layer (:meth:`AdapterSpec.check_layers`); raises with what to do otherwise."""
    if not spec.has_patterns:
        return  # find_targets / target_weights checked r against every shape
    try:
        spec.check_layers(shapes)
    except ValueError as error:
        raise TargetError(str(error)) from None
    for name, shape in shapes.items():
        rank = spec.rank_of(name)
        if rank > min(shape):
            raise TargetError(
                f"rank {rank} (rank_pattern) exceeds min(out, in)={min(shape)} of {name} "
                f"(shape {shape[0]}x{shape[1]}); choose a rank <= {min(shape)}"
            )


def lora_config(spec: AdapterSpec, fan_in_fan_out: bool, exclude: str | None = None) -> LoraConfig:
    """PEFT's config of the adapter ``spec`` describes (PEFT's own init; the method's factors
    are written over it). Patterns go in sorted key order, as PEFT reads them back.
    ``exclude``: PEFT's ``exclude_modules`` (:func:`milora.targets.exclude_modules`)."""
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules
        if isinstance(spec.target_modules, str)
        else list(spec.target_modules),
        exclude_modules=exclude,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=True,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """LoRA layers of a PEFT model by their name in the base model."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


@torch.no_grad()
def subtract_initial(
    weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scale: float, fan_in_fan_out: bool
) -> None:
    """``W <- W - s B0 A0``, one fused multiply-add in float32 (float64 for float64 weights).

    The one place the residual is formed, at initialisation and when an adapter is loaded
    onto the stock base, so both give bit-identical residual weights.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    A = A0.to(weight.device, work)
    B = B0.to(weight.device, work)
    if fan_in_fan_out:  # stored as W^T: W^T - s A^T B^T
        residual = torch.addmm(weight.to(work), A.T, B.T, alpha=-scale)
    else:
        residual = torch.addmm(weight.to(work), B, A, alpha=-scale)
    weight.copy_(residual)


def _compute_device(device: str | torch.device | None) -> torch.device | None:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else None


def components_source(
    spec: AdapterSpec, cache: DecompositionCache | None, device: torch.device | None
) -> Callable[[torch.Tensor, int, str], Components]:
    """A weight's singular triplets for a method's ``init``: from the cache when this exact
    weight was decomposed before, else decomposed on ``device`` (and cached)."""

    def components(weight: torch.Tensor, rank: int, side: str) -> Components:
        fingerprint = weight_fingerprint(weight) if cache is not None else None
        found = cache.get(fingerprint, side, rank) if cache is not None else None
        if found is None:
            found = decompose(weight if device is None else weight.to(device), rank, side, spec.solver)
            if cache is not None:
                cache.put(fingerprint, found)
        return found

    return components


def _initial_factors(
    layers: dict[str, LoraLayer],
    spec: AdapterSpec,
    method: InitMethod,
    fan_in_fan_out: bool,
    cache: DecompositionCache | None,
    device: torch.device | None,
    workers: int | None,
    progress: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``method``'s (A0, B0) for every layer's base weight, its components from the cache or
    decomposed.

    On the CPU, ``workers`` > 1 threads each handle one matrix with single-threaded BLAS
    (can pay on many-core hosts, where the memory-bound tridiagonal reduction scales poorly;
    on 2 cores it measured slower than one matrix at a time on both). On an accelerator
    matrices go one at a time, so peak memory stays near the model's size. In a process group
    of several ranks (torchrun), each matrix is decomposed by one rank and broadcast
    (:func:`milora.sharding.share_out`).
    """

    components = components_source(spec, cache, device)

    def one(name: str) -> tuple[str, tuple[torch.Tensor, torch.Tensor]]:
        weight = layers[name].get_base_layer().weight.detach()
        return name, method.init(weight.T if fan_in_fan_out else weight, spec.for_layer(name), components)

    _, processes = world()
    if processes > 1:  # under torchrun: each matrix decomposed by one rank, broadcast to all
        shapes = {}
        for name, layer in layers.items():
            rows, cols = layer.get_base_layer().weight.shape  # Conv1D stores in x out
            shapes[name] = (cols, rows) if fan_in_fan_out else (rows, cols)
        shared = share_out(
            shapes, spec.rank_of, lambda name: one(name)[1], progress=progress, desc=f"{spec.method} init"
        )
        return shared.factors
    on_cpu = (device or next(iter(layers.values())).get_base_layer().weight.device).type == "cpu"
    n_workers = min(workers or 1, len(layers)) if on_cpu else 1
    bar = tqdm(total=len(layers), desc=f"{spec.method} init", unit="matrix", disable=not progress)
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with bar:
        if n_workers == 1:
            for name in layers:
                results.update([one(name)])
                bar.update()
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with threadpool_limits(limits=1), ThreadPoolExecutor(n_workers) as pool:
                    for name, found in pool.map(one, layers):
                        results[name] = found
                        bar.update()
            finally:
                torch.set_num_threads(threads)
    return results


def _apply_factors(
    layer: LoraLayer,
    adapter_name: str,
    A0: torch.Tensor,
    B0: torch.Tensor,
    spec: AdapterSpec,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write A0, B0 into the LoRA layer and W_res into its base; return the stored factors."""
    lora_A = layer.lora_A[adapter_name].weight
    lora_B = layer.lora_B[adapter_name].weight
    with torch.no_grad():
        lora_A.copy_(A0.to(lora_A.device, lora_A.dtype))
        lora_B.copy_(B0.to(lora_B.device, lora_B.dtype))
    # The residual uses the factors as stored, so reloading reproduces it exactly.
    A0_stored, B0_stored = lora_A.detach().cpu().clone(), lora_B.detach().cpu().clone()
    subtract_initial(layer.get_base_layer().weight, A0_stored, B0_stored, spec.scale, fan_in_fan_out)
    return A0_stored, B0_stored
