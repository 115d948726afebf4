"""One run of a comparison, scored at several points along training.

Learning and forgetting move together: a method that learns the company data slower also
forgets less at any fixed step. So each run keeps a snapshot every ``eval_every`` steps
(the training loop's own checkpoints, which are self-contained adapter folders) and every
snapshot is scored on the same suites as the pipeline's evaluate stage, with the same code
(:func:`milora.evaluation.runner.evaluate_model` and :func:`~milora.evaluation.runner.compare`).
Step 0 is the base model itself: all three methods start with the base's outputs exactly.

The run's folder ends with ``start/`` (the initial adapter), ``train/`` (the training run,
its checkpoints removed once scored) and ``trajectory.json`` (the :class:`RunRecord`),
written last; a rerun with the same inputs returns the record without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from milora.adapter_io import load_adapter, save_adapter
from milora.atomic import atomic_write_text
from milora.cache import DecompositionCache
from milora.config import AdapterSpec
from milora.evaluation.runner import cached_results, compare, evaluate_model, weights_digest
from milora.evaluation.scoring import lower_is_better
from milora.evaluation.suites import SuiteResult
from milora.initialize import init_adapter
from milora.layout import CHECKPOINTS, RAW_ADAPTER, SUMMARY
from milora.modeling import load_base_model, load_tokenizer
from milora.settings import SuiteSettings
from milora.training.config import TrainConfig
from milora.training.examples import Message
from milora.training.run import run_key, run_training

logger = logging.getLogger(__name__)

RECORD = "trajectory.json"
RECORD_VERSION = 1  # bump when what a record holds changes, so old records are recomputed
_SNAPSHOT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Point:
    """Scores of one snapshot: headline score per suite, forgetting per retention suite."""

    step: int
    scores: dict[str, float]
    forgetting: dict[str, float] = field(default_factory=dict)


@dataclass
class RunRecord:
    """What one (method, seed, learning rate) run learned and forgot, step by step."""

    method: str
    seed: int
    learning_rate: float
    rank: int
    steps: int
    init_seconds: float  # the SVD (0 for plain LoRA); ~0 when served from the cache
    init_cache_hits: int
    train_seconds: float
    eval_seconds: float
    suites: dict[str, dict[str, Any]]  # name -> metric, retention, lower_is_better, base
    points: list[Point]
    key: str = ""

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The record from :func:`dataclasses.asdict` output (JSON, a Prefect task result)."""
        points = [p if isinstance(p, Point) else Point(**p) for p in data["points"]]
        return cls(**{**data, "points": points})

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        return cls.from_dict(json.loads(path.read_text()))

    def curve(self, suite: str) -> list[tuple[int, float]]:
        """(step, score) of ``suite`` along training."""
        return [(p.step, p.scores[suite]) for p in self.points if suite in p.scores]


def snapshots(train_dir: Path, final_step: int) -> list[tuple[int, Path]]:
    """The run's scored adapters by step: every checkpoint, and the final adapter when the
    last step was not a checkpoint."""
    found: dict[int, Path] = {}
    folder = train_dir / CHECKPOINTS
    if folder.is_dir():
        for path in folder.iterdir():
            if (m := _SNAPSHOT.match(path.name)) and (path / "adapter_config.json").is_file():
                found[int(m.group(1))] = path
    if final_step not in found and (train_dir / RAW_ADAPTER / "adapter_config.json").is_file():
        found[final_step] = train_dir / RAW_ADAPTER
    return sorted(found.items())


def _point(
    step: int, base: Mapping[str, SuiteResult], results: Mapping[str, SuiteResult], suites: Mapping[str, Any]
) -> Point:
    rows = compare(base, results, suites)
    return Point(
        step,
        {row.suite: row.adapter for row in rows},
        {row.suite: row.forgetting for row in rows if row.forgetting is not None},
    )


