"""Names of what a training run folder holds, defined once for the library and the pipeline.

A run folder (``train.run_dir``) holds::

    init/                    the adapter at step 0 (initial factors included): resume starts here
    checkpoints/             Trainer checkpoints while training (removed after success)
    adapter/                 the trained MiLoRA adapter; it needs the residual base to load
    adapter_for_stock_base/  the same change as one plain LoRA for the unmodified base: served
    start_weights/           run from the champion: the plain LoRA its weights started from
    chain.json               parent, strategy, rows since the parent, the dataset's row digests
    metrics.jsonl            per-step training metrics
    loss.csv                 step, loss, learning rate (what ``dvc plots`` draws)
    train_summary.json       written last: its presence marks the run finished
    run_key.json             the data, settings and base the folder was started with

and an adapter folder (PEFT's format plus ours)::

    adapter_config.json, adapter_model.safetensors   PEFT's adapter
    initial/                 the initial factors A0, B0 (same names): rebuild W_res, convert
    milora.json              the manifest: method, rank, scale, versions, timings
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from milora.digests import digest_files

INITIAL_ADAPTER = "init"
CHECKPOINTS = "checkpoints"
RAW_ADAPTER = "adapter"
SERVED_ADAPTER = "adapter_for_stock_base"
METRICS = "metrics.jsonl"
LOSS_TABLE = "loss.csv"
LOSS_PLOT = "loss_curve.png"
SUMMARY = "train_summary.json"
ADAPTER_HASHES = "adapter_files.json"  # sha256 of every adapter file, written just before SUMMARY
RUN_KEY = "run_key.json"
# A run's place in a chain (milora.chain): the plain LoRA for the stock base folded into the
# weights before it started (none for a run from the stock base), and its record: parent
# version, strategy, rows new since the parent and replayed, and the digests of the company
# conversations its dataset held (a run from it trains on what is new).
START_WEIGHTS = "start_weights"
CHAIN_RECORD = "chain.json"
# A run's parent folder (train.parent_dir, written by tasks.parent): parent.json says whether
# the run starts from the stock base or from a registered version whose adapters lie beside it.
PARENT_RECORD = "parent.json"
FROM_BASE, FROM_VERSION = "base", "champion"

# The champion re-scored on a challenger's items (registry.champion_dir): per-suite pairs.
PAIRED = "paired.json"

# Inside an adapter folder.
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
INITIAL_DIR = "initial"
MANIFEST = "milora.json"


def adapter_digest(*folders: str | os.PathLike[str]) -> str:
    """The content identity of adapter folders: sha256 over every weights file and adapter
    config (relative name and bytes), in order. Two trainings that produced the same adapters
    have the same digest; the manifest (timings) and model card do not count."""
    named: list[tuple[bytes, Path]] = []
    for folder in map(Path, folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name in (WEIGHTS, CONFIG))
        if not files:
            raise FileNotFoundError(f"{folder}: no {WEIGHTS} or {CONFIG} to identify an adapter by")
        named += [(f"{folder.name}/{p.relative_to(folder).as_posix()}\0".encode(), p) for p in files]
    return digest_files(hashlib.sha256(), named)
