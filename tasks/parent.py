"""Step "parent": the model version a run starts from, fetched from the registry.

``python -m tasks.parent [--params params.yaml] [--version N]``

With ``train.start: champion`` a scheduled run builds on the champion instead of starting
from the stock base (:mod:`milora.chain`). This writes ``train.parent_dir``: ``parent.json``
(which version, its run and data version; ``start: base`` when there is none to build on)
and the version's adapters as the registry holds them: ``adapter/`` (trained, with its
initial factors), ``adapter_for_stock_base/`` (served), ``start_weights/`` (what its own
weights started from, when it was itself a run from a champion) and its ``chain.json`` (the
digests of its dataset's company rows: the next run trains on what is new). The train stage
depends on the folder, so ``dvc repro`` retrains exactly when the parent changed; a
rollback moves the champion alias, so the next run starts from the restored version.
``--start`` (or :data:`START_ENV`, set by the flow's ``start`` parameter) overrides
``train.start``; ``--version`` fetches a given version instead (what ``tasks.rebuild`` does
for a version of a chain). It is the DVC stage ``parent``; its input is the registry, which
DVC does not track, so the flow forces it whenever the start is the champion.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.atomic import atomic_directory
from milora.layout import (
    CHAIN_RECORD,
    FROM_BASE,
    FROM_VERSION,
    PARENT_RECORD,
    RAW_ADAPTER,
    SERVED_ADAPTER,
    START_WEIGHTS,
)
from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import claim, run_command
from tasks.register import TRAIN_ARTIFACT_DIR, base_tags, other_base
from tasks.registry import CHAMPION, Registry, RegistryError

logger = logging.getLogger(__name__)

# A run's start chosen by whoever runs the flow (a deployment's ``start`` parameter) rather than
# params.yaml: the flow passes it to this stage's command, and parent.json records what it chose.
START_ENV = "MILORA_TRAIN_START"


def _publish(folder: Path, record: dict[str, Any], fill: Any = None) -> dict[str, Any]:
    # Deterministic content (no times): the train stage's DVC dependency changes only when
    # the parent does.
    with atomic_directory(folder, mark=True) as scratch:
        if fill is not None:
            fill(scratch)
        (scratch / PARENT_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def fetch_parent(settings: Settings, version: str | None = None, start: str | None = None) -> dict[str, Any]:
    """Write ``train.parent_dir`` for the next run; returns ``parent.json``'s content.
    ``start`` overrides ``train.start`` (a deployment's parameter: :data:`START_ENV`)."""
    start = start or settings.train.start
    if start not in (FROM_BASE, FROM_VERSION):
        raise ValueError(f"start {start!r} is not {FROM_BASE!r} or {FROM_VERSION!r}")
    folder = claim(settings, None, "train.parent_dir")
    if start == FROM_BASE and version is None:
        return _publish(folder, {"start": FROM_BASE})
    registry, missing = Registry.existing(settings)
    if version is not None and registry is None:
        raise RegistryError(f"version {version} cannot be fetched: {missing}")
    found = (
        registry.version(version) if version is not None else registry.alias(CHAMPION) if registry else None
    )
    if found is None:
        logger.info(
            "train.start is champion but %s: this run starts from the stock base",
            missing or "no champion yet",
        )
        # No path or time in the record: the same on every machine.
        return _publish(folder, {"start": FROM_BASE, "why": "no champion yet"})
    refused = other_base(base_tags(settings), found, "this run")
    if refused:
        raise RegistryError(f"cannot build on version {found.number}: {refused}")
    record = {
        "start": FROM_VERSION,
        "version": str(found.number),
        "run_id": found.run_id,
        "data_version": found.tags.get("data_version", ""),
    }

    def fill(scratch: Path) -> None:
        for name in (RAW_ADAPTER, SERVED_ADAPTER):
            registry.download(found.run_id, name, scratch)
        if found.tags.get("start_weights_rank"):
            registry.download(found.run_id, START_WEIGHTS, scratch)
        try:
            record_file = registry.download(found.run_id, f"{TRAIN_ARTIFACT_DIR}/{CHAIN_RECORD}", scratch)
        except Exception as error:  # MLflow's own error types for a missing artifact
            raise RegistryError(
                f"version {found.number} has no {TRAIN_ARTIFACT_DIR}/{CHAIN_RECORD} (registered before "
                f"chains were recorded): its dataset's rows are unknown, so a run cannot start from it; "
                f"set train.start: base for one run ({error})"
            ) from None
        if record_file != scratch / CHAIN_RECORD:
            record_file.rename(scratch / CHAIN_RECORD)
        if (scratch / TRAIN_ARTIFACT_DIR).is_dir():
            (scratch / TRAIN_ARTIFACT_DIR).rmdir()

    logger.info("the run starts from %s version %s (run %s)", registry.name, found.number, found.run_id)
    return _publish(folder, record, fill)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.parent", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--version", help="fetch this version instead of the champion")
    parser.add_argument("--start", choices=("base", "champion"), help="instead of train.start")
    args = parser.parse_args(argv)
    start = args.start or os.environ.get(START_ENV) or None
    record = fetch_parent(load_settings(args.params), args.version, start)
    print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_command(main)
