"""One training loop for MiLoRA, PiSSA and LoRA: the methods differ only in their start.

The heavy lifting is Hugging Face's ``Trainer`` (optimiser, schedule, accumulation,
checkpoints with optimiser/scheduler/RNG/data position, DDP under ``torchrun``). This adds
what a production run needs on top: response-only examples, padding-free micro-batches
(:mod:`milora.training.packing`; padded ones where a model cannot be packed exactly), a hard
stop on a non-finite loss, per-step metrics in a JSON-lines file, the initial factors in
every checkpoint, a resume that picks the last *complete* checkpoint, and a final adapter
written only when training succeeded. Batches are grouped by length either way (packed,
attention still pads each micro-batch's sequences to its longest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.utils.data import Sampler
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import get_length_grouped_indices

from milora.adapter_io import save_adapter, write_initial
from milora.chain import write_served
from milora.digests import file_differences, folder_sha256
from milora.errors import UserFacingError
from milora.layout import (
    ADAPTER_HASHES,
    CHECKPOINTS,
    LOSS_PLOT,
    LOSS_TABLE,
    MANIFEST,
    METRICS,
    RAW_ADAPTER,
    SERVED_ADAPTER,
    SUMMARY,
)
from milora.training.config import TrainConfig
from milora.training.dropout import use_gap_dropout
from milora.training.examples import Encoded, Message, encode
from milora.training.multimodal import ImageCollator, encode_multimodal, has_images
from milora.training.packing import (
    PackingCollator,
    packed_attention,
    packing_matches_padding,
    packing_unsupported,
    padding_collator,
    trained_logits_only,
)

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError, UserFacingError):
    """Training produced a NaN or infinite loss; nothing was marked final."""


@dataclass
class TrainResult:
    adapter_dir: Path
    global_step: int
    train_loss: float
    seconds: float
    examples: int
    dropped: int
    truncated: int
    response_tokens: int
    resumed_from: str | None
    already_trained: bool = False
    replay_examples: int = 0
    replay_per_batch: int = 0
    served_rank: int = 0
    compression_error: float = 0.0  # worst layer's relative error of the served truncation (0: exact)
    packed: bool = False  # padding-free micro-batches (False: padded, config.packing off or unsupported)


def adapter_hashes(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``{adapter/..., adapter_for_stock_base/...: sha256}`` of a run folder's adapter files."""
    run_dir = Path(run_dir)
    return {
        f"{folder}/{name}": digest
        for folder in (RAW_ADAPTER, SERVED_ADAPTER)
        if (run_dir / folder).is_dir()
        for name, digest in folder_sha256(run_dir / folder).items()
    }


def finished_run(run_dir: str | os.PathLike[str]) -> TrainResult | None:
    """The result of a run folder whose training ended (its summary is written last) and whose
    adapter files are still the ones training wrote (else None: a truncated or edited adapter
    is trained again, never served as finished)."""
    path = Path(run_dir) / SUMMARY
    if not (path.is_file() and (Path(run_dir) / SERVED_ADAPTER / "adapter_config.json").is_file()):
        return None
    hashes = Path(run_dir) / ADAPTER_HASHES
    if not hashes.is_file():
        logger.warning(
            "%s: a finished run without %s (older than it): training again", run_dir, ADAPTER_HASHES
        )
        return None
    changed = file_differences(json.loads(hashes.read_text()), adapter_hashes(run_dir), by="training")
    if changed:
        logger.warning(
            "%s: the adapter files changed since training (%s): training again", run_dir, "; ".join(changed)
        )
        return None
    summary = json.loads(path.read_text())
    values = {f.name: summary[f.name] for f in fields(TrainResult) if f.name in summary}
    return TrainResult(**{**values, "adapter_dir": Path(run_dir) / RAW_ADAPTER, "already_trained": True})


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_complete_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint that was fully written: Trainer writes its state file last, then
    :class:`_InitialFactorsInCheckpoints` the initial factors and, last, the manifest (a kill
    between the two left a checkpoint that could not be resumed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _CHECKPOINT.match(p.name))
        and (p / "trainer_state.json").is_file()
        and (p / MANIFEST).is_file()
    ]
    return max(complete)[1] if complete else None


