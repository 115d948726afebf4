"""The lm-evaluation-harness bridge, run for real and offline on a local task YAML.

The task's data is a JSONL file written here and loaded by the ``json`` builder of
``datasets`` into a cache under tmp; any attempt to open an internet socket fails the test.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")

from milora import init_adapter
from milora.evaluation.harness import INSTALL_HINT, harness_model, run_harness, summarize

TASK = "milora_shop_prices"
ITEMS = ["kettle", "lamp", "chair", "desk", "mug", "fan", "clock", "radio"]


@pytest.fixture(scope="module")
def no_network():
    """Record and refuse every IPv4/IPv6 connect while the module runs; none may happen."""
    attempts: list[object] = []
    original = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network disabled in tests: {address}")
        return original(self, address)

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", refuse)
    yield attempts
    mp.undo()
    assert attempts == [], f"something tried the network: {attempts}"


def shop_items() -> list[dict]:
    """Price questions with three choices; the right one sits at a different place each time."""
    docs = []
    for i, item in enumerate(ITEMS):
        right = f"{10 + 3 * i} dollars"
        wrong = [f"{40 + 7 * i} dollars", "nothing at all"]
        choices = [*wrong[: i % 3], right, *wrong[i % 3 :]]
        docs.append({"question": f"How much is the {item} model {i}?", "choices": choices, "answer": i % 3})
    return docs


@pytest.fixture(scope="module")
def shop_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    """A harness task folder: one YAML pointing at a local JSONL, datasets cache in tmp."""
    root = tmp_path_factory.mktemp("harness")
    docs = shop_items()
    data = root / "shop.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "hf_datasets")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (tasks / "shop.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(tasks), docs


@pytest.fixture(scope="module")
def adapted(chat_model_dir, no_network):
    """The tiny chat LLaMA with a MiLoRA adapter whose B is moved off its start.

    MiLoRA's initial adapter leaves the outputs unchanged (W_res + BA = W), so B gets noise:
    then the scores with and without the adapter differ, and the test can tell which ran.
    """
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    peft_model = init_adapter(model, method="milora", r=4, progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return peft_model.eval(), tokenizer


@pytest.fixture(scope="module")
def harness_run(adapted, shop_task):
    model, tokenizer = adapted
    tasks_dir, _ = shop_task
    return run_harness(
        model,
        tokenizer,
        [TASK],
        batch_size=4,
        include_path=tasks_dir,
        include_defaults=False,  # indexing the built-in tasks alone takes > 10 s here
        log_samples=True,
    )


@torch.no_grad()
def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(token) over the continuation's tokens, from one plain forward pass.

    Tokenized as the harness does for causal models: the whole text at once, split where the
    context's own tokens end (so a merge across the boundary cannot shift the split).
    """
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    assert whole[:n_context] == tokenizer(context)["input_ids"]
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))


def test_harness_runs_offline_and_reports_accuracy(harness_run, shop_task):
    _, docs = shop_task
    acc = harness_run["summary"][TASK]["acc"]
    assert 0.0 <= acc <= 1.0
    assert harness_run["n_samples"][TASK] == len(docs)
    assert len(harness_run["samples"][TASK]) == len(docs)
    assert "acc_stderr" in harness_run["summary"][TASK]
    json.dumps(harness_run)  # the whole answer is plain JSON


def test_harness_scores_are_this_models_loglikelihoods(harness_run, adapted, shop_task):
    model, tokenizer = adapted
    _, docs = shop_task
    samples = {s["doc_id"]: s for s in harness_run["samples"][TASK]}
    correct = []
    for doc_id, doc in enumerate(docs):
        sample = samples[doc_id]
        harness_lls = [resp[0] for resp in sample["filtered_resps"]]
        # The requests are (question, " " + choice): the default target delimiter is a space.
        assert [tuple(a) for a in sample["arguments"]] == [(doc["question"], " " + c) for c in doc["choices"]]
        direct = [direct_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        assert harness_lls == pytest.approx(direct, abs=1e-4)
        correct.append(max(range(len(direct)), key=direct.__getitem__) == doc["answer"])
        if doc_id == 0:
            # The adapter was active: without it the scores are clearly different.
            with model.disable_adapter():
                base = [
                    direct_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]
                ]
            assert max(abs(h - b) for h, b in zip(harness_lls, base, strict=True)) > 1e-2
    assert harness_run["summary"][TASK]["acc"] == pytest.approx(sum(correct) / len(correct))


def test_limit_and_training_mode_restored(adapted, shop_task):
    model, tokenizer = adapted
    tasks_dir, _ = shop_task
    model.train()
    try:
        out = run_harness(model, tokenizer, [TASK], limit=3, include_path=tasks_dir, include_defaults=False)
        assert model.training
    finally:
        model.eval()
    assert out["n_samples"][TASK] == 3
    assert "samples" not in out


def test_harness_model_wraps_the_instance(adapted):
    model, tokenizer = adapted
    lm = harness_model(model, tokenizer, batch_size=2, max_length=32)
    assert lm.model is model
    assert lm.batch_size == 2 and lm.max_length == 32


def test_summarize_keeps_filters_and_drops_labels():
    results = {
        "t": {"alias": "t", "sample_len": 5, "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict": 1}
    }
    assert summarize(results) == {"t": {"acc": 0.5, "em,strict": 1.0}}


def test_missing_lm_eval_says_how_to_install(monkeypatch, adapted):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"milora\[harness\]"):
        run_harness(*adapted, [TASK])
    assert "pip install" in INSTALL_HINT
