"""Image+text conversations to training examples, through a vision-language model's processor.

A conversation is the same list of ``{role, content}`` messages as for text; a message may
also carry ``images`` (paths relative to ``image_root``, the published dataset: LLaVA puts
a record's images with its first user turn). The processor's chat template renders the
conversation with an image placeholder per image (content parts ``{"type": "image"}`` then
``{"type": "text"}``), and the processor expands each placeholder to the image tokens the
model fills with its vision features, so the ids trained on are the ids the model is
served with. Labels are the assistant turns only, located by rendering each turn's prefix:
with image tokens expanded, character offsets of the text no longer line up with tokens,
so each prefix is tokenized and a turn is the tokens its prefix shares with the whole (a
turn's trailing space merges with the next word). An answer the template ends without EOS
(LLaVA-1.5's writes none) gets one to learn, so the model learns to stop.

Length rule as for text (cut from the right at ``max_length``), except that a cut through
an image's tokens drops the example: the model cannot take part of an image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import ProcessorMixin

from milora.data.images import MESSAGE_IMAGES
from milora.training.examples import IGNORE, ROLES, Encoded, special_tokens_wanted
from milora.training.packing import padding_collator

logger = logging.getLogger(__name__)

IMAGES = MESSAGE_IMAGES  # the message key holding a turn's image paths
Message = dict[str, Any]


def has_images(conversations: Iterable[Sequence[Message]]) -> bool:
    """Whether any message of ``conversations`` carries images."""
    return any(message.get(IMAGES) for conversation in conversations for message in conversation)


def content_parts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the processor's form: each content a list of parts, a turn's images first."""
    return [
        {
            "role": message["role"],
            "content": [{"type": "image"} for _ in message.get(IMAGES) or ()]
            + [{"type": "text", "text": message["content"]}],
        }
        for message in messages
    ]


def open_images(paths: Iterable[Any]) -> list[Any]:
    """The images at ``paths`` (or already opened PIL images), decoded as RGB."""
    from PIL import Image, ImageOps

    images = []
    for path in paths:
        if isinstance(path, Image.Image):
            images.append(ImageOps.exif_transpose(path).convert("RGB"))
            continue
        try:
            with Image.open(path) as image:  # upright, as transformers' image loading serves it
                images.append(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, ValueError) as error:
            raise ValueError(f"image {path} cannot be read ({error}); validate the dataset again") from None
    return images


