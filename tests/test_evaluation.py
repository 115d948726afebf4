"""Evaluation: scoring rules, batched inference, the suites, merged = unmerged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import DEMO_TOKENIZER, company_conversations
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
    GSM8K_STOPS,
    answer_labels,
    exact_match,
    first_label,
    gsm8k_gold,
    gsm8k_prediction,
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


@pytest.mark.parametrize(
    ("output", "value"),
    [
        ("#### 70\nQuestion: Tom has 3 apples. How many? #### 3", 70.0),  # run-on: the answer given wins
        ("She pays 5 + 65 = 70 dollars.\nQuestion: what is 1 + 2? 3", 70.0),  # cut at the next question
        ("5 apples minus 2 leaves 3. #### 3", 3.0),
        ("so 12 * 3 = 36 #### 36 and then 40 more", 36.0),  # the number right after ####
        ("#### 1,234", 1234.0),
        ("#### $5.50.", 5.5),
        ("#### -2", -2.0),
        ("4 then 5", 5.0),  # no marker: the last number
        ("it is 8 ####", 8.0),  # an empty marker: the last number before it
        ("Question: 4 + 4?", None),  # nothing before the next question
        ("", None),
    ],
)
def test_gsm8k_prediction(output, value):
    assert gsm8k_prediction(output) == value


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


def test_generation_stops_at_a_stop_string():
    """On the demo base (it writes words): generation ends where a stop string appears."""
    model = AutoModelForCausalLM.from_pretrained(DEMO_TOKENIZER).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    prompts = ["Hello", "Question: Where do the Velari people live? Answer:"]
    common = {"max_new_tokens": 16, "first_line": False, "add_special_tokens": True}
    free = greedy_generate(model, tokenizer, prompts, **common)
    words = free[0].split()
    assert len(words) >= 3, free  # a marker in the middle of the first answer
    marker = words[len(words) // 2]
    stopped = greedy_generate(model, tokenizer, prompts, stop=[marker], **common)
    assert stopped[0] == free[0].split(marker, 1)[0].strip() and stopped[0] != free[0]
    assert stopped[1] == free[1].split(marker, 1)[0].strip()  # the other row: cut only if it says it too


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
    gsm = [
        {"question": "2+2?", "answer": "2+2=4\n#### 4"},
        {"question": "1000+234?", "answer": "#### 1,234"},
        {"question": "70?", "answer": "#### 70"},
    ]
    canned = iter(
        [
            ["the correct answer is false", "answer2"],
            ["so 4", "It is $1,234.", "#### 70 Question: 1+2? #### 3"],
        ]
    )
    asked = []

    def generate(*args, **kwargs):
        asked.append(kwargs)
        return next(canned)

    monkeypatch.setattr(suites, "greedy_generate", generate)
    assert commonsense_suite(model, tokenizer, commonsense).score == 1.0
    result = gsm8k_suite(model, tokenizer, gsm)
    assert [r["prediction"] for r in result.predictions] == [4.0, 1234.0, 70.0] and result.score == 1.0
    assert asked[-1]["stop"] == GSM8K_STOPS and asked[-1]["first_line"] is False
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
