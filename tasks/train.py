"""Stage 3, train: the validated dataset's training split -> a trained adapter.

``python -m tasks.train [--params params.yaml] [--dataset DIR] [--run-dir DIR] [--set KEY=VALUE ...]``

Reads the conversations of the ``train`` split of ``validate.dataset_dir`` and trains the
adapter of ``train.init_dir`` (written by ``python -m tasks.init``; without it, the adapter
named by ``train`` in ``params.yaml`` is initialised here) with the hyperparameters of
``train.profile``. The run folder (``train.run_dir``) ends with
``adapter/`` (with its initial factors), ``adapter_for_stock_base/`` (plain LoRA, rank
2r), ``metrics.jsonl``, ``loss_curve.png``, ``train_summary.json`` and ``chain.json``.

When the parent stage (``python -m tasks.parent``, from ``train.start: champion`` or the
flow's ``start``) put a version in ``train.parent_dir``, the run starts from that version (``train.from_champion.strategy``:
``continue`` or ``refold``, :mod:`milora.chain`) with the profile
``train.from_champion.profile``, on what changed since the parent's dataset (new and
superseding records) plus ``earlier_share`` of the still-valid earlier company records, and
the general replay data at the profile's ``replay_share``. Its served adapter is the whole
change since the stock weights (truncated to ``train.serve_rank`` when set).

Training runs in a work folder beside the run folder (``.<name>.work``) that replaces it
only when training finished: a failed or killed run leaves the last trained adapter where it
was, and rerunning resumes the work folder from its last checkpoint (a work folder left by
other data or settings is cleared first). Distributed: the same command under
``torchrun --nproc_per_node=N -m tasks.train`` (same adapter as one process with the same
global batch).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import claim, parse_overrides, run_command

if TYPE_CHECKING:  # the stage imports torch only when it trains
    from milora.chain import ChampionStart
    from milora.config import AdapterSpec

logger = logging.getLogger(__name__)


def train(settings: Settings, dataset_dir: Path | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Train the configured adapter on the dataset's training split; returns the summary."""
    from milora.atomic import mark_output, replace_directory
    from milora.chain import conversation_digest, read_parent, rows_since
    from milora.data.dataset import REPLAY, load_messages, read_manifest
    from milora.layout import (
        CHAIN_RECORD,
        FROM_BASE,
        FROM_VERSION,
        MANIFEST,
        PARENT_RECORD,
        RAW_ADAPTER,
        RUN_KEY,
    )
    from milora.training.loop import finished_run, is_main_process
    from milora.training.run import run_key, run_training

    cfg = settings.train
    dataset = Path(dataset_dir or settings.path(settings.validation.dataset_dir))
    manifest = read_manifest(dataset)  # a clear error if the dataset was never published
    conversations = load_messages(dataset, "train")
    if not conversations:
        raise ValueError(f"{dataset}: the dataset's train split is empty; nothing to train on")
    replay = load_messages(dataset, "train", REPLAY)
    out = claim(settings, run_dir, "train.run_dir")
    init_dir = settings.path(cfg.init_dir)
    # The parent stage decided where this run starts (train.start, or the flow's start) and
    # recorded it: that record, a DVC dependency of this stage, is followed.
    parent_dir = settings.path(cfg.parent_dir)
    parent, start, parent_rows = (
        read_parent(parent_dir, cfg.from_champion.strategy)
        if (parent_dir / PARENT_RECORD).is_file() or cfg.start == FROM_VERSION
        else ({"start": FROM_BASE}, None, set())
    )
    spec, config = cfg.adapter_spec(), cfg.hyperparameters(from_champion=start is not None)
    chain: dict[str, Any] = {"start": FROM_BASE, "replay_share": config.replay_share}
    rows = conversations
    if start is not None:
        _check_continue(start, spec)
        since = rows_since(conversations, parent_rows, cfg.from_champion.earlier_share, config.seed)
        if not since.rows:
            raise ValueError(
                f"{dataset}: nothing new since version {parent['version']}'s data and no earlier row "
                "replayed (train.from_champion.earlier_share is 0): nothing to train on"
            )
        rows = since.rows
        chain.update(
            start=start.strategy,
            parent_version=parent["version"],
            parent_data_version=parent.get("data_version", ""),
            rows_new=len(since.new),
            rows_earlier=len(since.earlier),
            earlier_total=since.earlier_total,
            earlier_share=cfg.from_champion.earlier_share,
        )
    profile = (cfg.from_champion.profile if start is not None else None) or cfg.profile
    logger.info(
        "training %s r=%d (profile %s, from %s) on %d conversations of %s (%d rows in all)",
        cfg.method,
        cfg.rank,
        profile,
        f"version {parent['version']} ({start.strategy})" if start is not None else "the stock base",
        len(rows),
        dataset,
        manifest.get("rows", len(conversations)),
    )
    # The dataset's company rows, not only those trained on: a run from this one trains on
    # what is new since this dataset.
    chain["dataset_rows"] = sorted({conversation_digest(c) for c in conversations})
    base = settings.path(settings.base_model)
    key = run_key(
        base, rows, spec, config, replay, start=start, serve_rank=cfg.serve_rank, image_root=dataset
    )
    published = out / RUN_KEY
    result = finished_run(out) if published.is_file() and json.loads(published.read_text()) == key else None
    if result is not None:
        logger.info(
            "%s already holds this run, trained to step %d: nothing to train", out, result.global_step
        )
    else:
        # Training happens beside the published run folder and replaces it only when it
        # finished: a failed or killed run leaves the last adapter where it was (and a rerun
        # resumes the work folder from its checkpoints).
        work = out.parent / f".{out.name}.work"
        result = run_training(
            base,
            rows,
            work,
            spec,
            config,
            cache_dir=settings.path(cfg.cache_dir) if cfg.cache_dir else None,
            device=cfg.device,
            restart=True,
            init_dir=init_dir if start is None and (init_dir / MANIFEST).is_file() else None,
            replay=replay,
            start=start,
            serve_rank=cfg.serve_rank,
            image_root=dataset,  # image records name their images inside the dataset
        )
        if is_main_process():  # under torchrun, one process publishes
            (work / CHAIN_RECORD).write_text(json.dumps(chain, indent=1, sort_keys=True) + "\n")
            mark_output(work)
            replace_directory(work, out)
    return {
        "run_dir": str(out),
        "adapter_dir": str(out / RAW_ADAPTER),
        "global_step": result.global_step,
        "train_loss": result.train_loss,
        "seconds": result.seconds,
        "examples": result.examples,
        "replay_examples": result.replay_examples,
        "replay_per_batch": result.replay_per_batch,
        "resumed_from": result.resumed_from,
        "already_trained": result.already_trained,
        "served_rank": result.served_rank,
        "compression_error": result.compression_error,
        **{key: value for key, value in chain.items() if key != "dataset_rows"},
    }


