"""Adapter directories: PEFT's format plus the initial factors and a small manifest.

Layout of a saved adapter::

    adapter_config.json, adapter_model.safetensors   # PEFT, loadable by PeftModel
    initial/adapter_config.json, initial/adapter_model.safetensors   # A0, B0
    milora.json                                      # method, rank, scale, provenance

The trained adapter alone is *not* a model for the stock base: MiLoRA/PiSSA replaced each
target W by W_res = W - s B0 A0. :func:`load_adapter` rebuilds W_res from the stock base
and the saved A0, B0 (no SVD), then loads the adapter; :mod:`milora.conversion` turns it
into a plain LoRA for the stock base.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import peft
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from milora.atomic import atomic_directory, atomic_write_text, follow_umask
from milora.config import AdapterSpec
from milora.errors import UserFacingError
from milora.initialize import PEFT_PREFIX, InitialFactors, lora_layers, subtract_initial
from milora.layout import CONFIG, INITIAL_DIR, MANIFEST, WEIGHTS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def factor_keys(name: str) -> tuple[str, str]:
    """PEFT's saved keys of one layer's A and B (adapter name stripped)."""
    return f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"


def layer_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Base-model layer names present in a saved adapter state dict."""
    suffix = ".lora_A.weight"
    return sorted(k[len(PEFT_PREFIX) : -len(suffix)] for k in state if k.endswith(suffix))


class AdapterFolderError(UserFacingError, ValueError):
    """An adapter folder that is not what this pipeline writes (a variant, a mismatch, a link)."""


# PEFT LoRA options the methods here never set: an adapter that sets one is another model
# (DoRA's magnitudes, rsLoRA's scale, extra trained modules), whatever its manifest says.
NEUTRAL = (None, False, {}, [], "none")
UNUSED_OPTIONS = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "use_qalora",
    "bias",
    "modules_to_save",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "kasa_config",
)


# Per-layer ranks and alphas (PEFT's options): in adapter_config.json and, when set, milora.json.
PATTERNS = ("rank_pattern", "alpha_pattern")


