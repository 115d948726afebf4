"""Evaluation throughput: batched greedy generation against one prompt at a time.

Both ask the same items (the demo's world probes and company questions by default) with
the same greedy decoding, KV cache and max new tokens through
:func:`milora.evaluation.generation.greedy_generate`; the batched run left-pads
``--batch-size`` prompts per forward pass. The outputs are compared too: batching must not
change what the model answers.

    python benchmarks/eval_throughput.py [--model data/demo/base_model] [--items 160] [--batch-size 32]

The last line printed is one JSON object: items/s both ways, the speed-up and the share of
identical answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402

from milora.evaluation.datasets import read_items  # noqa: E402
from milora.evaluation.generation import greedy_generate  # noqa: E402
from milora.evaluation.suites import render_prompts  # noqa: E402
from milora.modeling import load_base_model, load_tokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "data/demo/base_model")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[
            REPO / "data/demo/world/probes.jsonl",
            *sorted(REPO.glob("data/demo/company/drop_*/heldout.jsonl")),
        ],
        help="JSONL/JSON files of {question, answer} items",
    )
    parser.add_argument("--items", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_base_model(args.model).eval()
    items = [item for path in args.data for item in read_items(path, ("question",))]
    items = (items * (1 + args.items // max(len(items), 1)))[: args.items]
    prompts = render_prompts(tokenizer, items, "chat", "question")
    greedy_generate(model, tokenizer, prompts[:4], max_new_tokens=4, batch_size=4)  # warm-up

    def timed(batch_size: int) -> tuple[float, list[str]]:
        started = time.perf_counter()
        out = greedy_generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=batch_size,
            first_line=False,
        )
        return time.perf_counter() - started, out

    one_s, one = timed(1)
    batched_s, batched = timed(args.batch_size)
    same = sum(a == b for a, b in zip(one, batched, strict=True)) / len(prompts)
    result = {
        "items": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time_items_per_s": round(len(prompts) / one_s, 2),
        "batched_items_per_s": round(len(prompts) / batched_s, 2),
        "speedup": round(one_s / batched_s, 2),
        "identical_answers": round(same, 4),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    print(
        f"one at a time: {one_s:.1f} s, batched x{args.batch_size}: {batched_s:.1f} s "
        f"({result['speedup']}x), identical answers {same:.1%}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
