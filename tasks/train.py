"""Stage 3, train: the validated dataset's training split -> a trained adapter.

``python -m tasks.train [--params params.yaml] [--dataset DIR] [--run-dir DIR] [--set KEY=VALUE ...]``

Reads the conversations of the ``train`` split of ``validate.dataset_dir`` and trains the
adapter of ``train.init_dir`` (written by ``python -m tasks.init``; without it, the adapter
named by ``train`` in ``params.yaml`` is initialised here) with the hyperparameters of
``train.profile``. The run folder (``train.run_dir``) ends with
``adapter/`` (with its initial factors), ``adapter_for_stock_base/`` (plain LoRA, rank
2r), ``metrics.jsonl``, ``loss_curve.png`` and ``train_summary.json``.

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
from typing import Any

from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import claim, parse_overrides, run_command

logger = logging.getLogger(__name__)


def train(settings: Settings, dataset_dir: Path | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Train the configured adapter on the dataset's training split; returns the summary."""
    from milora.atomic import mark_output, replace_directory
    from milora.data.dataset import REPLAY, load_messages, read_manifest
    from milora.layout import MANIFEST, RAW_ADAPTER, RUN_KEY
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
    logger.info(
        "training %s r=%d (profile %s) on %d conversations of %s (%d rows in all)",
        cfg.method,
        cfg.rank,
        cfg.profile,
        len(conversations),
        dataset,
        manifest.get("rows", len(conversations)),
    )
    base, spec, config = settings.path(settings.base_model), cfg.adapter_spec(), cfg.hyperparameters()
    key = run_key(base, conversations, spec, config, replay)
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
            conversations,
            work,
            spec,
            config,
            cache_dir=settings.path(cfg.cache_dir) if cfg.cache_dir else None,
            device=cfg.device,
            restart=True,
            init_dir=init_dir if (init_dir / MANIFEST).is_file() else None,
            replay=replay,
        )
        if is_main_process():  # under torchrun, one process publishes
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
    }


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
