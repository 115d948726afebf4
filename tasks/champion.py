"""Stage "champion": the current champion scored on the challenger's very items.

``python -m tasks.champion [--params params.yaml]``

The gate must judge challenger and champion on the same items. After the evaluate stage has
scored the challenger, this downloads the champion's served adapter (a plain LoRA for the
stock base) from the registry and scores it on the same suite items (cached per champion and
suite content, as the base's results are), then pairs the two item by item: per suite, the
mean difference and a bootstrap interval (:mod:`milora.promotion`). Results go to
``registry.champion_dir`` (``paired.json``, the champion's ``<suite>.json``, ``summary.md``);
``register`` logs them with the challenger and ``promote`` gates on them. It is a flow step,
not a DVC stage: its input is the registry's champion, which DVC does not track.

With no champion, or one trained on another base model (not comparable: the gate refuses it
unless a person forces it), ``paired.json`` says so and nothing is scored.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.atomic import atomic_directory
from milora.layout import PAIRED, SERVED_ADAPTER
from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import claim, run_command, stage_task
from tasks.register import base_tags, other_base
from tasks.registry import CHAMPION, Registry, retry_on_registry_fault

logger = logging.getLogger(__name__)


def _record(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    with atomic_directory(folder, mark=True) as scratch:
        (scratch / PAIRED).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def compare_champion(settings: Settings) -> dict[str, Any]:
    """Score the champion on the items of ``evaluate.out_dir``; returns ``paired.json``."""
    from milora.evaluation.runner import compare_with_champion

    folder = claim(settings, None, "registry.champion_dir")
    registry, missing = Registry.existing(settings)
    champion = registry.alias(CHAMPION) if registry is not None else None
    if champion is None:
        return _record(folder, {"champion_version": None, "why": missing or "no champion yet"})
    refused = other_base(base_tags(settings), champion, "this run")
    if refused:
        logger.warning("%s: not re-scored (the gate refuses a challenger on another base)", refused)
        return _record(folder, {"champion_version": None, "not_comparable": refused})
    cfg = settings.evaluation
    with tempfile.TemporaryDirectory(prefix="milora-champion-") as scratch:
        adapter = registry.download(champion.run_id, SERVED_ADAPTER, scratch)
        return compare_with_champion(
            settings.path(settings.base_model),
            adapter,
            champion.number,
            settings.path(cfg.out_dir),
            cfg.suites,
            settings.root,
            folder,
            batch_size=cfg.batch_size,
            cache_dir=settings.path(cfg.cache_dir) if cfg.cache_dir else None,
        )


compare_champion_task = stage_task(compare_champion, "champion", retry_on_registry_fault)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.champion", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    record = compare_champion(settings)
    summary = settings.path(settings.registry.champion_dir) / "summary.md"
    print(summary.read_text() if summary.is_file() else json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_command(main)
