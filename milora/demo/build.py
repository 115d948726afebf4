"""Build the whole demo world: ``python -m milora.demo.build --out data/demo``.

Steps, all seeded and offline: world corpus + probes, company drops, tokenizer,
pretraining of the base model on the world corpus, and a quick probe check.
``--skip-model`` regenerates only the data files (seconds, byte-identical).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from milora.demo import DEFAULT_SEED
from milora.demo.company import DROPS, write_company
from milora.demo.files import read_json, read_jsonl, read_lines
from milora.demo.world import write_world

log = logging.getLogger("milora.demo.build")

WORLD_DIR, COMPANY_DIR, MODEL_DIR = "world", "company", "base_model"


def tokenizer_texts(out: Path) -> list[str]:
    """Everything the tokenizer may see: world corpus and company *training* text."""
    texts = read_lines(out / WORLD_DIR / "corpus.txt")
    texts.append(read_json(out / COMPANY_DIR / "company.json")["system_prompt"])
    for drop in DROPS:
        for record in read_jsonl(out / COMPANY_DIR / drop / "train_alpaca.jsonl"):
            texts += [record["instruction"], record["input"], record["output"]]
    return [t for t in texts if t]


def build_model(out: Path, seed: int, steps: int | None) -> dict[str, object]:
    """Train the tokenizer and the base model, save them, and score the world probes."""
    import torch

    from milora.demo.pretrain import PretrainConfig, pretrain, save_model
    from milora.demo.probes import score_questions
    from milora.demo.tokenizer import train_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = train_tokenizer(tokenizer_texts(out))
    log.info("tokenizer trained: %d tokens", len(tokenizer))
    cfg = PretrainConfig(seed=seed)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    model, stats = pretrain(tokenizer, read_lines(out / WORLD_DIR / "corpus.txt"), cfg)
    save_model(model, tokenizer, out / MODEL_DIR, cfg, stats)
    model.float()
    probes = read_jsonl(out / WORLD_DIR / "probes.jsonl")
    score = score_questions(model, tokenizer, probes, style="plain", mode="start")
    log.info("world probe accuracy %.3f (%d/%d)", score.accuracy, score.correct, score.total)
    return {**stats, "world_probe_accuracy": round(score.accuracy, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for everything")
    parser.add_argument("--skip-model", action="store_true", help="only regenerate data files")
    parser.add_argument("--steps", type=int, default=None, help="override pretraining steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    started = time.perf_counter()
    out: Path = args.out
    summary: dict[str, object] = {"out": str(out), "seed": args.seed}
    summary["world"] = write_world(out / WORLD_DIR, args.seed)
    summary["company"] = write_company(out / COMPANY_DIR, args.seed)
    log.info("data written under %s", out)
    if not args.skip_model:
        summary["model"] = build_model(out, args.seed, args.steps)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
