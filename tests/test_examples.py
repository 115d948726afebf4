"""Training examples: only responses are learned; the length rule holds."""

from __future__ import annotations

import pytest
from conftest import company_conversations
from transformers import AutoTokenizer

from milora.training.examples import IGNORE, alpaca_messages, encode


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE], skip_special_tokens=True)


def test_only_the_assistant_turn_is_labelled(tokenizer):
    conversation = company_conversations(1)[0]
    example = encode(tokenizer, [conversation], max_length=256).examples[0]
    assert trained_text(tokenizer, example).strip() == conversation[1]["content"]
    prompt_len = example["labels"].index(next(t for t in example["labels"] if t != IGNORE))
    assert all(label == IGNORE for label in example["labels"][:prompt_len])
    assert example["input_ids"][prompt_len:] == example["labels"][prompt_len:]


def test_every_assistant_turn_of_a_chat_is_learned(tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Price of the lamp?"},
        {"role": "assistant", "content": "It costs 12 dollars."},
        {"role": "user", "content": "And the mug?"},
        {"role": "assistant", "content": "It costs 7 dollars."},
    ]
    text = trained_text(tokenizer, encode(tokenizer, [chat], 256).examples[0])
    assert "12 dollars" in text and "7 dollars" in text
    assert "Price" not in text and "Be brief" not in text


def test_long_sequences_are_cut_and_promptonly_ones_dropped(tokenizer):
    conversation = company_conversations(1)[0]
    full = encode(tokenizer, [conversation], 256).examples[0]
    first_label = next(i for i, t in enumerate(full["labels"]) if t != IGNORE)
    cut = encode(tokenizer, [conversation], first_label + 2)
    assert cut.truncated == 1 and len(cut.examples[0]["input_ids"]) == first_label + 2
    gone = encode(tokenizer, [conversation], first_label)
    assert gone.dropped == 1 and not gone.examples


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        encode(tokenizer, [[{"role": "bot", "content": "hi"}]], 64)
    with pytest.raises(ValueError, match="at least one assistant turn"):
        encode(tokenizer, [[{"role": "user", "content": "hi"}]], 64)


def test_without_a_chat_template_the_alpaca_prompt_is_used(tokenizer):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    example = encode(plain, [alpaca_messages("Price of the fan?", "", "9 dollars")], 256).examples[0]
    assert "### Response:" in plain.decode(example["input_ids"])
    assert trained_text(plain, example).strip().startswith("9 dollars")
