"""Conversations to training examples: the model learns the responses only.

Each example is a list of chat messages (``system``/``user``/``assistant``). It is
rendered with the tokenizer's chat template (a single-turn example without one falls back
to the Alpaca prompt of LLM-Adapters, the paper's format) and tokenized once; labels are
-100 everywhere but on assistant content, found by character offsets so that the
tokenization of the whole text is the one trained on.

Length rule: a sequence longer than ``max_length`` tokens is cut from the right; an
example with no response token left after the cut is dropped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE = -100
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

Message = dict[str, str]


@dataclass
class Encoded:
    examples: list[dict[str, list[int]]]
    dropped: int
    truncated: int
    response_tokens: int


def alpaca_messages(instruction: str, input_text: str, output: str) -> list[Message]:
    """An Alpaca record as a chat: the input follows the instruction in the user turn."""
    prompt = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], prompt_only: bool) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=prompt_only
        )
    roles = [m["role"] for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise ValueError("multi-turn or system messages need a tokenizer with a chat template")
    prompt = ALPACA_PROMPT.format(instruction=messages[0]["content"])
    if len(messages) == 1:
        return prompt
    return prompt + messages[1]["content"] + (tokenizer.eos_token or "")


def special_tokens_wanted(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether tokenizing rendered ``text`` adds the tokenizer's special tokens (its BOS):
    not when the text starts with BOS (a template that writes it), else yes (no template, or
    one that leaves BOS to the tokenizer, as LLaVA-1.5's); transformers' processors decide so."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """The text a model is given at inference for these (user-ending) messages."""
    return _render(tokenizer, messages, prompt_only=True)


def response_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    for message in messages:
        if message.get("role") not in ROLES:
            raise ValueError(f"unknown role {message.get('role')!r}; expected one of {ROLES}")
    full = _render(tokenizer, messages, prompt_only=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt_only=True)
        upto = _render(tokenizer, messages[: i + 1], prompt_only=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise ValueError(
                "the chat template renders a conversation's prefix differently; cannot mask prompts"
            )
        spans.append((len(before), len(upto)))
    if not spans:
        raise ValueError("a training conversation needs at least one assistant turn")
    return full, spans


def encode(
    tokenizer: PreTrainedTokenizerBase, conversations: Iterable[Sequence[Message]], max_length: int
) -> Encoded:
    """Token ids, attention masks and response-only labels for each conversation."""
    out = Encoded([], 0, 0, 0)
    for messages in conversations:
        text, spans = response_spans(tokenizer, messages)
        special = special_tokens_wanted(tokenizer, text)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [
            token if any(start < end and start >= lo and end <= hi for lo, hi in spans) else IGNORE
            for token, (start, end) in zip(ids, offsets, strict=True)
        ]
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(label != IGNORE for label in labels)
        if trained == 0:
            out.dropped += 1
            continue
        out.response_tokens += trained
        out.examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if out.dropped or out.truncated:
        logger.warning(
            "%d sequences cut at %d tokens; %d dropped with no response left",
            out.truncated,
            max_length,
            out.dropped,
        )
    return out
