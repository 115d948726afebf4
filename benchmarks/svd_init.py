"""MiLoRA initialisation speed and accuracy against the official float32 SVD.

The official MiLoRA code and PEFT's PiSSA run ``torch.linalg.svd`` in float32 on every
target matrix. This times, in one run and on the same weights, ``milora.init_adapter``
with that reference solver and with the project's default (float64 Gram + subset
eigensolver, cache on), then a second, cached init; and measures the worst principal-angle
sine of the adapter subspaces against a float64 SVD.

    python benchmarks/svd_init.py                          # quarter LLaMA-7B shapes, CPU
    python benchmarks/svd_init.py --device cuda --full-size  # LLaMA-2-7B shapes, GPU

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_shapes import LLAMA2_7B, QUARTER, TARGETS, build_model

from milora import DecompositionCache, decompose, init_adapter
from milora.initialize import lora_layers

logger = logging.getLogger("benchmarks.svd_init")


def layer_pattern(layers: int) -> str:
    """Targets restricted to the first ``layers`` layers (PEFT regex rule)."""
    ids = "|".join(str(i) for i in range(layers))
    return rf"model\.layers\.({ids})\.(self_attn|mlp)\.({'|'.join(TARGETS)})"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_init(shape: dict, args, targets, **kwargs):
    model = build_model(**shape, device=args.device, dtype=args.dtype, seed=args.seed)
    sync(args.device)
    started = time.perf_counter()
    peft_model = init_adapter(model, method="milora", r=args.rank, target_modules=targets, **kwargs)
    sync(args.device)
    return peft_model, time.perf_counter() - started


def max_sine(basis: torch.Tensor, reference: torch.Tensor) -> float:
    Q, _ = torch.linalg.qr(basis.double())
    return torch.linalg.svdvals(Q - reference @ (reference.T @ Q)).max().item()


def worst_sines(shape: dict, args, models: dict, sample: list[str]) -> dict[str, float]:
    """Per solver, the worst sine over sampled layers (A rows vs V, B columns vs U)."""
    stock = build_model(**shape, device=args.device, dtype=args.dtype, seed=args.seed)
    modules = dict(stock.named_modules())
    worst = dict.fromkeys(models, 0.0)
    for name in sample:
        W = modules[name].weight.detach().double()
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        U_m, V_m = U[:, -args.rank :], Vh[-args.rank :].T
        for label, model in models.items():
            layer = lora_layers(model)[name]
            A = layer.lora_A["default"].weight.detach().to(W.device)
            B = layer.lora_B["default"].weight.detach().to(W.device)
            worst[label] = max(worst[label], max_sine(A.T, V_m), max_sine(B, U_m))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full-size", action="store_true", help="LLaMA-2-7B shapes (160 matrices)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference-layers",
        type=int,
        default=None,
        help="time the reference on this many layers and project",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="keep the decomposition cache here (default: temporary)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the median is reported")
    parser.add_argument(
        "--accuracy-sample", type=int, default=None, help="matrices checked against float64 SVD"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shape = dict(LLAMA2_7B if args.full_size else QUARTER)
    args.dtype = torch.bfloat16 if args.full_size else torch.float32
    n_layers = shape["layers"]
    ref_layers = args.reference_layers or (1 if args.full_size else n_layers)
    n_matrices = n_layers * len(TARGETS)

    # The reference is timed on the first ``ref_layers`` layers (all of them by default on
    # the CPU) and scaled to the full model: each layer holds the same five shapes. Both
    # solvers are warmed up first, and with --repeat N the median of N alternating runs
    # is reported (on a shared CPU single runs vary by 20% or more).
    ref_shape = {**shape, "layers": ref_layers}
    warm = torch.randn(64, 48, device=args.device)
    for solver in ("svd32", "gram"):
        decompose(warm, 4, "minor", solver)
    ref_times, ours_times, cached_times = [], [], []
    for _ in range(args.repeat):
        ref_model, seconds = timed_init(ref_shape, args, TARGETS, solver="svd32", progress=False)
        ref_times.append(seconds)
        print(f"reference float32 SVD: {seconds:.2f} s on {ref_layers * len(TARGETS)} matrices", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cache_dir = args.cache_dir or tmp
            ours, seconds = timed_init(shape, args, TARGETS, cache=DecompositionCache(cache_dir))
            ours_times.append(seconds)
            print(f"project init (cold cache): {seconds:.2f} s on {n_matrices} matrices", flush=True)
            cached, seconds = timed_init(shape, args, TARGETS, cache=DecompositionCache(cache_dir))
            assert cached.milora_init.cache_hits == n_matrices
            cached_times.append(seconds)
            del cached
            print(f"project init (cached): {seconds:.3f} s", flush=True)
    ref_seconds, ours_seconds, cached_seconds = map(statistics.median, (ref_times, ours_times, cached_times))
    projected = ref_seconds * n_layers / ref_layers
    # Accuracy on the shapes of the first layers (all matrices unless --accuracy-sample).
    names = list(lora_layers(ref_model))
    sample = names[: args.accuracy_sample] if args.accuracy_sample else names
    sines = worst_sines(ref_shape, args, {"reference": ref_model, "ours": ours}, sample)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shapes": f"{n_layers} layers x (3 x {shape['hidden']}^2, {shape['intermediate']}x{shape['hidden']}, "
        f"{shape['hidden']}x{shape['intermediate']})",
        "dtype": str(args.dtype).removeprefix("torch."),
        "matrices": n_matrices,
        "rank": args.rank,
        "reference_seconds": round(projected, 3),
        "reference_projected_from_layers": ref_layers if ref_layers != n_layers else None,
        "ours_seconds": round(ours_seconds, 3),
        "speedup": round(projected / ours_seconds, 2),
        "cached_seconds": round(cached_seconds, 4),
        "cached_speedup": round(projected / cached_seconds, 1),
        "ours_max_sine": float(f"{sines['ours']:.3g}"),
        "reference_max_sine": float(f"{sines['reference']:.3g}"),
        "sine_checked_matrices": len(sample),
        "repeats": args.repeat,
    }
    print(
        f"speedup {result['speedup']}x, cached {result['cached_speedup']}x; worst sine ours "
        f"{result['ours_max_sine']:.2e} vs reference {result['reference_max_sine']:.2e}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
