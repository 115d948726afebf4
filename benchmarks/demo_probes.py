"""Probe the demo model: does it know the world, and (not yet) the company?

Usage (from the repository root)::

    python benchmarks/demo_probes.py [--model data/demo/base_model] [--data data/demo]

World probes are asked in the pretraining corpus's plain ``Question: ... Answer:``
form and scored with the "answer at start" rule; company held-out questions
are asked in the same plain form by default (the strongest way to elicit an
answer from a base model) or with ``--company-prompt chat`` for a chat-tuned
model, and scored with the "answer contained" rule. Both rules are defined in
:mod:`milora.demo.probes`. Greedy decoding, batched with left padding.

The last line printed is one JSON object:
``{"world_probe_accuracy", "company_accuracy", "n_world", "n_company", "parameters", "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from milora.demo.company import DROPS  # noqa: E402
from milora.demo.files import read_json, read_jsonl  # noqa: E402
from milora.demo.probes import Score, score_questions  # noqa: E402


def _by(score: Score, key: str) -> str:
    """``name correct/total`` per value of ``key``, for the summary."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item in score.items:
        counts[item[key]][0] += int(item["correct"])
        counts[item[key]][1] += 1
    return ", ".join(f"{name} {ok}/{n}" for name, (ok, n) in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe a demo model on world and company questions.")
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "data/demo/base_model")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data/demo")
    parser.add_argument("--company-prompt", choices=("plain", "chat"), default="plain")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--show-errors", type=int, default=5, help="wrong answers to print per set")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())

    probes = read_jsonl(args.data / "world" / "probes.jsonl")
    world = score_questions(
        model, tokenizer, probes, style="plain", mode="start", max_new_tokens=12,
        batch_size=args.batch_size,
    )  # fmt: skip
    company_info = read_json(args.data / "company" / "company.json")
    questions = [q for drop in DROPS for q in read_jsonl(args.data / "company" / drop / "heldout.jsonl")]
    company = score_questions(
        model, tokenizer, questions, style=args.company_prompt, mode="contains",
        system=company_info["system_prompt"], max_new_tokens=32, batch_size=args.batch_size,
    )  # fmt: skip
    seconds = time.perf_counter() - started

    print(f"model: {args.model} ({parameters:,} parameters)")
    print(f"world probes:   {world.correct}/{world.total} = {world.accuracy:.1%}  [{_by(world, 'relation')}]")
    print(
        f"company ({args.company_prompt}): {company.correct}/{company.total} = "
        f"{company.accuracy:.1%}  [{_by(company, 'drop')}]"
    )
    for name, score in (("world", world), ("company", company)):
        wrong = [i for i in score.items if not i["correct"]][: args.show_errors]
        for item in wrong:
            print(f"  {name} miss: {item['question']!r} -> {item['prediction']!r} (want {item['answer']!r})")
    print(f"seconds: {seconds:.1f}")
    result = {
        "world_probe_accuracy": round(world.accuracy, 4),
        "company_accuracy": round(company.accuracy, 4),
        "n_world": world.total,
        "n_company": company.total,
        "parameters": parameters,
        "seconds": round(seconds, 2),
    }
    print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
