"""A training run from folders: base model + conversations file -> run folder, resumable.

Start or resume is decided by the run folder alone: if it holds this run's initial adapter
(``init/``) and a complete checkpoint, the stock base gets its residual rebuilt from the
saved initial factors (no SVD) and training continues from the checkpoint; otherwise the
adapter is initialised afresh. Under ``torchrun`` every process runs this same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from milora.adapter_io import load_adapter, read_manifest, save_adapter, spec_from_manifest
from milora.cache import DecompositionCache
from milora.chain import ChampionStart, start_from_champion
from milora.config import AdapterSpec
from milora.conversion import merge_adapter
from milora.data.images import image_digests, on_first_user_turn, parse_images
from milora.errors import UserFacingError
from milora.initialize import init_adapter
from milora.layout import INITIAL_ADAPTER, MANIFEST, RUN_KEY, START_WEIGHTS
from milora.modeling import is_vision_language, load_base_model, load_processor, load_tokenizer
from milora.training.config import TrainConfig
from milora.training.examples import Message, alpaca_messages
from milora.training.loop import (
    TrainResult,
    clear_run,
    finished_run,
    is_main_process,
    last_complete_checkpoint,
    train_adapter,
)
from milora.training.multimodal import IMAGES, has_images

logger = logging.getLogger(__name__)


class UnshardedLaunchError(UserFacingError):
    """Several processes were launched for a sharded engine that cannot run on this device."""


# accelerate's launcher marks a sharded engine in the environment of every process it starts.
SHARDED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def check_sharded_launch(environ: Mapping[str, str] | None = None, cuda: bool | None = None) -> None:
    """Refuse an ``accelerate launch`` of FSDP or DeepSpeed over several processes without CUDA.

    Why: accelerate (1.15) turns these engines on only on an accelerator; on CPU each of the N
    processes trains the whole model alone on the whole data (measured: N identical adapters,
    no process group), so the run looks fine and is N times the cost of one.
    """
    environ = os.environ if environ is None else environ
    cuda = torch.cuda.is_available() if cuda is None else cuda
    processes = int(environ.get("WORLD_SIZE", "1"))
    engines = [name for key, name in SHARDED_ENGINES.items() if environ.get(key, "").lower() == "true"]
    if engines and processes > 1 and not cuda:
        raise UnshardedLaunchError(
            f"{engines[0]} was launched on {processes} processes without CUDA: accelerate runs "
            f"{engines[0]} on GPUs only, and here every process would train alone. On CPU use "
            "`torchrun --nproc_per_node N` (DDP on gloo); use the FSDP/DeepSpeed configs on GPUs."
        )


def read_conversations(path: str | os.PathLike[str]) -> list[list[Message]]:
    """JSON lines of ``{"messages": [...]}`` or Alpaca ``{"instruction", "input", "output"}``;
    a record's ``images`` (paths relative to the file's folder: the image root to train with)
    go with its first user turn."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if "messages" in record:
                conversations.append(record["messages"])
            elif {"instruction", "output"} <= record.keys():
                conversations.append(
                    alpaca_messages(record["instruction"], record.get("input", ""), record["output"])
                )
            else:
                raise ValueError(f"{path}:{number}: expected 'messages' or 'instruction'/'output' fields")
            images, problems = parse_images(record.get("images"))
            if problems or (images and not any(m.get("role") == "user" for m in conversations[-1])):
                raise ValueError(f"{path}:{number}: {'; '.join(problems) or 'images need a user turn'}")
            if images:
                conversations[-1] = on_first_user_turn(conversations[-1], images)
    return conversations


def _with_image_content(conversations: Sequence[Sequence[Message]], root: Path) -> list[Sequence[Message]]:
    """The conversations with each message's images as ``[path, sha256]`` pairs (messages
    without images, and so every text-only key, unchanged)."""
    out: list[Sequence[Message]] = []
    for messages in conversations:
        if not any(message.get(IMAGES) for message in messages):
            out.append(messages)
            continue
        out.append(
            [
                {
                    **m,
                    IMAGES: [
                        list(pair) for pair in zip(m[IMAGES], image_digests(m[IMAGES], root), strict=True)
                    ],
                }
                if m.get(IMAGES)
                else m
                for m in messages
            ]
        )
    return out