def _record_key(
    base_path: Path,
    conversations: Sequence[Sequence[Message]],
    spec: AdapterSpec,
    config: TrainConfig,
    suites: Mapping[str, SuiteSettings],
    replay: Sequence[Sequence[Message]] = (),
) -> str:
    payload = {
        "version": RECORD_VERSION,
        "run": run_key(base_path, conversations, spec, config, replay),
        "suites": {name: suite.model_dump() for name, suite in suites.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def track_run(
    base_path: str | os.PathLike[str],
    conversations: Sequence[Sequence[Message]],
    run_dir: str | os.PathLike[str],
    spec: AdapterSpec,
    config: TrainConfig,
    suites: Mapping[str, SuiteSettings],
    root: Path,
    *,
    eval_every: int,
    cache_dir: str | os.PathLike[str] | None = None,
    eval_cache_dir: Path | None = None,
    batch_size: int = 32,
    device: str | None = None,
    replay: Sequence[Sequence[Message]] = (),
) -> RunRecord:
    """Initialise, train with a snapshot every ``eval_every`` steps, score every snapshot.

    ``cache_dir`` is the SVD cache (repeated seeds decompose nothing), ``eval_cache_dir``
    the base results' cache; ``device`` is where the SVD runs (None: CUDA when present);
    ``replay``: general conversations mixed into each batch (``config.replay_share``).
    Snapshots are scored on CUDA when present, else on the CPU.
    """
    base_path, run_dir = Path(base_path), Path(run_dir)
    config = replace(config, save_steps=eval_every, keep_checkpoints=True, save_total_limit=None)
    key = _record_key(base_path, conversations, spec, config, suites, replay)
    if (run_dir / RECORD).is_file():
        found = RunRecord.read(run_dir / RECORD)
        if found.key == key:
            logger.info("%s already holds this run's record: nothing to train", run_dir)
            return found
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "train" / SUMMARY).is_file() and not (run_dir / "train" / CHECKPOINTS).is_dir():
        shutil.rmtree(run_dir / "train")  # trained and scored for other suites: its snapshots are gone

    model = init_adapter(
        load_base_model(base_path),
        spec,
        cache=DecompositionCache(cache_dir) if cache_dir else None,
        seed=config.seed,
        device=device,
        progress=False,
    )
    initial = model.milora_init
    save_adapter(model, run_dir / "start", base_model=str(base_path), overwrite=True)
    del model
    trained = run_training(
        base_path,
        conversations,
        run_dir / "train",
        spec,
        config,
        init_dir=run_dir / "start",
        restart=True,
        replay=replay,
    )

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else None  # scoring follows the model's device
    tokenizer = load_tokenizer(base_path)
    base_model = load_base_model(base_path, device=device)
    base = cached_results(
        weights_digest(base_path),
        suites,
        root,
        eval_cache_dir,
        lambda missing: evaluate_model(
            base_model, tokenizer, missing, root, batch_size=batch_size, label="base"
        ),
        batch_size=batch_size,
    )
    points = [_point(0, base, base, suites)]
    taken = snapshots(run_dir / "train", trained.global_step)
    for step, folder in tqdm(taken, desc=f"scoring {run_dir.name}", unit="snapshot"):
        tuned = load_adapter(load_base_model(base_path, device=device), folder)
        tuned.eval()
        results = evaluate_model(tuned, tokenizer, suites, root, batch_size=batch_size, label=f"step {step}")
        points.append(_point(step, base, results, suites))
        logger.info(
            "%s step %d: %s",
            run_dir.name,
            step,
            ", ".join(f"{name} {score:.3f}" for name, score in points[-1].scores.items()),
        )
    record = RunRecord(
        method=spec.method,
        seed=config.seed,
        learning_rate=config.learning_rate,
        rank=spec.r,
        steps=trained.global_step,
        init_seconds=initial.seconds,
        init_cache_hits=initial.cache_hits,
        train_seconds=trained.seconds,
        eval_seconds=time.perf_counter() - started,
        suites={
            name: {
                "metric": result.metric,
                "retention": suites[name].retention,
                "lower_is_better": lower_is_better(result.metric),
                "base": result.score,
            }
            for name, result in base.items()
        },
        points=points,
        key=key,
    )
    record.write(run_dir / RECORD)  # last: marks the run scored
    shutil.rmtree(run_dir / "train" / CHECKPOINTS, ignore_errors=True)
    return record
