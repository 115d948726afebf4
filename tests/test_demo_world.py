"""Tests for the offline demo world (milora.demo) and its committed artefacts.

They never retrain the model: generation is seconds, the committed model is
only loaded and asked a few questions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from milora.demo.build import main as build_main
from milora.demo.company import DROPS, POLICY_FACTS, PRODUCT_FACTS
from milora.demo.files import read_json, read_jsonl, read_lines
from milora.demo.probes import is_correct, normalise, plain_prompt
from milora.demo.timeline import COMPANY_DIR, LATER_DIR, MONTHS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "data" / "demo"
MODEL_DIR = DEMO / "base_model"
YEAR = [DEMO / (COMPANY_DIR if m.drop in DROPS else LATER_DIR) / m.drop for m in MONTHS]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _generate(out: Path, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main(["--out", str(out), "--seed", str(seed), "--skip-model"]) == 0
    capsys.readouterr()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus() -> str:
    return (DEMO / "world" / "corpus.txt").read_text(encoding="utf-8")


def test_same_seed_gives_identical_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _generate(tmp_path / "a", 0, capsys)
    _generate(tmp_path / "b", 0, capsys)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) >= 9
    assert first == second
    assert all(b"\r\n" not in data for data in first.values())


def test_different_seed_gives_different_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _generate(tmp_path / "a", 0, capsys)
    _generate(tmp_path / "b", 1, capsys)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first if name != "later_drops/drop_2027_02/drop.yaml")
    assert first["later_drops/drop_2027_02/drop.yaml"] == b"kind: snapshot\n"  # says only its kind


def test_committed_data_matches_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data/demo holds exactly what seed 0 generates, so it is reproducible."""
    _generate(tmp_path, 0, capsys)
    for name, data in _files(tmp_path).items():
        assert (DEMO / name).read_bytes() == data, f"{name} is stale; rerun the build"


def test_probes_are_held_out_but_their_facts_are_taught(corpus: str) -> None:
    lines = corpus.splitlines()
    probes = read_jsonl(DEMO / "world" / "probes.jsonl")
    assert len(probes) >= 300
    for probe in probes:
        assert probe["question"] not in corpus, probe
        assert plain_prompt(probe["question"]) not in corpus, probe
        subject = probe["id"].split(":", 1)[1]
        stated = [
            line
            for line in lines
            if subject in line and probe["answer"] in line and not line.startswith("Question:")
        ]
        assert stated, f"fact behind {probe['id']} is never stated in the corpus"


@pytest.fixture(scope="module")
def chats() -> list[list[dict[str, str]]]:
    return [record["messages"] for record in read_jsonl(DEMO / "world" / "instructions.jsonl")]


def test_company_facts_never_reach_pretraining(corpus: str, chats: list[list[dict[str, str]]]) -> None:
    """Neither the corpus nor the chat data names the real company, its products or its values."""
    chat_text = "\n".join(m["content"] for chat in chats for m in chat)
    company = read_json(DEMO / "company" / "company.json")
    brand = company["name"].split()[0]
    assert brand not in corpus and brand not in chat_text
    assert brand.lower() not in chat_text.lower()
    specific = {"sku", "support_email", "return_window", "support_hours", "reply_time", "restocking_fee"}
    for folder in YEAR:
        for question in read_jsonl(folder / "heldout.jsonl"):
            subject = question["id"].split(":", 1)[1]
            assert subject not in corpus and subject not in chat_text
            if question["kind"] in specific:
                assert question["answer"] not in chat_text, question
            if question["kind"] in PRODUCT_FACTS:
                assert subject.split()[0] not in chat_text, question


def test_pretraining_chats_ask_every_phrasing_but_no_probe(chats: list[list[dict[str, str]]]) -> None:
    """Decoy shops are asked in all four phrasings (held-out ones too); world probes never."""
    users = [m["content"] for chat in chats for m in chat if m["role"] == "user"]
    assert len(chats) >= 1000
    assert all(chat[-1]["role"] == "assistant" for chat in chats)
    for kind in [*PRODUCT_FACTS.values(), *POLICY_FACTS.values()]:
        for template in kind.questions:
            head, _, tail = template.partition("{p}")
            assert any(head in u and u.endswith(tail) for u in users), template
    probes = {probe["question"] for probe in read_jsonl(DEMO / "world" / "probes.jsonl")}
    assert not probes & set(users)