class LengthGroupedSampler(Sampler[int]):
    """Shuffled, then sorted by length within windows, so each global batch holds sequences
    of similar length and pads little. The order depends only on (seed, epoch), not on the
    number of processes (batches are cut at the *global* batch size), so one process and N
    processes see the same global batches and a resumed run replays the same order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class ReplayMixSampler(Sampler[int]):
    """Global batches of ``batch_size`` rows of which ``replay_per_batch`` come from the replay
    pool (indices ``n_company`` and up) and the rest from the company rows. An epoch is one
    pass over the company rows (the last batch filled by wrapping); the replay rows of an epoch
    are a fresh permutation of the pool, cycled when the epoch needs more than it holds. Within
    a batch, rows are sorted by length (micro-batches pad little). Like
    :class:`LengthGroupedSampler`, the order depends only on (seed, epoch)."""

    def __init__(
        self, lengths: Sequence[int], n_company: int, batch_size: int, replay_per_batch: int, seed: int
    ) -> None:
        if not 0 < replay_per_batch < batch_size:
            raise ValueError(f"replay rows per batch must be in 1..{batch_size - 1}, got {replay_per_batch}")
        if not 0 < n_company < len(lengths):
            raise ValueError("a replay mix needs company rows and replay rows")
        self.lengths, self.n_company, self.seed, self.epoch = list(lengths), n_company, seed, 0
        self.batch_size, self.replay_per_batch = batch_size, replay_per_batch
        self.batches = -(-n_company // (batch_size - replay_per_batch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size

    @staticmethod
    def _cycled(order: list[int], count: int) -> list[int]:
        return (order * (-(-count // len(order))))[:count]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        per_company = self.batch_size - self.replay_per_batch
        company = self._cycled(
            torch.randperm(self.n_company, generator=generator).tolist(), self.batches * per_company
        )
        pool = len(self.lengths) - self.n_company
        replay = self._cycled(
            [self.n_company + i for i in torch.randperm(pool, generator=generator).tolist()],
            self.batches * self.replay_per_batch,
        )
        order: list[int] = []
        for b in range(self.batches):
            batch = company[b * per_company : (b + 1) * per_company]
            batch += replay[b * self.replay_per_batch : (b + 1) * self.replay_per_batch]
            order += sorted(batch, key=lambda i: -self.lengths[i])
        return iter(order)


class _Trainer(Trainer):
    def __init__(self, *args: Any, sampler: Sampler[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sampler = sampler
        self._parameters: int | None = None

    def _get_train_sampler(self, train_dataset=None):
        return self._sampler or super()._get_train_sampler(train_dataset)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Trainer's estimate (6 x tokens x parameters), the parameters counted once: Trainer
        counts them again for every micro-batch (a walk over all the model's tensors, ~1 ms
        on a CPU, some 3% of a demo-model step)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameters is None:
            self._parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"loss became {loss.detach().float().item()} at step {self.state.global_step + 1}; "
                "training stopped and no adapter was marked final (lower the learning rate, "
                "enable gradient clipping or check the data)"
            )
        return result


class _MetricsFile(TrainerCallback):
    """Every logged step as one JSON line (loss, learning rate, grad norm, tokens/s)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "time": time.time(), **logs}
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


