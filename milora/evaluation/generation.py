"""Batched inference: greedy generation with left padding and KV cache, and label scoring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from milora.training.examples import special_tokens_wanted
from milora.training.multimodal import open_images


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    add_special_tokens: bool | None = None,
    first_line: bool = True,
    stop: Sequence[str] = (),
    progress: bool = False,
    images: Sequence[Sequence[Any]] | None = None,
    processor: Any = None,
) -> list[str]:
    """Greedy continuations (no sampling, fixed max tokens); optionally cut at a newline.

    ``stop``: strings that end a continuation (generation stops there; the text is cut
    before them), as lm-evaluation-harness's ``until``. ``add_special_tokens``: None decides
    as training did (:func:`~milora.training.examples.special_tokens_wanted`). ``images``: each prompt's image
    files (or opened PIL images), turned into model inputs with the prompts by a vision-language ``processor``
    (``tokenizer`` is then the processor's)."""
    stopping = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            chunk = list(prompts[start : start + batch_size])
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            special = (
                special_tokens_wanted(tokenizer, chunk[0])
                if add_special_tokens is None
                else add_special_tokens
            )
            if processor is not None:
                paths = [path for row in (images or [])[start : start + batch_size] for path in row]
                enc = processor(
                    text=chunk,
                    images=open_images(paths) or None,
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=special,
                )
            else:
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special)
            enc = enc.to(_device(model))
            generated = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **stopping,
            )
            texts = tokenizer.batch_decode(
                generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for text in texts:
                for marker in stop:
                    text = text.split(marker, 1)[0]
                outputs.append(text.strip().split("\n", 1)[0] if first_line else text.strip())
    finally:
        tokenizer.padding_side = side
    return outputs


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    add_special_tokens: bool | None = None,
    progress: bool = False,
) -> list[float]:
    """Summed log-probability of each continuation given its prompt (right padding;
    ``add_special_tokens`` as for :func:`greedy_generate`)."""
    scores: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    for start in tqdm(range(0, len(pairs), batch_size), desc="log-likelihood", disable=not progress):
        chunk = pairs[start : start + batch_size]
        # Prompt and continuation are tokenized apart, so the continuation's tokens are the
        # same for every prompt and the boundary cannot merge into one token.
        prompts = [
            tokenizer(
                p,
                add_special_tokens=special_tokens_wanted(tokenizer, p)
                if add_special_tokens is None
                else add_special_tokens,
            )["input_ids"]
            for p, _ in chunk
        ]
        fulls = [
            ids + tokenizer(c, add_special_tokens=False)["input_ids"]
            for ids, (_, c) in zip(prompts, chunk, strict=True)
        ]
        width = max(map(len, fulls))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, full in enumerate(fulls):
            ids[row, : len(full)] = torch.tensor(full)
            mask[row, : len(full)] = 1
        logits = model(
            input_ids=ids.to(_device(model)), attention_mask=mask.to(_device(model))
        ).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(logprobs.device)
        token_lp = logprobs.gather(-1, targets[..., None])[..., 0]
        for row, (prompt, full) in enumerate(zip(prompts, fulls, strict=True)):
            # logprobs[t] predicts token t + 1: the continuation is tokens len(prompt)..end.
            scores.append(token_lp[row, len(prompt) - 1 : len(full) - 1].sum().item())
    return scores


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int = 256
) -> float:
    """Token-level perplexity of ``texts`` (each cut at ``max_length`` tokens)."""
    total, count = 0.0, 0
    model.eval()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :max_length]
        if ids.shape[1] < 2:
            continue
        out = model(input_ids=ids.to(_device(model)), labels=ids.to(_device(model)))
        total += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    if count == 0:
        raise ValueError("no text long enough to measure perplexity")
    return float(torch.exp(torch.tensor(total / count)))
