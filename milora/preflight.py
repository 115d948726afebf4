"""Checks of a base model folder that need no model loaded: run before any stage, so a typo
in ``base_model`` or ``train.target_modules`` fails in a second with the key to fix, not
after ingest and validation.

Tensor names come from the safetensors headers (8-byte length, then JSON) or the sharded
index, read as text: nothing is unpickled, nothing imports torch.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Sequence
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _header(path: Path) -> dict[str, dict]:
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {key: value for key, value in header.items() if key != "__metadata__"}


def tensor_names(folder: Path) -> set[str]:
    """Every tensor name of a model folder's safetensors weights (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    names: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        names.update(_header(path))
    return names


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers of a model folder (every shard)."""
    return {
        name: tuple(entry["shape"])
        for path in sorted(folder.glob("*.safetensors"))
        for name, entry in _header(path).items()
    }


def renamed_on_load(model_type: str) -> bool:
    """Whether transformers maps this model type's checkpoint keys to other names (or fuses
    them, as for mixture-of-experts layers) on load: the checkpoint's names are then not the
    loaded model's, and an adapter written from them would not load."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # older transformers: checkpoints load under their own names
        return False
    return bool(get_checkpoint_conversion_mapping(model_type))


def loaded_names(folder: Path) -> dict[str, str]:
    """``{checkpoint tensor name: its name in the loaded model}``: the same name, unless
    transformers renames this model type's keys on load (LLaVA's checkpoint says
    ``language_model.model.layers.0``, the loaded model ``model.language_model.layers.0``);
    then transformers' own renaming decides, on the model built on the meta device (no
    weight is read, torch is imported only then)."""
    return checkpoint_layout(folder)[0]


def checkpoint_layout(folder: Path) -> tuple[dict[str, str], frozenset[str]]:
    """:func:`loaded_names`, and the checkpoint tensors transformers does more to than rename
    (a converter: mixture-of-experts weights fused into one), whose values are not the loaded
    model's one for one."""
    folder = Path(folder)
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors*"))]
    stamp = tuple(
        (path.name, found.st_mtime_ns, found.st_size, found.st_ino)
        for path in files
        if path.is_file() and (found := path.stat())
    )
    names, converted = _layout(str(folder.resolve()), stamp)
    return dict(names), converted


@functools.lru_cache(maxsize=8)
def _layout(folder_text: str, stamp: tuple) -> tuple[dict[str, str], frozenset[str]]:
    folder = Path(folder_text)
    names = sorted(tensor_names(folder))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # Sub-models bring their own renamings (Qwen2-VL's language model), which the registry
    # of the top model type does not list: a vision-language base always asks the model.
    if not renamed_on_load(str(config.get("model_type", ""))) and "vision_config" not in config:
        return {name: name for name in names}, frozenset()
    import torch
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    from milora.modeling import AUTO_CLASSES, model_kind

    with torch.device("meta"):
        model = AUTO_CLASSES[model_kind(config)].from_config(
            AutoConfig.from_pretrained(folder, trust_remote_code=False)
        )
    meta = model.state_dict()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    renamed, converted = {}, set()
    for name in names:
        loaded, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        renamed[name] = loaded
        if converter is not None:
            converted.add(name)
    return renamed, frozenset(converted)


def base_model_problems(
    folder: Path, target_modules: Sequence[str] | str, *, key: str = "base_model"
) -> list[str]:
    """What stops ``folder`` serving as the base for ``target_modules`` (empty: nothing found),
    each naming the setting to fix."""
    if not (folder / "config.json").is_file():
        return [f"{key}: {folder} is not a Hugging Face model folder (no config.json)"]
    problems = []
    names = tensor_names(folder)
    if not names:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        problems.append(
            f"{key}: {folder} has no safetensors weights"
            + (f" (only pickled {', '.join(pickled)}: convert them to safetensors)" if pickled else "")
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{key}: {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    if names and not isinstance(target_modules, str):
        layers = {
            name.removesuffix(".weight").rsplit(".", 1)[-1] for name in names if name.endswith(".weight")
        }
        missing = [t for t in target_modules if t.rsplit(".", 1)[-1] not in layers]
        if missing:
            problems.append(
                f"train.target_modules: {missing} are not layers of {folder} (its weights name "
                f"{', '.join(sorted(n for n in layers if n.endswith('proj') or n in ('c_attn', 'c_fc', 'c_proj'))) or 'other layers'})"
            )
    return problems
