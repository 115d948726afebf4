"""Training-step cost of a MiLoRA adapter against plain LoRA on the same model.

MiLoRA's promise is LoRA's training cost: only the initialisation differs. This builds a
LLaMA-shaped model (LLaMA-2-7B with ``--full-size``), wraps it with each method at equal
rank, runs a few AdamW steps on random tokens and reports seconds per step, tokens/s and
peak accelerator memory. The last line printed is one JSON object.

    python benchmarks/train_step.py --device cuda --full-size --cache-dir /tmp/svd-cache
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_shapes import LLAMA2_7B, QUARTER, TARGETS, build_model

from milora import DecompositionCache, init_adapter


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(method: str, args, shape: dict) -> dict:
    model = build_model(**shape, device=args.device, dtype=args.dtype, seed=args.seed)
    cache = DecompositionCache(args.cache_dir) if args.cache_dir else None
    started = time.perf_counter()
    model = init_adapter(model, method=method, r=args.rank, target_modules=TARGETS, cache=cache, seed=0)
    sync(args.device)
    init_seconds = time.perf_counter() - started
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = sorted(times[1:])[len(times[1:]) // 2]  # median after the warm-up step
    result = {
        "method": method,
        "init_seconds": round(init_seconds, 2),
        "trainable_parameters": sum(p.numel() for p in params),
        "step_seconds": round(step, 4),
        "tokens_per_second": round(args.batch * args.seq / step),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.device == "cuda"
        else None,
        "losses": [round(x, 4) for x in losses],
        "losses_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
    }
    del model, optimizer, params
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--repeat", type=int, default=1, help="rounds, alternating which method goes first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shape = dict(LLAMA2_7B if args.full_size else QUARTER)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu" and not args.full_size:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 128)
    runs: dict[str, list[dict]] = {"milora": [], "lora": []}
    for round_ in range(args.repeat):  # alternate the order so neither method always runs first
        order = ("milora", "lora") if round_ % 2 == 0 else ("lora", "milora")
        for method in order:
            runs[method].append(measure(method, args, shape))
    rows = {m: sorted(r, key=lambda row: row["step_seconds"])[len(r) // 2] for m, r in runs.items()}
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "shape": shape,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "rounds": args.repeat,
        "milora": rows["milora"],
        "lora": rows["lora"],
        "step_time_ratio_milora_over_lora": round(
            rows["milora"]["step_seconds"] / rows["lora"]["step_seconds"], 3
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
