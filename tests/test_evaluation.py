"""Evaluation: scoring rules, batched inference, the suites, merged = unmerged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import company_conversations
from transformers import AutoModelForCausalLM, AutoTokenizer

import milora.evaluation.suites as suites
from milora import init_adapter, load_adapter, merge_adapter, save_adapter
from milora.evaluation import (
    commonsense_suite,
    continuation_logprobs,
    greedy_generate,
    gsm8k_suite,
    perplexity,
    qa_suite,
    read_items,
)
from milora.evaluation.scoring import (
    answer_labels,
    exact_match,
    first_label,
    gsm8k_gold,
    last_number,
    numbers_match,
    token_f1,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks not present")


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return AutoModelForCausalLM.from_pretrained(chat_model_dir).eval(), AutoTokenizer.from_pretrained(
        chat_model_dir
    )


def test_text_scores():
    assert exact_match("The Kettle!", "kettle") == 1.0
    assert token_f1("costs 49 dollars", "49 dollars") == pytest.approx(0.8)
    assert token_f1("", "x") == 0.0


def test_label_extraction_reads_the_instruction_and_prefers_longer_labels():
    instruction = "Pick one.\n\nAnswer format: answer1/answer2/answer10"
    assert answer_labels(instruction) == ["answer1", "answer2", "answer10"]
    assert first_label("I think Answer10, not answer1", ["answer1", "answer10"]) == "answer10"
    assert first_label("the correct answer is true", ["true", "false"]) == "true"
    assert first_label("no idea", ["true", "false"]) is None


@pytest.mark.parametrize(
    ("text", "value"),
    [("so she pays $1,234.50 in total.", 1234.5), ("The answer is -3", -3.0), ("18", 18.0), ("none", None)],
)
def test_last_number(text, value):
    assert last_number(text) == value


def test_gsm8k_gold_and_match():
    assert gsm8k_gold("blah\n#### 1,000") == 1000.0
    assert numbers_match(1000.0000001, 1000.0) and not numbers_match(None, 1.0)
    with pytest.raises(ValueError, match="no '#### <number>'"):
        gsm8k_gold("no final answer")


@needs_shared
def test_shared_benchmarks_read_with_their_labels():
    for name in ("boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"):
        items = read_items(SHARED / "commonsense" / f"{name}.json", ("instruction", "answer"), limit=20)
        assert all(item["answer"] in answer_labels(item["instruction"]) for item in items)
    gsm = read_items(SHARED / "math" / "gsm8k_test.jsonl", ("question", "answer"), limit=5)
    assert gsm8k_gold(gsm[0]["answer"]) == 18.0


def test_bad_files_say_where(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        read_items(bad, ("question", "answer"))
    missing = tmp_path / "y.json"
    missing.write_text('[{"question": "q"}]')
    with pytest.raises(ValueError, match=r"record 1 lacks \['answer'\]"):
        read_items(missing, ("question", "answer"))


def test_batched_generation_equals_one_by_one(chat):
    model, tokenizer = chat
    prompts = ["How much is the lamp?", "Hi", "How much is the kettle model 3 today?"]
    assert greedy_generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=8) == [
        greedy_generate(model, tokenizer, [p], batch_size=1, max_new_tokens=8)[0] for p in prompts
    ]


def test_continuation_logprob_is_the_sum_of_token_logprobs(chat):
    model, tokenizer = chat
    prompt, continuation = "How much is the lamp?", " It costs 12 dollars."
    got = continuation_logprobs(model, tokenizer, [(prompt, continuation), ("Hi", " x")], batch_size=2)[0]
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    expected = sum(logprobs[len(p_ids) + i - 1, t].item() for i, t in enumerate(c_ids))
    assert got == pytest.approx(expected, abs=1e-4)


def test_suites_score_a_model_that_answers_right(chat, monkeypatch):
    model, tokenizer = chat
    commonsense = [
        {"instruction": "Is it?\n\nAnswer format: true/false", "input": "", "answer": "false"},
        {"instruction": "Which?\n\nAnswer format: answer1/answer2", "input": "", "answer": "answer2"},
    ]
    gsm = [{"question": "2+2?", "answer": "2+2=4\n#### 4"}, {"question": "1000+234?", "answer": "#### 1,234"}]
    canned = iter([["the correct answer is false", "answer2"], ["so 4", "It is $1,234."]])
    monkeypatch.setattr(suites, "greedy_generate", lambda *a, **k: next(canned))
    assert commonsense_suite(model, tokenizer, commonsense).score == 1.0
    assert gsm8k_suite(model, tokenizer, gsm).score == 1.0
    loglik = commonsense_suite(model, tokenizer, commonsense, mode="loglik")
    assert loglik.n == 2 and all(r["prediction"] in r["labels"] for r in loglik.predictions)


def test_merged_and_unmerged_models_score_the_same(chat_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = init_adapter(copy.deepcopy(base), method="milora", r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(1.5)  # as if trained
    save_adapter(model, tmp_path / "a")
    items = [{"question": c[0]["content"], "answer": c[1]["content"]} for c in company_conversations(6)]
    unmerged = qa_suite(load_adapter(copy.deepcopy(base), tmp_path / "a"), tokenizer, items)
    merged = qa_suite(merge_adapter(copy.deepcopy(base), tmp_path / "a"), tokenizer, items)
    assert [r["prediction"] for r in merged.predictions] == [r["prediction"] for r in unmerged.predictions]
    assert merged.metrics == unmerged.metrics
    assert perplexity(base, tokenizer, ["The lamp model 1 costs 13 dollars."]) > 1.0
