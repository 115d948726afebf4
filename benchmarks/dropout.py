"""LoRA dropout's forward and backward on a CPU: the gap-drawn dropout against torch's.

Inputs of the demo model's LoRA layers (a packed micro-batch of ~1,400 tokens, hidden 128 and
intermediate 344), and for scale the same tokens at LLaMA-7B's hidden size; p = 0.05. The
two alternate round by round; medians of the rounds.

    python benchmarks/dropout.py [--rounds 15] [--tokens 1400]

The last line printed is one JSON object: per shape, both times (microseconds) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from milora.training.dropout import GapDropout


def seconds_per_pass(layer: torch.nn.Module, inputs: torch.Tensor, grad: torch.Tensor, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        layer(inputs).backward(grad)
    return (time.perf_counter() - started) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=20, help="passes per timing")
    parser.add_argument("--tokens", type=int, default=1400)
    parser.add_argument("--p", type=float, default=0.05)
    args = parser.parse_args()
    layers = {"torch": torch.nn.Dropout(args.p).train(), "gap": GapDropout(args.p).train()}
    result = {}
    for width in (128, 344, 4096):
        inputs = torch.randn(1, args.tokens, width, requires_grad=True)
        grad = torch.randn(1, args.tokens, width)
        times: dict[str, list[float]] = {name: [] for name in layers}
        for layer in layers.values():  # warm-up
            seconds_per_pass(layer, inputs, grad, 2)
        for _ in range(args.rounds):
            for name, layer in layers.items():
                times[name].append(seconds_per_pass(layer, inputs, grad, args.repeat))
        torch_us, gap_us = (statistics.median(times[n]) * 1e6 for n in ("torch", "gap"))
        result[f"{args.tokens}x{width}"] = {
            "torch_us": round(torch_us),
            "gap_us": round(gap_us),
            "speedup": round(torch_us / gap_us, 2),
        }
        print(
            f"{args.tokens} x {width}: torch {torch_us:.0f} us, gap {gap_us:.0f} us, {torch_us / gap_us:.2f}x"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
