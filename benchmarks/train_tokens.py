"""Useful (non-padding) training tokens per second: the project's loop against plain PEFT + Trainer.

The baseline is what most fine-tuning scripts do: ``peft.get_peft_model`` with a default
``LoraConfig``, Hugging Face's ``Trainer`` with its random sampler, and a collator that
pads each micro-batch to its longest sequence. The project's loop (``train_adapter``)
packs each micro-batch into one row without padding (:mod:`milora.training.packing`:
attention within each sequence, logits only where a token is trained; ``--no-packing``:
padded micro-batches of similar length, :class:`milora.training.loop.LengthGroupedSampler`),
and on a CPU its LoRA dropout draws the gaps between drops instead of one number per element
(:mod:`milora.training.dropout`, same distribution; ``--no-gap-dropout``: torch's dropout).
Both train the same rank, targets, examples, micro-batch, global batch and number of steps
on the same base model; the SVD initialisation is not timed (it happens once, before
training). After a discarded warm-up pair, runs alternate and the median is reported.

It also checks that packing changes nothing but speed: the loss per trained token of one
global batch (micro-batches summed as the Trainer does, ``num_items_in_batch``), packed and
padded, on the same initialised model without dropout.

    python benchmarks/train_tokens.py [--model data/demo/base_model] [--steps 60] [--repeat 3]

The last line printed is one JSON object with both rates, their ratio, the padding shares
and both losses per token; the exit status is 1 when those differ by more than 1e-3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments  # noqa: E402

from milora import DecompositionCache, init_adapter  # noqa: E402
from milora.config import DEFAULT_TARGETS  # noqa: E402
from milora.data.dataset import load_messages  # noqa: E402
from milora.modeling import load_base_model, load_tokenizer  # noqa: E402
from milora.training.config import TrainConfig  # noqa: E402
from milora.training.examples import encode  # noqa: E402
from milora.training.loop import CHECKPOINTING_ARGUMENT, LengthGroupedSampler, train_adapter  # noqa: E402
from milora.training.packing import (  # noqa: E402
    PackingCollator,
    packed_attention,
    padding_collator,
    trained_logits_only,
)
from milora.training.run import read_conversations  # noqa: E402


class CountingCollator(DataCollatorForSeq2Seq):
    """Pads to the longest sequence of the micro-batch and counts real and padded tokens."""

    useful = 0
    total = 0

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        self.useful += int(batch["attention_mask"].sum())
        self.total += batch["attention_mask"].numel()
        return batch


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """The GPU's peak allocation since :func:`reset_peak` (None on a CPU)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def conversations(data: list[Path]) -> list:
    out = []
    for path in data:
        out.extend(load_messages(path) if path.is_dir() else read_conversations(path))
    return out


def baseline(args, convs) -> dict:
    tokenizer = load_tokenizer(args.model)
    model = get_peft_model(
        load_base_model(args.model, dtype=args.dtype),
        LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=list(DEFAULT_TARGETS), lora_dropout=0.05
        ),
    )
    examples = encode(tokenizer, convs, args.max_length).examples
    collator = CountingCollator(tokenizer, padding=True, label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.micro_batch_size,
                gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
                learning_rate=args.learning_rate,
                max_steps=args.steps,
                save_strategy="no",
                report_to="none",
                use_cpu=not torch.cuda.is_available(),
                seed=0,
                remove_unused_columns=False,
                disable_tqdm=True,
                include_num_input_tokens_seen="non_padding",
                bf16=args.bf16,
                **{CHECKPOINTING_ARGUMENT: args.gradient_checkpointing},
            ),
            train_dataset=examples,
            data_collator=collator,
        )
        reset_peak()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "useful": collator.useful,
        "padding_share": 1 - collator.useful / collator.total,
        "peak_gib": peak_gib(),
    }


def _milora_model(args):
    return init_adapter(
        load_base_model(args.model, dtype=args.dtype),
        method="milora",
        r=args.rank,
        target_modules=DEFAULT_TARGETS,
        cache=DecompositionCache(args.cache_dir) if args.cache_dir else None,
    )


def ours(args, convs) -> dict:
    tokenizer = load_tokenizer(args.model)
    model = _milora_model(args)
    config = TrainConfig(
        packing=args.packing,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        warmup_steps=0,
        max_length=args.max_length,
        save_steps=10**9,
        logging_steps=10**9,
        seed=0,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gap_dropout=args.gap_dropout,
    )
    with tempfile.TemporaryDirectory() as out:
        reset_peak()
        result = train_adapter(model, tokenizer, convs, out, config)
        peak = peak_gib()
        seen = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    useful = max(r.get("num_input_tokens_seen", 0) for r in seen)  # packed: all tokens are real
    if result.packed:
        return {
            "seconds": result.seconds,
            "useful": useful,
            "padding_share": 0.0,
            "packed": True,
            "peak_gib": peak,
        }
    # The padding share of the very batches trained on: replay the sampler's order.
    lengths = [len(e["input_ids"]) for e in encode(tokenizer, convs, args.max_length).examples]
    order, total, real = [], 0, 0
    sampler = LengthGroupedSampler(lengths, args.batch_size, 0)
    epoch = 0
    while len(order) < args.steps * args.batch_size:
        sampler.set_epoch(epoch)
        order.extend(sampler)
        epoch += 1
    for start in range(0, args.steps * args.batch_size, args.micro_batch_size):
        chunk = [lengths[i] for i in order[start : start + args.micro_batch_size]]
        total += max(chunk) * len(chunk)
        real += sum(chunk)
    return {
        "seconds": result.seconds,
        "useful": useful,
        "padding_share": 1 - real / total,
        "packed": False,
        "peak_gib": peak,
    }