def check_adapter_folder(path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> None:
    """Refuse an adapter folder holding links, a LoRA variant the methods do not use, or a
    config that disagrees with its manifest (``milora.json``) on rank, alpha or targets."""
    path = Path(path)
    links = [item for item in sorted(path.rglob("*")) if item.is_symlink()]
    if links:
        raise AdapterFolderError(
            f"{links[0]}: a symbolic link inside an adapter folder is refused (it could point "
            "anywhere); copy the file in"
        )
    config_path = path / CONFIG
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    problems += [
        f"{key} = {config[key]!r} (a LoRA variant the methods here do not use)"
        for key in UNUSED_OPTIONS
        if key in config and config[key] not in NEUTRAL
    ]
    if manifest is not None:
        for key in ("r", "lora_alpha", "fan_in_fan_out"):
            if key in manifest and key in config and float(config[key]) != float(manifest[key]):
                problems.append(f"{key} = {config[key]!r}, but {MANIFEST} says {manifest[key]!r}")
        for key in PATTERNS:  # a manifest records a pattern only when there is one
            found = {k: float(v) for k, v in (config.get(key) or {}).items()}
            said = {k: float(v) for k, v in (manifest.get(key) or {}).items()}
            if found != said:
                problems.append(f"{key} = {config.get(key)!r}, but {MANIFEST} says {manifest.get(key)!r}")
        targets, recorded = config.get("target_modules"), manifest.get("target_modules")
        if isinstance(targets, list) and isinstance(recorded, list) and sorted(targets) != sorted(recorded):
            problems.append(f"target_modules = {sorted(targets)}, but {MANIFEST} says {sorted(recorded)}")
    if problems:
        raise AdapterFolderError(f"{config_path}: " + "; ".join(problems))


def loadable_problems(adapter_dir: str | os.PathLike[str], base_dir: str | os.PathLike[str]) -> list[str]:
    """Why a plain LoRA adapter would not load on the base model (empty: it would): its files
    read whole, and every layer it adapts is a weight of the base with matching shapes. From
    the base's safetensors headers: no model is loaded."""
    from milora.preflight import loaded_names, tensor_shapes

    try:
        state, config = read_adapter(adapter_dir)
    except Exception as error:  # safetensors, JSON and our own checks each raise their own type
        return [f"{adapter_dir}: {type(error).__name__}: {error}"]
    names = loaded_names(Path(base_dir))  # the adapter names the loaded model's modules
    shapes = {names.get(key, key): shape for key, shape in tensor_shapes(Path(base_dir)).items()}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    problems = []
    for name in layer_names(state):
        # Some checkpoints store the base without its top module's name (GPT-2's "h.0..." for "transformer.h.0...").
        weight = shapes.get(f"{name}.weight") or shapes.get(f"{name.split('.', 1)[-1]}.weight")
        if weight is None:
            problems.append(f"{name}: not a weight of the base {base_dir}")
            continue
        fan_out, fan_in = (weight[1], weight[0]) if fan_in_fan_out else (weight[0], weight[1])
        key_a, key_b = factor_keys(name)
        a, b = tuple(state[key_a].shape), tuple(state[key_b].shape)
        if a[1] != fan_in or b[0] != fan_out or a[0] != b[1]:
            problems.append(f"{name}: factors {a} and {b} do not fit the base weight {weight}")
    if not layer_names(state):
        problems.append(f"{adapter_dir}: adapts no layer")
    return problems


def read_manifest(adapter_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(adapter_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, adapter_config) of a PEFT adapter directory, with clear errors."""
    path = Path(path)
    weights, config = path / WEIGHTS, path / CONFIG
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter directory (needs {CONFIG} and {WEIGHTS}; "
            "pickled .bin adapters are not read)"
        )
    check_adapter_folder(path, read_manifest(path))
    return load_file(weights), json.loads(config.read_text())


def config_text(config: dict[str, Any]) -> str:
    """adapter_config.json with a stable text: PEFT keeps ``target_modules`` as a set, whose
    order changes with the interpreter's hash seed, so two identical trainings would
    otherwise write different files (and DVC would see different adapters)."""
    modules = config.get("target_modules")
    if isinstance(modules, list):
        config = {**config, "target_modules": sorted(modules)}
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_adapter(
    path: Path, state: dict[str, torch.Tensor], config: dict[str, Any], manifest: dict[str, Any] | None
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path / WEIGHTS, metadata={"format": "pt"})
    follow_umask(path / WEIGHTS)  # safetensors writes 0600
    (path / CONFIG).write_text(config_text(config))
    if manifest is not None:
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def manifest_for(state: InitialFactors, **extra: Any) -> dict[str, Any]:
    spec = {k: v for k, v in asdict(state.spec).items() if k not in PATTERNS}
    if not isinstance(spec["target_modules"], str):
        spec["target_modules"] = list(spec["target_modules"])
    return {
        "format": FORMAT_VERSION,
        **spec,
        **state.spec.patterns(),  # only when set: manifests without patterns are unchanged
        "scale": state.spec.scale,
        "fan_in_fan_out": state.fan_in_fan_out,
        "has_initial_factors": bool(state.factors),
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        **extra,
    }


def save_adapter(
    model: PeftModel,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    mark_output: bool = False,
) -> Path:
    """Save the adapter, its initial factors and manifest; all or nothing.

    Written into a temporary sibling and renamed into place (:func:`milora.atomic.atomic_directory`),
    so an interrupted save never leaves a half-written adapter where a reader would find one.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    state = initial_factors_of(model)  # fail before writing anything
    with atomic_directory(out, mark=mark_output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_initial(model, tmp, base_model=base_model, extra=extra)
    logger.info("saved %s adapter to %s", state.spec.method, out)
    return out


def write_initial(
    model: PeftModel, folder: Path, *, base_model: str | None = None, extra: dict[str, Any] | None = None
) -> None:
    """Add the initial factors and the manifest to a folder PEFT has saved an adapter in.

    Used for final adapters and for every training checkpoint, so conversion stays exact
    whichever of them a run ends or resumes from.
    """
    state = initial_factors_of(model)
    config = json.loads((folder / CONFIG).read_text())
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    (folder / CONFIG).write_text(config_text(config))
    if state.factors:
        initial = {}
        for name, (A0, B0) in state.factors.items():
            key_a, key_b = factor_keys(name)
            initial[key_a], initial[key_b] = A0, B0
        write_adapter(folder / INITIAL_DIR, initial, config, None)
    manifest = manifest_for(state, base_model=base_model, **(extra or {}))
    # Written last and whole: a checkpoint with its manifest is complete (last_complete_checkpoint).
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def initial_factors_of(model: nn.Module) -> InitialFactors:
    state = getattr(model, "milora_init", None)
    if state is None:
        raise ValueError("model carries no MiLoRA initial state; build it with milora.init_adapter")
    return state


def spec_from_manifest(manifest: dict[str, Any]) -> AdapterSpec:
    targets = manifest["target_modules"]
    return AdapterSpec(
        method=manifest["method"],
        r=int(manifest["r"]),
        lora_alpha=float(manifest["lora_alpha"]),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=float(manifest.get("lora_dropout", 0.0)),
        solver=manifest.get("solver", "auto"),
        rank_pattern={k: int(v) for k, v in (manifest.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (manifest.get("alpha_pattern") or {}).items()},
    )


def load_adapter(
    base_model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    *,
    is_trainable: bool = False,
    adapter_name: str = "default",
) -> PeftModel:
    """Put a saved adapter on the *stock* base model, rebuilding W_res from A0, B0.

    Plain PEFT adapters (no manifest, or plain/converted LoRA) load as PEFT would.
    """
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    check_adapter_folder(adapter_dir, manifest)
    initial: dict[str, torch.Tensor] = {}
    if manifest is not None and manifest.get("has_initial_factors"):
        initial, _ = read_adapter(adapter_dir / INITIAL_DIR)
        modules = dict(base_model.named_modules())
        spec = spec_from_manifest(manifest)
        scale = float(manifest["scale"])
        fan_in_fan_out = bool(manifest.get("fan_in_fan_out", False))
        for name in layer_names(initial):
            if name not in modules:
                raise ValueError(
                    f"adapter {adapter_dir} adapts {name!r}, which this base model lacks; "
                    f"it was made for {manifest.get('base_model')!r}"
                )
            key_a, key_b = factor_keys(name)
            # Each layer's own scale under a rank/alpha pattern, as init_adapter used it.
            layer_scale = spec.scale_of(name) if spec.has_patterns else scale
            subtract_initial(
                modules[name].weight, initial[key_a], initial[key_b], layer_scale, fan_in_fan_out
            )
    model = PeftModel.from_pretrained(
        base_model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable
    )
    if manifest is not None:
        state = InitialFactors(
            spec=spec_from_manifest(manifest),
            fan_in_fan_out=bool(manifest.get("fan_in_fan_out", False)),
        )
        for name in layer_names(initial):
            key_a, key_b = factor_keys(name)
            state.factors[name] = (initial[key_a], initial[key_b])
        missing = set(state.factors) - set(lora_layers(model, adapter_name))
        if missing:
            raise ValueError(f"initial factors name layers the adapter lacks: {sorted(missing)[:5]}")
        model.milora_init = state
    return model