class _InitialFactorsInCheckpoints(TrainerCallback):
    """Each checkpoint becomes a self-contained adapter folder (with A0, B0, manifest)."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_initial(self.model, folder)


# transformers 5.2x renamed TrainingArguments' gradient_checkpointing; whichever it has.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def _arguments(
    config: TrainConfig, run_dir: Path, packed: bool = False, images: bool = False
) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        **{CHECKPOINTING_ARGUMENT: config.gradient_checkpointing},
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.accumulation_steps(world_size()),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        # Trainer deletes older checkpoints before the newest has its initial factors and
        # manifest (written on_save): keep one more, so a kill in between leaves a resumable one.
        save_total_limit=None if config.save_total_limit is None else max(2, config.save_total_limit),
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        report_to="none",
        # Packed rows hold no padding: every input token counts (they carry no attention mask).
        include_num_input_tokens_seen="all" if packed else "non_padding",
        use_cpu=not cuda,
        ddp_backend="gloo" if world_size() > 1 and not cuda else None,
        # A micro-batch without images leaves an adapted projector or vision layer without a
        # gradient, which DDP must be told to expect.
        ddp_find_unused_parameters=images,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _collator(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict], config: TrainConfig
) -> Any:
    """A :class:`PackingCollator` when ``config.packing`` and the model packs exactly (the
    loss of the four shortest examples packed equals their loss padded: cheap wherever the
    model sits before the Trainer moves it), else the padded collator."""
    if not config.packing:
        return padding_collator(tokenizer)
    reason = packing_unsupported(model)
    if reason is None and torch.cuda.device_count() > 1 and world_size() == 1:
        # The Trainer would wrap the model in nn.DataParallel, which splits every tensor along
        # dim 0: a packed row is one sample, and its sequence bounds would be cut apart.
        reason = f"{torch.cuda.device_count()} GPUs in one process (nn.DataParallel); launch with torchrun"
    collator = PackingCollator(trained_only=trained_logits_only(model))
    if reason is None and len(examples) > 1:
        shortest = sorted(examples, key=lambda e: len(e["input_ids"]))[:4]
        try:
            packing_matches_padding(model, tokenizer, shortest, collator)
        except (ValueError, TypeError, RuntimeError) as error:  # a mismatch, or a forward that fails
            reason = f"{type(error).__name__}: {error}"
    if reason is not None:
        logger.warning(
            "packing off: %s; micro-batches are padded to their longest sequence%s",
            reason,
            " (grouped by length)" if config.group_by_length or config.replay_share else "",
        )
        return padding_collator(tokenizer)
    logger.info("packing: each micro-batch is one row without padding, attention within each sequence")
    return collator


def train_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    run_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume_from: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
    replay: Sequence[Sequence[Message]] = (),
    start_weights: Path | None = None,
    serve_rank: int | None = None,
    processor: Any = None,
    image_root: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train ``model``'s adapter on ``conversations``; write ``run_dir/adapter`` on success.

    ``processor``: a vision-language model's (:func:`milora.modeling.load_processor`); every
    conversation then goes through it (:mod:`milora.training.multimodal`), with the image
    paths of its messages relative to ``image_root``, in padded micro-batches.

    ``replay``: general conversations mixed into every batch at ``config.replay_share``
    (:class:`ReplayMixSampler`); an epoch is then one pass over ``conversations``.

    The served adapter is :func:`milora.chain.write_served` of the trained one (chained after
    ``start_weights`` when the run started on folded weights; truncated to ``serve_rank``).

    ``resume_from`` is a checkpoint folder of this run (see :func:`last_complete_checkpoint`);
    the model must then already hold this run's initial state (``load_adapter`` of
    ``run_dir/init``). Raises :class:`NonFiniteLossError` on a NaN/inf loss.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def encoded_examples(rows: Sequence[Sequence[Message]]) -> Encoded:
        if processor is not None:
            return encode_multimodal(processor, rows, config.max_length, image_root)
        if has_images(rows):  # a text tokenizer would drop the images without a word
            raise ValueError("image records need a vision-language model's processor (processor=)")
        return encode(tokenizer, rows, config.max_length)

    encoded = encoded_examples(conversations)
    if not encoded.examples:
        raise ValueError("no training example has a response token within max_length")
    for text_side in (tokenizer, getattr(processor, "tokenizer", tokenizer)):
        if text_side.pad_token_id is None:
            text_side.pad_token = text_side.eos_token
    if resume_from is None and is_main_process():
        (run_dir / METRICS).unlink(missing_ok=True)
    mixed = encoded_examples(replay) if replay and config.replay_share else None
    if replay and not config.replay_share:
        logger.warning("%d replay conversations given but replay_share is 0: not trained on", len(replay))
    if config.replay_share and not (mixed and mixed.examples):
        raise ValueError(
            f"replay_share is {config.replay_share} but there is no replay data "
            "(set ingest.replay.sources, or replay_share: 0)"
        )
    examples = encoded.examples + (mixed.examples if mixed else [])
    lengths = [len(e["input_ids"]) for e in examples]
    if mixed:
        sampler: Sampler[int] | None = ReplayMixSampler(
            lengths, len(encoded.examples), config.batch_size, config.replay_rows_per_batch(), config.seed
        )
        logger.info(
            "replay: %d of every %d rows from %d general conversations",
            config.replay_rows_per_batch(),
            config.batch_size,
            len(mixed.examples),
        )
    elif config.group_by_length:
        sampler = LengthGroupedSampler(lengths, config.batch_size, config.seed)
    else:
        sampler = None
    if processor is not None:
        logger.info("images: packing off, micro-batches padded, images decoded per micro-batch")
        collator: Any = ImageCollator(processor)
    else:
        collator = _collator(model, tokenizer, examples, config)
    packed = isinstance(collator, PackingCollator)
    if config.gap_dropout:
        use_gap_dropout(model)
    trainer = _Trainer(
        sampler=sampler,
        model=model,
        args=_arguments(config, run_dir, packed, images=processor is not None),
        train_dataset=examples,
        data_collator=collator,
        callbacks=[_MetricsFile(run_dir / METRICS), _InitialFactorsInCheckpoints(model)],
    )
    started = time.perf_counter()
    with packed_attention(model) if packed else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    final = run_dir / RAW_ADAPTER
    result = TrainResult(
        adapter_dir=final,
        global_step=output.global_step,
        train_loss=float(output.training_loss),
        seconds=seconds,
        examples=len(encoded.examples),
        dropped=encoded.dropped,
        truncated=encoded.truncated,
        response_tokens=encoded.response_tokens,
        resumed_from=str(resume_from) if resume_from else None,
        replay_examples=len(mixed.examples) if mixed else 0,
        replay_per_batch=config.replay_rows_per_batch() if mixed else 0,
        packed=packed,
    )
    if is_main_process():
        save_adapter(model, final, base_model=base_model, overwrite=True)
        served = run_dir / SERVED_ADAPTER
        shutil.rmtree(served, ignore_errors=True)
        report = write_served(final, served, start_weights=start_weights, serve_rank=serve_rank)
        result.served_rank, result.compression_error = report.rank, report.max_error
        # Relative: the folder can be moved (the train stage publishes it by a rename).
        summary = {**asdict(result), "adapter_dir": RAW_ADAPTER, "config": asdict(config)}
        # The summary joins the adapter's manifest once the served adapter is known (its rank
        # and error belong to it); the weights are written once.
        manifest = final / MANIFEST
        manifest.write_text(
            json.dumps({**json.loads(manifest.read_text()), "training": summary}, indent=2, sort_keys=True)
            + "\n"
        )
        write_loss_table(run_dir / METRICS, run_dir / LOSS_TABLE)
        plot_loss(run_dir / METRICS, run_dir / LOSS_PLOT)
        if not config.keep_checkpoints:
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        (run_dir / ADAPTER_HASHES).write_text(
            json.dumps(adapter_hashes(run_dir), indent=1, sort_keys=True) + "\n"
        )
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")  # last: marks the run finished
    logger.info("trained %d steps in %.1f s, final loss %.4f", result.global_step, seconds, result.train_loss)
    return result


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def write_loss_table(metrics: Path, out: Path) -> Path:
    """The logged steps as CSV (``dvc plots show`` and spreadsheets read it)."""
    rows = [r for r in read_metrics(metrics) if "loss" in r]
    lines = ["step,loss,learning_rate"] + [
        f"{r['step']},{r['loss']},{r.get('learning_rate', '')}" for r in rows
    ]
    out.write_text("\n".join(lines) + "\n")
    return out


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """Training loss against step, as a PNG beside the metrics."""
    rows = [r for r in read_metrics(metrics) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", markersize=2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def clear_run(run_dir: str | os.PathLike[str]) -> None:
    """Remove a run's checkpoints and outputs (a fresh start, not a resume)."""
    shutil.rmtree(run_dir, ignore_errors=True)