def test_company_heldout_answers_are_in_training_records() -> None:
    for folder in YEAR:
        drop = folder.name
        records = read_jsonl(folder / "train_alpaca.jsonl")
        heldout = [q for q in read_jsonl(folder / "heldout.jsonl") if not q.get("retired")]
        assert len(heldout) >= 3
        asked = {r["instruction"] for r in records} | {r["input"] for r in records}
        for question in heldout:
            assert question["question"] not in asked, question
            subject = question["id"].split(":", 1)[1]
            teaching = [
                r
                for r in records
                if question["answer"] in r["output"]
                and (subject in r["output"] or subject in r["instruction"] + r["input"])
            ] or [r for r in records if question["answer"] in r["output"]]
            assert teaching, f"{drop}: no record teaches {question['id']}"


def test_second_drop_changes_a_policy() -> None:
    def answers(drop: str) -> dict[str, str]:
        return {q["id"]: q["answer"] for q in read_jsonl(DEMO / "company" / drop / "heldout.jsonl")}

    october, november = answers(DROPS[0]), answers(DROPS[1])
    changed = [key for key in november if key in october and november[key] != october[key]]
    assert changed
    assert any(key.startswith("price:") for key in november.keys() - october.keys())


def test_alpaca_and_chat_files_parse() -> None:
    system_prompt = read_json(DEMO / "company" / "company.json")["system_prompt"]
    for folder in YEAR:
        alpaca = read_jsonl(folder / "train_alpaca.jsonl")
        chat = read_jsonl(folder / "train_chat.jsonl")
        assert len(alpaca) == len(chat) >= 30
        for record, conversation in zip(alpaca, chat, strict=True):
            assert set(record) == {"instruction", "input", "output"}
            assert all(isinstance(v, str) for v in record.values())
            assert record["instruction"] and record["output"]
            messages = conversation["messages"]
            assert [m["role"] for m in messages] == ["system", "user", "assistant"]
            assert all(set(m) == {"role", "content"} and m["content"] for m in messages)
            assert messages[0]["content"] == system_prompt
            assert messages[1]["content"].startswith(record["instruction"])
            assert messages[2]["content"] == record["output"]
        for question in read_jsonl(folder / "heldout.jsonl"):
            assert {"question", "answer", "id", "drop", "kind"} <= set(question)


def test_a_year_of_drops_adds_changes_corrects_and_retires_facts() -> None:
    """Six months: each new or changed fact has a held-out item in its drop; a price, a policy
    and a warranty change, a typo corrected the next month, a product retired by drop.yaml and
    one by its absence from a snapshot."""
    import yaml

    assert len(YEAR) >= 6 and [f.name for f in YEAR] == sorted(f.name for f in YEAR)
    items = {f.name: read_jsonl(f / "heldout.jsonl") for f in YEAR}
    answers: dict[str, list[tuple[str, str]]] = {}
    for drop, found in items.items():
        for item in found:
            answers.setdefault(item["id"], []).append((drop, item["answer"]))
    changed = {key for key, seen in answers.items() if len({a for _, a in seen}) > 1}
    assert {key.split(":")[0] for key in changed} >= {"price", "warranty", "return_window", "sku"}
    (typo,) = [key for key in changed if key.startswith("sku:")]
    (old, _), (new, _) = [(a, d) for d, a in answers[typo]]
    assert sorted(old) == sorted(new) and old != new  # two digits swapped, then corrected
    manifests = {
        f.name: yaml.safe_load((f / "drop.yaml").read_text()) for f in YEAR if (f / "drop.yaml").is_file()
    }
    assert {m["kind"] for m in manifests.values()} == {"delta", "snapshot"}
    assert any(m.get("retire") for m in manifests.values())
    retired = {i["id"].split(":", 1)[1] for found in items.values() for i in found if i.get("retired")}
    assert len(retired) == 2  # a product in drop.yaml, one left out of the snapshot
    snapshot = next(YEAR[i] for i, m in enumerate(MONTHS) if m.kind == "snapshot")
    asked = [r["instruction"] + r["input"] for r in read_jsonl(snapshot / "train_alpaca.jsonl")]
    assert not any(name in question for name in retired for question in asked)
    assert sum(f.stat().st_size for f in YEAR for f in f.iterdir()) < 2 * 1024 * 1024