class ImagesNeedVisionBaseError(ValueError, UserFacingError):
    """Image records given to a base model that cannot see images."""


class RunMismatchError(ValueError, UserFacingError):
    """The run folder holds a run with other data, settings or base model."""


# TrainConfig fields that change how a run computes, not what it learns (left out of its key).
LAYOUT_ONLY = ("packing", "gap_dropout")


def run_key(
    base_path: str | os.PathLike[str],
    conversations: Sequence[Sequence[Message]],
    spec: AdapterSpec,
    config: TrainConfig,
    replay: Sequence[Sequence[Message]] = (),
    *,
    start: ChampionStart | None = None,
    serve_rank: int | None = None,
    dtype: str = "float32",
    image_root: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """What makes a run this run: resuming is only sound when all of it is unchanged.

    With ``image_root`` (where the messages' image paths lie), an image counts by its content:
    the same path holding another picture is other data.
    """
    if image_root is not None:
        conversations = _with_image_content(conversations, Path(image_root))
        replay = _with_image_content(replay, Path(image_root))
    content = [list(conversations), list(replay)] if replay else list(conversations)
    data = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    # The patterns join only when set: the keys of runs without one stay as they were.
    # Packing changes how batches are laid out, not what is learnt (the same loss per token):
    # a run started padded resumes packed, and keys of runs from before it stay as they were.
    # The gap dropout draws the same distribution as torch's: the same for the key, likewise.
    config_fields = {k: v for k, v in asdict(config).items() if k not in LAYOUT_ONLY}
    described: dict[str, object] = {"spec": {**asdict(spec), **spec.patterns()}, "config": config_fields}
    if serve_rank is not None:
        described["serve_rank"] = serve_rank
    if dtype != "float32":  # the default leaves the keys of earlier runs as they were
        described["dtype"] = dtype
    settings = json.dumps(described, sort_keys=True, default=str)
    return {
        "base_model": str(base_path),
        "data_sha256": data,
        "settings_sha256": hashlib.sha256(settings.encode()).hexdigest(),
        **(start.identity() if start is not None else {}),
    }


def _claim_run_dir(run_dir: Path, key: dict[str, str], restart: bool) -> None:
    """Start or continue ``run_dir`` for the run ``key``; see :func:`run_training`.

    The main process alone decides (torchrun stops the others if it raises)."""
    if not is_main_process():
        return
    path = run_dir / RUN_KEY
    if path.is_file():
        found = json.loads(path.read_text())
        if found != key:
            changed = sorted(k for k in key if found.get(k) != key[k])
            if not restart:
                raise RunMismatchError(
                    f"{run_dir} holds a run with a different {', '.join(changed)}; resuming it would "
                    "mix two runs: use another run folder or pass restart=True (--restart) to start afresh"
                )
            logger.info("run folder %s: %s changed, starting afresh", run_dir, ", ".join(changed))
            clear_run(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()) and restart:
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")


def _check_init(model: object, init_dir: Path, spec: AdapterSpec) -> None:
    """An initial adapter made for other settings must not be trained as if it were this one."""
    manifest = read_manifest(init_dir)
    if manifest is None:
        raise RunMismatchError(f"{init_dir}: not an adapter written by milora (milora.json is missing)")
    found = spec_from_manifest(manifest)
    mismatched = [
        name
        for name in (
            "method",
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
        )
        if getattr(found, name) != getattr(spec, name)
    ]
    if mismatched:
        raise RunMismatchError(
            f"{init_dir} was initialised with other {', '.join(mismatched)} than this run asks for "
            f"({', '.join(f'{n}={getattr(found, n)!r} vs {getattr(spec, n)!r}' for n in mismatched)}); "
            "rerun the init stage"
        )


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_training(
    base_path: str | os.PathLike[str],
    conversations: Sequence[Sequence[Message]],
    run_dir: str | os.PathLike[str],
    spec: AdapterSpec,
    config: TrainConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    restart: bool = False,
    device: str | None = None,
    init_dir: str | os.PathLike[str] | None = None,
    replay: Sequence[Sequence[Message]] = (),
    start: ChampionStart | None = None,
    serve_rank: int | None = None,
    dtype: str = "float32",
    image_root: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Initialise (or restore) the adapter and train it; see the module docstring.

    A run folder remembers its data, settings and base model (``run_key.json``); a folder
    holding another run is an error, or with ``restart`` is cleared first, so a resume
    never continues a different run, and a finished run is returned as it is (trains
    nothing). ``device`` is where the SVD runs (None: CUDA when
    present). ``init_dir``: start from an adapter saved by ``milora init`` / the init stage
    instead of decomposing here (it must match ``spec``). ``replay``: general conversations
    mixed into each batch (``config.replay_share``). ``start``: begin from the champion
    (:mod:`milora.chain`; ``continue`` keeps its adapter, ignoring ``spec``; ``refold``
    initialises ``spec`` on the weights with the champion folded in). ``serve_rank``: the
    served plain LoRA truncated to this rank (the error in the summary). ``dtype``: the base's
    weights in memory (``bfloat16`` halves a large base's memory on a GPU; the adapter's
    factors stay float32). ``image_root``: where the image paths of the conversations'
    messages lie (the published dataset); a vision-language base trains through its processor.
    """
    check_sharded_launch()
    vision = is_vision_language(base_path)
    if not vision and (has_images(conversations) or has_images(replay)):
        raise ImagesNeedVisionBaseError(
            f"the training data holds image records but {base_path} is not a vision-language model "
            "(no vision_config in its config.json): use an image-text-to-text base, or leave the "
            "images out of the drops"
        )
    run_dir = Path(run_dir)
    key = run_key(
        base_path,
        conversations,
        spec,
        config,
        replay,
        start=start,
        serve_rank=serve_rank,
        dtype=dtype,
        image_root=image_root,
    )
    _claim_run_dir(run_dir, key, restart)
    _barrier()
    done = finished_run(run_dir)
    if done is not None:
        logger.info(
            "%s already holds this run, trained to step %d: nothing to train", run_dir, done.global_step
        )
        return done
    base = load_base_model(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(base_path, trust_remote_code=trust_remote_code)
    processor = load_processor(base_path, trust_remote_code=trust_remote_code) if vision else None
    checkpoint = last_complete_checkpoint(run_dir)
    resuming = checkpoint is not None and (run_dir / INITIAL_ADAPTER / MANIFEST).is_file()
    weights = run_dir / START_WEIGHTS
    if not resuming and is_main_process():  # the weights this run starts on, kept for resume and serving
        shutil.rmtree(weights, ignore_errors=True)
        if start is not None and start.weights is not None:
            shutil.copytree(start.weights, weights)
    _barrier()
    if weights.is_dir():
        logger.info("folding %s into the stock weights (the run starts on them)", weights)
        base = merge_adapter(base, weights)
    if resuming:
        logger.info("resuming from %s", checkpoint)
        model = load_adapter(base, run_dir / INITIAL_ADAPTER, is_trainable=True)
    elif start is not None:
        checkpoint = None
        logger.info("starting from the champion (%s): %s", start.strategy, start.adapter)
        if start.strategy == "continue":
            model = start_from_champion(base, start.adapter, "continue")
        else:
            cache = DecompositionCache(cache_dir) if cache_dir else None
            model = init_adapter(
                base, spec, cache=cache, seed=config.seed, device=device, progress=is_main_process()
            )
        if is_main_process():
            save_adapter(model, run_dir / INITIAL_ADAPTER, base_model=str(base_path), overwrite=True)
    elif init_dir is not None:
        checkpoint = None
        logger.info("starting from the initial adapter %s (no SVD)", init_dir)
        model = load_adapter(base, init_dir, is_trainable=True)
        _check_init(model, Path(init_dir), spec)
        if is_main_process():
            save_adapter(model, run_dir / INITIAL_ADAPTER, base_model=str(base_path), overwrite=True)
    else:
        checkpoint = None
        cache = DecompositionCache(cache_dir) if cache_dir else None
        model = init_adapter(
            base, spec, cache=cache, seed=config.seed, device=device, progress=is_main_process()
        )
        if is_main_process():
            save_adapter(model, run_dir / INITIAL_ADAPTER, base_model=str(base_path), overwrite=True)
    model.train()
    result = train_adapter(
        model,
        tokenizer,
        conversations,
        run_dir,
        config,
        resume_from=checkpoint,
        base_model=str(base_path),
        replay=replay,
        start_weights=weights if weights.is_dir() else None,
        serve_rank=serve_rank,
        processor=processor,
        image_root=image_root,
    )
    _barrier()
    return result
