"""Stage 4, evaluate: the trained adapter against its base model on the configured suites.

``python -m tasks.evaluate [--params params.yaml] [--adapter DIR] [--out DIR] [--merged]``

Every suite of ``evaluate.suites`` in ``params.yaml`` is scored on the base model (cached
per base weights and suite, so once per base) and on base + the served adapter (the plain
LoRA of ``adapter_for_stock_base``: what is deployed, a whole chain's change) (or, with
``evaluate.merged``, on the merged weights: the same scores). ``evaluate.out_dir`` is
replaced as a whole when every suite ran: ``<suite>.json`` (score, n, every prediction),
``base/<suite>.json``, ``metrics.json`` (for DVC and MLflow: score, base score,
forgetting per suite), ``comparison.json`` and ``summary.md`` (the table printed here).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.layout import RAW_ADAPTER, SERVED_ADAPTER, adapter_digest
from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import claim, parse_overrides, run_command

logger = logging.getLogger(__name__)


def evaluate(
    settings: Settings, adapter_dir: Path | None = None, out_dir: Path | None = None
) -> dict[str, Any]:
    """Score base and adapter on every configured suite; returns ``metrics.json``'s content."""
    from milora.evaluation.runner import evaluate_adapter

    cfg = settings.evaluation
    run_dir = settings.path(settings.train.run_dir)
    served = run_dir / SERVED_ADAPTER
    # What is served is what is scored: the plain LoRA for the stock base (the whole change of
    # a chain of runs from the champion, truncated to train.serve_rank when set), so
    # forgetting is measured since the stock base.
    adapter = adapter_dir or (served if served.is_dir() else run_dir / RAW_ADAPTER)
    # What was scored, by content: register refuses a run folder whose adapters differ from it.
    identity = (
        {"adapter_digest": adapter_digest(run_dir / RAW_ADAPTER, served)}
        if adapter_dir is None and served.is_dir()
        else {}
    )
    metrics, _ = evaluate_adapter(
        settings.path(settings.base_model),
        adapter,
        cfg.suites,
        settings.root,
        claim(settings, out_dir, "evaluate.out_dir"),
        batch_size=cfg.batch_size,
        cache_dir=settings.path(cfg.cache_dir) if cfg.cache_dir else None,
        merged=cfg.merged,
        info=identity,
    )
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument(
        "--adapter", type=Path, help="adapter folder (default: <train.run_dir>/adapter_for_stock_base)"
    )
    parser.add_argument("--out", type=Path, help="results folder (default: evaluate.out_dir)")
    parser.add_argument("--merged", action="store_true", help="evaluate merged weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set, parser)
    if args.merged:
        overrides["evaluate.merged"] = True
    settings = load_settings(args.params, overrides)
    evaluate(settings, args.adapter, args.out)
    out = args.out or settings.path(settings.evaluation.out_dir)
    print((Path(out) / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    run_command(main)