def image_token_id(processor: ProcessorMixin) -> int:
    """The id the processor repeats for each image position."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def _ids(processor: ProcessorMixin, text: str, images: list[Any]) -> list[int]:
    special = special_tokens_wanted(processor.tokenizer, text)
    return processor(text=[text], images=images or None, add_special_tokens=special)["input_ids"][0]


def _render(processor: ProcessorMixin, messages: list[dict[str, Any]], prompt_only: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)


def prompt_text(processor: ProcessorMixin, messages: Sequence[Message]) -> str:
    """The text a vision-language model is given at inference for these (user-ending) messages."""
    return _render(processor, content_parts(messages), prompt_only=True)


def _shared(ids: Sequence[int], prefix: Sequence[int]) -> int:
    """How many leading tokens ``ids`` and ``prefix`` have in common."""
    count = 0
    for mine, theirs in zip(ids, prefix, strict=False):
        if mine != theirs:
            break
        count += 1
    return count


def _with_stops(ids: list[int], spans: list[tuple[int, int]], eos: int | None) -> tuple[list[int], list[int]]:
    """Ids and labels (the spans learnt), an EOS learnt after each answer that ends without
    one: a template that writes none (LLaVA-1.5's) would otherwise teach the model to never
    stop, where LLaVA's own training ended each answer with ``</s>``."""
    out, labels, at = [], [], 0
    for start, end in spans:
        out += ids[at:start]
        labels += [IGNORE] * (start - at)
        answer = list(ids[start:end])
        if eos is not None and eos not in answer:
            answer.append(eos)
        out += answer
        labels += answer
        at = end
    out += ids[at:]
    labels += [IGNORE] * (len(ids) - at)
    return out, labels


def encode_one(
    processor: ProcessorMixin, messages: Sequence[Message], image_root: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """Ids and response-only labels of one conversation (not cut), and its image paths: the
    images are decoded again per micro-batch (:class:`ImageCollator`), so a large dataset's
    pixels never sit in memory all at once."""
    for message in messages:
        if message.get("role") not in ROLES:
            raise ValueError(f"unknown role {message.get('role')!r}; expected one of {ROLES}")
    parts = content_parts(messages)
    paths = [str(Path(image_root) / p) if image_root else p for m in messages for p in m.get(IMAGES) or ()]
    images = open_images(paths)
    full = _render(processor, parts, prompt_only=False)
    ids = _ids(processor, full, images)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        seen = sum(len(m.get(IMAGES) or ()) for m in messages[:i])
        before = _render(processor, parts[:i], prompt_only=True)
        upto = _render(processor, parts[: i + 1], prompt_only=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise ValueError(
                "the chat template renders a conversation's prefix differently; cannot mask prompts"
            )
        # Where the prefixes' tokens stop agreeing with the whole's: a turn's trailing space
        # (LLaVA-1.5's template) is its own token alone and merges with the next turn's word.
        start = _shared(ids, _ids(processor, before, images[:seen]))
        end = _shared(ids, _ids(processor, upto, images[:seen]))
        while end - start > 1 and not processor.tokenizer.decode(ids[end - 1 : end]).strip():
            end -= 1  # a trailing space of the template's, not of the answer: EOS follows the words
        if end <= start:
            raise ValueError(f"assistant turn {i} has no token of its own; cannot learn it")
        spans.append((start, end))
    if not spans:
        raise ValueError("a training conversation needs at least one assistant turn")
    ids, labels = _with_stops(ids, spans, processor.tokenizer.eos_token_id)
    example: dict[str, Any] = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    if paths:
        example[IMAGES] = paths
    return example


def encode_multimodal(
    processor: ProcessorMixin,
    conversations: Iterable[Sequence[Message]],
    max_length: int,
    image_root: str | os.PathLike[str] | None = None,
) -> Encoded:
    """:func:`milora.training.examples.encode` for a vision-language model (text-only
    conversations included: they go through the same template)."""
    out = Encoded([], 0, 0, 0)
    image_id = image_token_id(processor)
    pictured = cut = fewest = 0  # conversations with images; of them, cut through an image; image tokens
    for messages in conversations:
        example = encode_one(processor, messages, image_root)
        ids, labels = example["input_ids"], example["labels"]
        if IMAGES in example:
            pictured += 1
            fewest = min(fewest or len(ids), ids.count(image_id))
        if len(ids) > max_length:
            out.truncated += 1
            if image_id in ids[max_length:]:  # part of an image would be cut off
                out.dropped += 1
                cut += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            example.update(input_ids=ids, labels=labels, attention_mask=[1] * len(ids))
        trained = sum(label != IGNORE for label in labels)
        if trained == 0:
            out.dropped += 1
            continue
        out.response_tokens += trained
        out.examples.append(example)
    if pictured and cut == pictured:  # not a warning: the run would learn no image at all
        raise ValueError(
            f"all {pictured} image records are longer than max_length {max_length} tokens (their images "
            f"alone take {fewest} or more): raise the profile's max_length"
        )
    if out.dropped or out.truncated:
        logger.warning(
            "%d sequences longer than %d tokens; %d dropped (no response left, or an image cut: %d of %d image records)",
            out.truncated,
            max_length,
            out.dropped,
            cut,
            pictured,
        )
    return out


class ImageCollator:
    """Pads the text of a micro-batch as for text, and decodes and preprocesses its images
    (in row order; rows without images add none: the model places image features at its image
    tokens, row by row)."""

    def __init__(self, processor: ProcessorMixin) -> None:
        self.processor = processor
        self.pad = padding_collator(processor.tokenizer)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        paths = [path for f in features for path in f.get(IMAGES) or ()]
        batch = self.pad([{k: v for k, v in f.items() if k != IMAGES} for f in features])
        if paths:
            batch.update(self.processor.image_processor(open_images(paths), return_tensors="pt"))
        return batch
