"""Build the whole demo world: ``python -m milora.demo.build --out data/demo``.

Steps, all seeded and offline: world corpus + probes, general chat data (decoy
shops, world questions), company drops, tokenizer, pretraining of the base model
on the world corpus and the chat data, and a quick probe check.
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
from milora.demo.files import read_jsonl, read_lines
from milora.demo.instructions import write_instructions
from milora.demo.timeline import write_year
from milora.demo.world import write_world

log = logging.getLogger("milora.demo.build")

WORLD_DIR, MODEL_DIR = "world", "base_model"
INSTRUCTIONS = "instructions.jsonl"


def pretraining_data(out: Path) -> tuple[list[str], list[list[dict[str, str]]]]:
    """What the base model (and its tokenizer) may see: world corpus lines and chats.

    Never the company drops: the tokenizer, like a production one, was trained before
    the company's data existed, so its names split into pieces pretraining has seen.
    """
    lines = read_lines(out / WORLD_DIR / "corpus.txt")
    chats = [record["messages"] for record in read_jsonl(out / WORLD_DIR / INSTRUCTIONS)]
    return lines, chats


def build_model(out: Path, seed: int, steps: int | None) -> dict[str, object]:
    """Train the tokenizer and the base model, save them, and score the world probes."""
    import torch

    from milora.demo.pretrain import PretrainConfig, pretrain, save_model
    from milora.demo.probes import score_questions
    from milora.demo.tokenizer import train_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lines, chats = pretraining_data(out)
    tokenizer = train_tokenizer(lines + [m["content"] for chat in chats for m in chat])
    log.info("tokenizer trained: %d tokens", len(tokenizer))
    cfg = PretrainConfig(seed=seed)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    model, stats = pretrain(tokenizer, lines, cfg, chats)
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
    summary["world"]["chats"] = write_instructions(out / WORLD_DIR / INSTRUCTIONS, args.seed)
    summary["company"] = write_year(out, args.seed)
    log.info("data written under %s", out)
    if not args.skip_model:
        summary["model"] = build_model(out, args.seed, args.steps)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
