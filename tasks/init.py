"""Stage 3, SVD init: the base model's adapter at step 0, before any training.

``python -m tasks.init [--params params.yaml] [--out DIR] [--set KEY=VALUE ...]``

Wraps the base model named by ``base_model`` with the adapter of ``train`` (method, rank,
alpha, targets, dropout, solver) and writes it to ``train.init_dir``: the PEFT adapter, its
initial factors and ``milora.json``. The decomposition runs on the GPU when there is one
(``train.device``) and is served from ``train.cache_dir`` when this base was decomposed
before, so a second init of the same base decomposes nothing. The train stage starts from
this folder (no SVD of its own).

The target weights are read one matrix at a time from the checkpoint's safetensors shards
(``milora.streaming``), so a base larger than RAM initialises; and under
``torchrun --nproc_per_node N -m tasks.init`` each process decomposes its share of the
matrices (``milora.sharding``) and rank 0 writes the folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import claim, parse_overrides, run_command

logger = logging.getLogger(__name__)


def init(settings: Settings, out_dir: Path | None = None) -> dict[str, Any]:
    """Initialise and save the configured adapter; returns where, how and how long it took.

    Streamed from the checkpoint's safetensors shards (one matrix at a time, never the whole
    model) whenever the method and the checkpoint allow it, else on the loaded model; the
    adapters are the same bit for bit. Under ``torchrun`` each rank decomposes its share.
    """
    from milora.cache import DecompositionCache
    from milora.streaming import init_to_folder

    cfg = settings.train
    out = claim(settings, out_dir, "train.init_dir")
    started = time.perf_counter()
    _, streamed = init_to_folder(
        settings.path(settings.base_model),
        cfg.adapter_spec(),
        out,
        cache=DecompositionCache(settings.path(cfg.cache_dir)) if cfg.cache_dir else None,
        device=cfg.device,
        seed=cfg.hyperparameters().seed,
        base_model=str(settings.base_model),
        mark_output=True,
    )
    seconds = time.perf_counter() - started
    logger.info("%s r=%d initialised in %.1f s -> %s", cfg.method, cfg.rank, seconds, out)
    return {
        "init_dir": str(out),
        "seconds": seconds,
        "method": cfg.method,
        "rank": cfg.rank,
        "streamed": streamed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.init", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--out", type=Path, help="adapter folder (default: train.init_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    report = init(load_settings(args.params, parse_overrides(args.set, parser)), args.out)
    if int(os.environ.get("RANK", "0")):
        return 0  # under torchrun: rank 0 reports
    print(
        f"{report['method']} r={report['rank']} initialised in {report['seconds']:.1f} s -> {report['init_dir']}"
    )
    return 0


if __name__ == "__main__":
    run_command(main)