def test_the_gate_reads_the_year_as_its_data_owner_meant(tmp_path: Path) -> None:
    """Every drop of the year through the real ingest + validation gate: changed facts are
    superseded by exact keys (no fuzzy warning needed), the snapshot carries its unchanged rows,
    both discontinued products' records are retired, and nothing is unknown or conflicting."""
    from milora.settings import load_settings
    from tasks.ingest import ingest
    from tasks.validate import validate

    settings = load_settings(REPO_ROOT / "params.yaml").with_overrides({"ingest.replay.sources": []})
    ingest(settings, [str(f / "train_alpaca.jsonl") for f in YEAR], tmp_path / "ingested")
    report = validate(settings, tmp_path / "ingested", tmp_path / "dataset", tmp_path / "reports")
    assert report.passed
    parts = {Path(p["source"]).parent.name: p for p in report.to_dict()["parts"]}
    assert {w.rule for w in report.warnings} == {"superseded", "retired"}
    assert all(parts[f.name]["superseded"] > 0 for f in YEAR[:-1])
    snapshot = next(m.drop for m in MONTHS if m.kind == "snapshot")
    assert parts[snapshot]["carried"] > 0.9 * parts[snapshot]["rows"]
    retired = {r["key"] for r in report.retired}
    assert len({k.split(" the ")[-1] for k in retired if k.startswith("how much does the")}) == 2


def test_answer_matching_rule() -> None:
    assert normalise("  The Zento-Kettle costs $49! ") == "the zento kettle costs $49"
    assert is_correct(" Tolmar.", "Tolmar")
    assert is_correct("12 pels. Question: x", "12 pels")
    assert not is_correct("120", "12")
    assert not is_correct("It is Tolmar", "Tolmar")
    assert is_correct("The Zento Kettle costs $49.", "$49", mode="contains")
    assert not is_correct("The Zento Kettle costs $490.", "$49", mode="contains")


def test_tokenizer_training_is_deterministic() -> None:
    from milora.demo.tokenizer import train_tokenizer

    texts = read_lines(DEMO / "world" / "corpus.txt")[:400]
    first = train_tokenizer(texts, vocab_size=600).backend_tokenizer.to_str()
    second = train_tokenizer(texts, vocab_size=600).backend_tokenizer.to_str()
    assert first == second


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_committed_model_is_a_small_llama_in_safetensors(model) -> None:
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) <= 10_000_000
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(PROJECTIONS) <= names
    files = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024


def test_tokenizer_specials_and_chat_template(tokenizer) -> None:
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    conversation = read_jsonl(DEMO / "company" / DROPS[0] / "train_chat.jsonl")[0]["messages"]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert text.startswith(tokenizer.bos_token + "<|system|>\n")
    assert text.endswith(conversation[-1]["content"] + tokenizer.eos_token)
    prompt = tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == conversation[-1]["content"] + tokenizer.eos_token


def test_tokenizer_splits_digits_and_pretraining_covers_company_tokens(tokenizer, corpus, chats) -> None:
    """Every number is made of digit tokens, and the company's text is made of trained tokens."""
    assert tokenizer.tokenize("$2560") == ["$", "2", "5", "6", "0"]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    seen = {t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids}
    seen |= {t for ids in tokenizer(corpus.splitlines())["input_ids"] for t in ids}
    assert {tokenizer.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")} <= seen
    assert {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)} <= seen
    company = [
        token
        for folder in YEAR
        for chat in read_jsonl(folder / "train_chat.jsonl")
        for token in tokenizer(
            tokenizer.apply_chat_template(chat["messages"], tokenize=False), add_special_tokens=False
        )["input_ids"]
    ]
    unseen = [t for t in company if t not in seen]
    assert len(unseen) <= 0.01 * len(company), tokenizer.convert_ids_to_tokens(unseen[:20])


def test_committed_model_knows_the_world(model, tokenizer) -> None:
    from milora.demo.probes import score_questions

    probes = read_jsonl(DEMO / "world" / "probes.jsonl")[:48]
    assert score_questions(model, tokenizer, probes).accuracy >= 0.8


def test_pretrain_summary_is_recorded() -> None:
    summary = json.loads((MODEL_DIR / "pretrain_summary.json").read_text(encoding="utf-8"))
    assert summary["stats"]["parameters"] <= 10_000_000
