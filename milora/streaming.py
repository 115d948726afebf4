"""SVD initialisation streamed from a checkpoint's safetensors files: no model in memory.

``init_adapter`` wraps a loaded model, so initialising a base needs the whole model in
memory. Here the target weights are read one matrix at a time from the checkpoint's
safetensors shards (``model.safetensors`` or the ``model.safetensors.index.json`` shards),
decomposed (served from the decomposition cache when known), and the adapter folder is
written directly: PEFT's adapter holding the initial factors, ``initial/`` and the manifest,
the same folder ``init_adapter`` + ``save_adapter`` write. Nothing else is written: the
residual ``W - s B0 A0`` is formed when the adapter is loaded onto the stock base, as for
any adapter of this project. Peak memory is about the largest target matrix (and its
decomposition), whatever the model's size.

Only methods initialised from the spectrum (milora, pissa) and ``nn.Linear`` targets
(weights stored out x in, as LLaMA, Mistral, Qwen2 keep them) are streamed; GPT-2's Conv1D
and plain LoRA's random start go through :func:`milora.init_adapter`. Where transformers
renames a checkpoint's keys on load (LLaVA: ``language_model.model.layers.0`` becomes
``model.language_model.layers.0``), the adapter names the loaded model's modules, through
transformers' own renaming run on the model built on the meta device
(:func:`milora.preflight.checkpoint_layout`); a vision-language model's vision tower and
projector are left out unless a target names them, as :func:`milora.init_adapter` leaves
them out. Weights transformers converts on load (fused experts) are not streamed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from milora.adapter_io import config_text, factor_keys, manifest_for, write_adapter
from milora.atomic import atomic_directory
from milora.cache import DecompositionCache
from milora.config import AdapterSpec
from milora.initialize import (
    InitialFactors,
    _compute_device,
    check_layer_ranks,
    components_source,
    lora_config,
)
from milora.layout import INITIAL_DIR, MANIFEST
from milora.methods import INIT_METHODS
from milora.preflight import checkpoint_layout, renamed_on_load
from milora.sharding import share_out, world
from milora.targets import TargetError, exclude_pattern, excluded, matches, part_of

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONV1D_MODELS = ("gpt2",)  # weights stored in x out (Conv1D): not streamed


def checkpoint_files(base_dir: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder, in a stable order."""
    base = Path(base_dir)
    if (base / INDEX).is_file():
        shards = sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
        return [base / shard for shard in shards]
    if (base / SINGLE).is_file():
        return [base / SINGLE]
    raise FileNotFoundError(f"{base}: no {SINGLE} or {INDEX} (a safetensors checkpoint is needed)")


@dataclass(frozen=True)
class StreamedTargets:
    """The matrices a streamed init decomposes: ``{module name: (checkpoint tensor, shard)}``,
    module names as the loaded model names them (what the adapter's keys must say), and
    PEFT's ``exclude_modules`` for a vision-language model's vision parts."""

    sources: dict[str, tuple[str, Path]]
    exclude: str | None = None


def streamed_targets(base_dir: str | os.PathLike[str], targets: tuple[str, ...]) -> StreamedTargets:
    """Every 2-D ``<module>.weight`` whose module a target matches (PEFT's rule, on the name
    the loaded model gives it: transformers' renaming of LLaVA's keys applied), read from the
    shards' headers only. On a vision-language model the vision tower and projector are left
    out unless a target names them, as :func:`milora.init_adapter` leaves them out. Every
    target must name at least one matrix (the error lists the names that would); a matrix
    transformers converts on load (fused experts) cannot be streamed."""
    names, converted = checkpoint_layout(Path(base_dir))
    parts = {part for name in names.values() if (part := part_of(name)) is not None}
    exclude = exclude_pattern(parts, targets)
    found: dict[str, tuple[str, Path]] = {}
    adaptable: set[str] = set()
    for shard in checkpoint_files(base_dir):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                module, _, leaf = names.get(key, key).rpartition(".")
                if leaf != "weight" or len(handle.get_slice(key).get_shape()) != 2:
                    continue
                name = module.rpartition(".")[2]
                if "embed" not in name and not excluded(module, exclude):  # embeddings: 2-D, not linear
                    adaptable.add(name)
                if matches(module, targets) and not excluded(module, exclude):
                    if key in converted:
                        raise TargetError(
                            f"{key}: transformers converts this weight when it loads it (not only renames "
                            "it), so the checkpoint's matrix is not the loaded layer's"
                        )
                    found[module] = (key, shard)
    missing = [t for t in targets if not any(matches(m, (t,)) for m in found)]
    if missing:
        where = "the language model's" if parts else "the model's"
        raise TargetError(
            f"target modules {missing} not found among {where} linear layers; "
            f"adaptable names are {sorted(adaptable)} ({base_dir})"
        )
    return StreamedTargets(dict(sorted(found.items())), exclude)


