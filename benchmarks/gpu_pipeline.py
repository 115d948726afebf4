"""The pipeline's stages end to end on a LLaMA-2-7B-shaped bfloat16 checkpoint (random weights).

What a platform team asks before adopting the project on its GPUs: does every stage run at
7B scale, how long does each take, how much memory, and how close to the hardware is the
training. Run by ``benchmarks/gpu_check.sh`` on a lent GPU; ``--shape quarter --device cpu``
is the same path small enough for a CPU (a smoke run, not a measurement).

Stages, each timed, with the process's peak resident memory and the GPU's peak allocation:

1. build: the model with trained-looking spectra (``llama_shapes.build_model``), saved as
   sharded safetensors with the demo base's tokenizer;
2. init: ``milora.streaming.init_streamed`` on the device, never loading the model;
3. train: ``milora.training.run_training`` from that init, the base in bfloat16, bf16
   autocast, gradient checkpointing, ``--steps`` optimiser steps on the demo company's chat
   rows; useful (non-padding) tokens/s from the Trainer's own count;
4. evaluate: perplexity of held-out demo text on the base and on base + adapter;
5. convert: ``milora.conversion.verify_adapter`` (adapter vs plain LoRA on the stock base vs
   merged weights, float32 on the device).

Model FLOPs utilisation of the training: ``4 N tokens/s / peak`` (a frozen base: forward 2N
and input gradients 2N per token; the recomputation of gradient checkpointing and attention
are not counted, as MFU conventionally does not); peak from ``--peak-tflops`` (989 for the
H100/H200 SXM's dense bfloat16). The last line printed is one JSON object.

    python benchmarks/gpu_pipeline.py [--shape 7b] [--device cuda] [--steps 20] [--work /tmp/gpu-pipeline]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402
from llama_shapes import LLAMA2_7B, QUARTER, build_model  # noqa: E402

from milora import AdapterSpec, DecompositionCache, load_adapter  # noqa: E402
from milora.conversion import verify_adapter  # noqa: E402
from milora.evaluation.generation import perplexity  # noqa: E402
from milora.modeling import load_base_model, load_tokenizer  # noqa: E402
from milora.streaming import init_streamed  # noqa: E402
from milora.training import TrainConfig, run_training  # noqa: E402
from milora.training.run import read_conversations  # noqa: E402

SHAPES = {"7b": LLAMA2_7B, "quarter": QUARTER}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DEMO = REPO / "data" / "demo"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


@contextlib.contextmanager
def stage(report: dict, name: str, device: str) -> Iterator[None]:
    """Time one stage and record its peaks under ``report[name]``."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    yield
    if device == "cuda":
        torch.cuda.synchronize()
    report[name] = {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "peak_gpu_gib": None if device != "cuda" else round(peak_gpu_gib(device), 2),
        **report.get(name, {}),
    }
    logging.info("%s: %s", name, report[name])


def fsdp_check(args) -> int:
    """The training entry point under the launcher's engine: which engine ran, did it finish."""
    from accelerate import PartialState

    run_dir = args.work / "fsdp-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    conversations = read_conversations(DEMO / "company" / "drop_2026_10" / "train_chat.jsonl")
    config = TrainConfig(
        learning_rate=2e-3, max_steps=3, batch_size=4, micro_batch_size=4, warmup_steps=1,
        max_length=128, save_steps=10_000, logging_steps=1, bf16=args.device == "cuda",
    )  # fmt: skip
    result = run_training(DEMO / "base_model", conversations, run_dir, AdapterSpec("milora", 4), config)
    state = PartialState()
    report = {
        "engine": str(state.distributed_type),
        "processes": state.num_processes,
        "steps": result.global_step,
        "loss": round(result.train_loss, 4),
        "adapter_written": (run_dir / "adapter" / "adapter_model.safetensors").is_file(),
    }
    if state.is_main_process:
        print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_pipeline.py", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-pipeline"))
    parser.add_argument(
        "--fsdp-check",
        action="store_true",
        help="only train the demo base for 3 steps (run it under `accelerate launch --config_file "
        "configs/accelerate/fsdp.yaml`) and report the engine the Trainer used",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.fsdp_check:
        return fsdp_check(args)
    shutil.rmtree(args.work, ignore_errors=True)
    base, init_dir, run_dir = args.work / "base", args.work / "init", args.work / "run"
    report: dict = {"shape": args.shape, "device": args.device}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    spec = AdapterSpec("milora", args.rank)

    with stage(report, "build", args.device):
        model = build_model(**SHAPES[args.shape], device=args.device, dtype=torch.bfloat16)
        tokenizer = load_tokenizer(DEMO / "base_model")
        if model.config.vocab_size < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        report["parameters"] = model.num_parameters()
        model.save_pretrained(base, safe_serialization=True, max_shard_size="2GB")
        for name in TOKENIZER_FILES:
            shutil.copy(DEMO / "base_model" / name, base / name)
        del model
    report["build"]["checkpoint_gib"] = round(
        sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**30, 2
    )

    with stage(report, "init", args.device):
        state = init_streamed(
            base, spec, init_dir, cache=DecompositionCache(args.work / "svd-cache"), device=args.device
        )
    report["init"]["matrices"] = len(state.factors)

    conversations = read_conversations(DEMO / "company" / "drop_2026_10" / "train_chat.jsonl")
    config = TrainConfig(
        learning_rate=2e-4,
        max_steps=args.steps,
        batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        warmup_steps=2,
        max_length=args.max_length,
        save_steps=10_000,
        logging_steps=5,
        bf16=args.device == "cuda",
        gradient_checkpointing=True,
    )
    with stage(report, "train", args.device):
        result = run_training(
            base,
            conversations,
            run_dir,
            spec,
            config,
            init_dir=init_dir,
            dtype="bfloat16",
            device=args.device,
        )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    tokens = max(m.get("num_input_tokens_seen", 0) for m in metrics)
    tokens_per_s = tokens / result.seconds
    report["train"].update(
        steps=result.global_step,
        trainer_seconds=round(result.seconds, 2),
        useful_tokens=int(tokens),
        useful_tokens_per_s=round(tokens_per_s, 1),
        final_loss=round(result.train_loss, 4),
        mfu=round(4 * report["parameters"] * tokens_per_s / (args.peak_tflops * 1e12), 4),
    )

    held_out = [
        f"{json.loads(line)['question']} {json.loads(line)['answer']}"
        for line in (DEMO / "company" / "drop_2026_10" / "heldout.jsonl").read_text().splitlines()[:32]
    ]
    with stage(report, "evaluate", args.device):
        tokenizer = load_tokenizer(base)
        model = load_base_model(base, dtype="bfloat16", device=args.device)
        before = perplexity(model, tokenizer, held_out)
        after = perplexity(load_adapter(model, run_dir / "adapter"), tokenizer, held_out)
        del model
    report["evaluate"].update(perplexity_base=round(before, 2), perplexity_adapter=round(after, 2))

    with stage(report, "convert", args.device):
        ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0)).to(args.device)
        differences = verify_adapter(
            lambda: load_base_model(base, dtype="float32", device=args.device), run_dir / "adapter", ids
        )
    report["convert"]["max_relative_logit_difference"] = {
        k: float(f"{v:.2e}") for k, v in differences.items()
    }

    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