@torch.no_grad()
def loss_per_token(args, convs) -> dict:
    """One global batch's loss per trained token, padded and packed, on one model (eval mode)."""
    tokenizer = load_tokenizer(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = encode(tokenizer, convs, args.max_length).examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    batch = [examples[i] for i in order[: args.batch_size]]
    micro = [batch[i : i + args.micro_batch_size] for i in range(0, len(batch), args.micro_batch_size)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _milora_model(args).eval().to(device)

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    padded = [on_device(padding_collator(tokenizer)(m)) for m in micro]
    packed = [on_device(PackingCollator(trained_only=trained_logits_only(model))(m)) for m in micro]
    # What the Trainer divides every micro-batch's summed loss by (labels shifted by one).
    count = sum(int((b["labels"][..., 1:] != -100).sum()) for b in padded)
    assert count == sum(int((b["shift_labels"] != -100).sum()) for b in packed)
    padded_loss = sum(float(model(**b, num_items_in_batch=count).loss) for b in padded)
    with packed_attention(model):
        packed_loss = sum(float(model(**b, num_items_in_batch=count).loss) for b in packed)
    return {"trained_tokens": count, "padded": padded_loss, "packed": packed_loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "data/demo/base_model")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=sorted((REPO / "data/demo/company").glob("drop_*/train_*.jsonl")),
        help="JSONL conversation/Alpaca files or a published dataset folder",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=16, help="the demo profile's")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs of each first")
    parser.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=True, help="ours: TrainConfig.packing"
    )
    parser.add_argument(
        "--gap-dropout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: TrainConfig.gap_dropout (--no-gap-dropout: torch's dropout, as the baseline)",
    )
    parser.add_argument("--dtype", default="float32", help="the base's weights in memory (both)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (both; a GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="(both)")
    parser.add_argument("--cache-dir", type=Path, help="decomposition cache for our init (not timed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    convs = conversations(args.data)
    losses = loss_per_token(args, convs)
    print(
        f"loss per token, one batch of {args.batch_size}: padded {losses['padded']:.6f}, packed {losses['packed']:.6f}"
    )
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    for i in range(-args.warmup, args.repeat):
        for name, fn in (("baseline", baseline), ("ours", ours)):
            run = fn(args, convs)
            run["tokens_per_s"] = run["useful"] / run["seconds"]
            label = "warm-up" if i < 0 else f"run {i + 1}"
            print(
                f"{label} {name}: {run['tokens_per_s']:.0f} useful tokens/s, padding {run['padding_share']:.1%}"
            )
            if i >= 0:
                runs[name].append(run)
    base_rate = statistics.median(r["tokens_per_s"] for r in runs["baseline"])
    our_rate = statistics.median(r["tokens_per_s"] for r in runs["ours"])
    result = {
        "examples": len(convs),
        "steps": args.steps,
        "baseline_useful_tokens_per_s": round(base_rate, 1),
        "ours_useful_tokens_per_s": round(our_rate, 1),
        "ratio": round(our_rate / base_rate, 3),
        # Each round's pair ran back to back: the median of their ratios shrugs off a slow spell.
        "ratio_median_of_rounds": round(
            statistics.median(
                o["tokens_per_s"] / b["tokens_per_s"]
                for b, o in zip(runs["baseline"], runs["ours"], strict=True)
            ),
            3,
        ),
        "baseline_padding_share": round(runs["baseline"][0]["padding_share"], 4),
        "ours_padding_share": round(runs["ours"][0]["padding_share"], 4),
        "ours_packed": runs["ours"][0]["packed"],
        "ours_gap_dropout": args.gap_dropout,
        "baseline_tokens_per_s_runs": [round(r["tokens_per_s"]) for r in runs["baseline"]],
        "ours_tokens_per_s_runs": [round(r["tokens_per_s"]) for r in runs["ours"]],
        "loss_per_token_padded": round(losses["padded"], 6),
        "loss_per_token_packed": round(losses["packed"], 6),
        "loss_difference": float(f"{abs(losses['padded'] - losses['packed']):.2e}"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "baseline_peak_gib": statistics.median(r["peak_gib"] for r in runs["baseline"])
        if torch.cuda.is_available()
        else None,
        "ours_peak_gib": statistics.median(r["peak_gib"] for r in runs["ours"])
        if torch.cuda.is_available()
        else None,
    }
    print(json.dumps(result))
    return 0 if abs(losses["padded"] - losses["packed"]) <= 1e-3 else 1  # the bound


if __name__ == "__main__":
    sys.exit(main())