def target_weights(base_dir: str | os.PathLike[str], targets: tuple[str, ...]) -> dict[str, Path]:
    """``{module name: shard}`` of :func:`streamed_targets`."""
    return {name: shard for name, (_, shard) in streamed_targets(base_dir, targets).sources.items()}


def weight_shapes(sources: dict[str, tuple[str, Path]]) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of :class:`StreamedTargets` matrices, from the headers."""
    shapes: dict[str, tuple[int, int]] = {}
    for shard in sorted({shard for _, shard in sources.values()}):
        with safe_open(str(shard), framework="pt") as handle:
            for name, (key, found) in sources.items():
                if found == shard:
                    rows, cols = handle.get_slice(key).get_shape()
                    shapes[name] = (rows, cols)
    return {name: shapes[name] for name in sources}


def check_shapes(spec: AdapterSpec, shapes: dict[str, tuple[int, int]]) -> None:
    """Every matrix's rank (``r``, or its ``rank_pattern`` rank) fits its shape, as
    :func:`milora.targets.find_targets` checks on a loaded model; the patterns say one thing
    per layer."""
    if not spec.has_patterns:
        for name, shape in shapes.items():
            if spec.r > min(shape):
                raise TargetError(
                    f"rank r={spec.r} exceeds min(out, in)={min(shape)} of {name} "
                    f"(shape {shape[0]}x{shape[1]}); choose r <= {min(shape)}"
                )
    check_layer_ranks(spec, shapes)


def why_not_streamed(base_dir: str | os.PathLike[str], spec: AdapterSpec) -> str | None:
    """Why :func:`init_streamed` cannot initialise ``spec`` on this checkpoint; None if it can."""
    if INIT_METHODS[spec.method].init is None:
        return f"{spec.method} starts from random factors, not the spectrum"
    if isinstance(spec.target_modules, str):
        return f"target_modules is a pattern ({spec.target_modules!r}), resolved on the loaded model"
    config_path = Path(base_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model_type = config.get("model_type")
    if model_type in CONV1D_MODELS:
        return f"{model_type} stores its weights as Conv1D"
    try:
        checkpoint_files(base_dir)
    except FileNotFoundError as error:
        return str(error)
    if (model_type and renamed_on_load(model_type)) or "vision_config" in config:
        if "auto_map" in config:
            return f"{model_type or 'this model'} brings its own code: its layer names come from the loaded model"
        try:  # names transformers changes on load: streamed only where it merely renames them
            streamed_targets(base_dir, spec.target_modules)
        except TargetError as error:
            if "converts this weight" in str(error):
                return str(error)
        except Exception as error:  # a model type this transformers cannot build
            return f"its loaded names could not be worked out ({type(error).__name__}: {error})"
    return None


def init_streamed(
    base_dir: str | os.PathLike[str],
    spec: AdapterSpec,
    out_dir: str | os.PathLike[str],
    *,
    cache: DecompositionCache | None = None,
    device: str | torch.device | None = None,
    base_model: str | None = None,
    progress: bool = True,
    mark_output: bool = False,
) -> InitialFactors:
    """Write the adapter ``spec`` describes for the checkpoint ``base_dir`` into ``out_dir``
    (all or nothing), reading one target matrix at a time; returns its initial state.

    Under ``torchrun`` (a process group of several ranks) each matrix is decomposed by one
    rank and broadcast (:func:`milora.sharding.share_out`); rank 0 writes the folder.
    ``mark_output`` as :func:`milora.atomic.atomic_directory`.
    """
    reason = why_not_streamed(base_dir, spec)
    if reason is not None:
        raise ValueError(f"{base_dir}: {reason}; use milora.init_adapter")
    method = INIT_METHODS[spec.method]
    started = time.perf_counter()
    components = components_source(spec, cache, _compute_device(device))
    hits = cache.hits if cache is not None else 0
    state = InitialFactors(spec=spec, fan_in_fan_out=False)
    targets = streamed_targets(base_dir, spec.target_modules)
    shapes = weight_shapes(targets.sources)
    check_shapes(spec, shapes)

    def factors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key, shard = targets.sources[name]
        with safe_open(str(shard), framework="pt") as handle:
            weight = handle.get_tensor(key)
        return method.init(weight, spec.for_layer(name), components)

    shared = share_out(
        shapes, spec.rank_of, factors, progress=progress, desc=f"{spec.method} init (streamed)"
    )
    adapter: dict[str, torch.Tensor] = {}
    for name, (A0, B0) in shared.factors.items():
        # Stored as PEFT stores LoRA factors (float32), exactly as init_adapter keeps them.
        A0, B0 = A0.to(torch.float32).contiguous(), B0.to(torch.float32).contiguous()
        state.factors[name] = (A0, B0)
        key_a, key_b = factor_keys(name)
        adapter[key_a], adapter[key_b] = A0, B0
    state.seconds = time.perf_counter() - started
    state.cache_hits = (cache.hits - hits) if cache is not None else 0
    config = lora_config(spec, fan_in_fan_out=False, exclude=targets.exclude)
    config.base_model_name_or_path = base_model or str(base_dir)
    config.inference_mode = True  # as PEFT saves it
    # As PEFT's save_pretrained writes it: sets (target_modules) as lists.
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    config_dict = json.loads(config_text(fields))
    rank, processes = world()
    # Several processes: the matrices each rank decomposed (each matrix by one rank).
    shared_by = {"matrices_per_process": shared.per_rank} if processes > 1 else {}
    if rank == 0:
        with atomic_directory(Path(out_dir), mark=mark_output) as tmp:
            write_adapter(tmp, adapter, config_dict, None)
            write_adapter(tmp / INITIAL_DIR, adapter, config_dict, None)
            manifest = manifest_for(
                state, base_model=base_model, streamed=True, init_seconds=state.seconds, **shared_by
            )
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if processes > 1:
        dist.barrier()  # the folder exists on every rank's return
    logger.info(
        "%s init of %d matrices (r=%d) streamed from %s in %.2f s, %d from cache -> %s",
        spec.method,
        len(targets.sources),
        spec.r,
        base_dir,
        state.seconds,
        state.cache_hits,
        out_dir,
    )
    return state


def init_to_folder(
    base_dir: str | os.PathLike[str],
    spec: AdapterSpec,
    out_dir: str | os.PathLike[str],
    *,
    streamed: bool | None = None,
    cache: DecompositionCache | None = None,
    device: str | None = None,
    seed: int | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    base_model: str | None = None,
    mark_output: bool = False,
) -> tuple[InitialFactors, bool]:
    """The adapter ``spec`` describes for ``base_dir``, written to ``out_dir``; returns its
    initial state and whether it was streamed.

    ``streamed``: True streams (an error where it cannot), False loads the model, None
    streams whenever :func:`why_not_streamed` allows and says why not in the log. Under
    ``torchrun`` the processes share the decompositions (:mod:`milora.sharding`) and rank 0
    writes; every rank returns once the folder exists. The ``milora init`` command and the
    pipeline's init stage both go through here.
    """
    from milora.adapter_io import save_adapter
    from milora.initialize import init_adapter
    from milora.modeling import load_base_model
    from milora.sharding import process_group

    if streamed is None:
        reason = why_not_streamed(base_dir, spec)
        streamed = reason is None
        if reason is not None:
            logger.info("init on the loaded model (not streamed: %s)", reason)
    with process_group(device) as (process, size):
        if streamed:
            state = init_streamed(
                base_dir,
                spec,
                out_dir,
                cache=cache,
                device=device,
                base_model=base_model,
                mark_output=mark_output,
            )
        else:
            started = time.perf_counter()
            model = init_adapter(
                load_base_model(base_dir, dtype=dtype, trust_remote_code=trust_remote_code),
                spec,
                cache=cache,
                device=device,
                seed=seed,
            )
            seconds = time.perf_counter() - started
            if process == 0:
                save_adapter(
                    model, out_dir, base_model=base_model, overwrite=True,
                    extra={"init_seconds": seconds}, mark_output=mark_output,
                )  # fmt: skip
            if size > 1:
                dist.barrier()  # the folder exists on every rank's return
            state = model.milora_init
    return state, streamed