def _check_continue(start: ChampionStart, spec: AdapterSpec) -> None:
    """``continue`` trains the champion's own adapter: params.yaml must describe that adapter
    (the registry tags the version with the configured method and rank)."""
    from milora.adapter_io import read_manifest, spec_from_manifest

    if start.strategy != "continue":
        return
    found = spec_from_manifest(read_manifest(start.adapter) or {})
    if (found.method, found.r, tuple(found.target_modules), found.rank_pattern) != (
        spec.method,
        spec.r,
        tuple(spec.target_modules),
        spec.rank_pattern,
    ):
        raise ValueError(
            f"train.from_champion.strategy continue keeps the champion's adapter ({found.method} "
            f"r={found.r}, {list(found.target_modules)}, rank_pattern {dict(found.rank_pattern)}), but "
            f"params.yaml asks for {spec.method} r={spec.r}, {list(spec.target_modules)}, rank_pattern "
            f"{dict(spec.rank_pattern)}: use strategy refold to change the adapter, or start: base"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--dataset", type=Path, help="dataset folder (default: validate.dataset_dir)")
    parser.add_argument("--run-dir", type=Path, help="run folder (default: train.run_dir)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. train.rank=8",
    )
    args = parser.parse_args(argv)
    settings = load_settings(args.params, parse_overrides(args.set, parser))
    summary = train(settings, args.dataset, args.run_dir)
    if summary["already_trained"]:
        print(f"already trained (same data, settings and base): {summary['adapter_dir']}")
        return 0
    print(
        f"trained {summary['global_step']} steps ({summary['examples']} examples, "
        f"loss {summary['train_loss']:.4f}) -> {summary['adapter_dir']}"
    )
    return 0


if __name__ == "__main__":
    run_command(main)
