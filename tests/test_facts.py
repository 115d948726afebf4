"""Company facts that change month to month: the newest drop's answer is the one taught.

The rule (milora.data.facts) on plain records, then through the real ingest and validate
stages on two drops: a later drop's answer supersedes the earlier record (out of the
published dataset, counted and listed in the summary), two answers inside one drop fail
naming both rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_settings, write_jsonl

from milora.data.dataset import iter_parts
from milora.data.errors import DataValidationError
from milora.data.facts import FactRecord, drop_date, drop_of, fact_key, normalised, resolve
from milora.records import RunStatus
from tasks.html_report import html_report
from tasks.ingest import ingest
from tasks.report import report as record_run
from tasks.validate import validate


def record(drop: int, row: int, question: str, answer: str) -> FactRecord:
    return FactRecord(
        f"company/drop_0{drop}/train.jsonl", row, f"drop_0{drop}", drop, fact_key(question), answer
    )


def test_the_newest_drop_answers_and_older_different_answers_are_superseded():
    facts = resolve(
        [
            record(1, 1, "What is the return window?", "30 days."),
            record(1, 2, "Who founded us?", "Ada."),
            record(2, 1, "what is the  return window", "45 days."),  # the same key, normalised
            record(2, 2, "Who founded us?", "ada"),  # the same answer, normalised: no new fact
            record(3, 1, "What is the return window?", "60 days."),
        ]
    )
    assert sorted(facts.superseded) == [
        ("company/drop_01/train.jsonl", 1),
        ("company/drop_02/train.jsonl", 1),
    ]
    first = facts.superseded[("company/drop_01/train.jsonl", 1)]
    assert (first.old_answer, first.new_answer, first.old_drop, first.new_drop) == (
        "30 days.",
        "60 days.",  # superseded by the newest answer, not the intermediate one
        "drop_01",
        "drop_03",
    )
    assert facts.conflicts == []


def test_two_answers_inside_one_drop_are_a_conflict():
    facts = resolve([record(1, 4, "Price of the kettle?", "$20"), record(1, 9, "price of the kettle", "$25")])
    (conflict,) = facts.conflicts
    assert (conflict.first.row, conflict.second.row, conflict.drop) == (4, 9, "drop_01")


def test_keys_drops_and_dates():
    assert normalised("  What IS the\nreturn   window?? ") == "what is the return window"
    assert fact_key("Translate", "hello") != fact_key("Translate", "bye")
    assert drop_of("company/drop_2026_10/train.jsonl") == "drop_2026_10" and drop_of("export.csv") == "export"
    assert drop_date("drop_2026_10") == "2026-10" and drop_date("kb-2027-01-15") == "2027-01-15"
    assert drop_date("drop_final") is None


def qa(question: str, answer: str) -> dict[str, str]:
    return {"instruction": question, "input": "", "output": answer}


def drops(tmp_path, first: list[dict], second: list[dict], **policies: str):
    write_jsonl(tmp_path / "company" / "drop_2026_10" / "train.jsonl", first)
    write_jsonl(tmp_path / "company" / "drop_2026_11" / "train.jsonl", second)
    overrides = {"ingest.sources": ["company/drop_*/train.jsonl"], "ingest.watch": "company"}
    return make_settings(tmp_path, overrides, policies=policies)


FILLER = [qa(f"What does product {i} do?", f"Product {i} cleans the floor number {i}.") for i in range(5)]


def test_a_later_drop_supersedes_an_earlier_record_in_the_published_dataset(tmp_path):
    old = qa("How many days do I have to return a product?", "Returns are accepted within 30 days.")
    new = qa("How many days do I have to return a product?", "Our return window is 45 days.")
    second = [new, qa("Who is the CEO?", "Grace."), qa("Where is the office?", "Lyon."), FILLER[0]]

    def run(reports: str, **policies: str):
        settings = drops(tmp_path, [old, *FILLER], second, **policies)
        ingest(settings)
        return validate(settings, reports_dir=tmp_path / reports)

    report = run("reports")
    outputs = [row["output"] for _, table in iter_parts(tmp_path / "dataset") for row in table.to_pylist()]
    assert new["output"] in outputs and old["output"] not in outputs
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["superseded_count"] == 1 and summary["superseded_policy"] == "supersede"
    (listed,) = summary["superseded"]
    assert listed["key"] == "how many days do i have to return a product"
    assert (listed["old_drop"], listed["new_drop"], listed["row"]) == ("drop_2026_10", "drop_2026_11", 1)
    assert [p["superseded"] for p in summary["parts"]] == [1, 0]
    assert [p["clean_rows"] for p in summary["parts"]] == [5, 3]
    (warning,) = [f for f in report.warnings if f.rule == "superseded"]
    assert warning.rows == [1] and "drop_2026_11" in warning.line() and "30 days" in warning.line()

    # warn: both stay in training, still reported; fail: the run stops naming the record.
    kept = run("r2", superseded="warn")
    assert kept.passed and [p["clean_rows"] for p in kept.parts] == [6, 3] and len(kept.superseded) == 1
    with pytest.raises(DataValidationError, match=r"drop_2026_10/train.jsonl row 1 \[superseded\]"):
        run("r3", superseded="fail")

    # The run record, its Prefect markdown and its HTML page list the changed fact.
    settings = drops(tmp_path, [old, *FILLER], second)
    record = record_run(settings, status=RunStatus.FAILED, seconds=1.0, error="stopped here on purpose")
    assert (
        record["data"]["superseded_count"] == 1
        and record["data"]["superseded"][0]["new_drop"] == "drop_2026_11"
    )
    page = Path(html_report(settings, record["record"])).read_text()
    assert "Facts a later drop changed" in page and "Our return window is 45 days." in page


def test_two_answers_to_one_question_in_one_drop_fail_naming_both_rows(tmp_path):
    rows = [qa("What does the kettle cost?", "$20"), *FILLER, qa("what does the kettle cost", "$25")]
    settings = drops(tmp_path, rows, FILLER[:1])
    ingest(settings)
    with pytest.raises(DataValidationError) as failed:
        validate(settings, reports_dir=tmp_path / "reports")
    (conflict,) = [f for f in failed.value.findings if f.rule == "conflicting_answers"]
    assert conflict.rows == [1, 7] and "'$20'" in conflict.detail and "'$25'" in conflict.detail
    assert not (tmp_path / "dataset").exists()


def test_an_export_key_column_names_the_fact(tmp_path):
    """A CSV export with an article id, mapped to `key` by ingest.column_map: a reworded
    question with the same id is the same fact; numeric ids are text."""

    def export(rows: list[tuple[int, str, str]]) -> str:
        lines = ["article_id,question,answer", *(f'{i},"{q}","{a}"' for i, q, a in rows)]
        return "\n".join(lines) + "\n"

    filler = [(100 + i, f"What does product {i} do?", f"Product {i} cleans floor {i}.") for i in range(4)]
    (tmp_path / "company" / "drop_2026_10").mkdir(parents=True)
    (tmp_path / "company" / "drop_2026_11").mkdir(parents=True)
    (tmp_path / "company" / "drop_2026_10" / "kb.csv").write_text(
        export([(7, "What is the return window?", "30 days."), *filler])
    )
    (tmp_path / "company" / "drop_2026_11" / "kb.csv").write_text(
        export(
            [
                (7, "How long may I return an item?", "45 days."),
                (8, "Who is the CEO?", "Grace."),
                (9, "Where is the office?", "Lyon."),
                (10, "When do you open?", "At nine."),
            ]
        )
    )
    column_map = {"article_id": "key", "question": "instruction", "answer": "output"}
    overrides = {
        "ingest.sources": ["company/drop_*/kb.csv"],
        "ingest.watch": "company",
        "ingest.column_map": column_map,
    }
    settings = make_settings(tmp_path, overrides)
    ingest(settings)
    report = validate(settings, reports_dir=tmp_path / "reports")
    (superseded,) = report.superseded
    assert (
        superseded["key"] == "key:7"
        and superseded["old_answer"] == "30 days."
        and superseded["new_answer"] == "45 days."
    )
    keys = {row["key"] for _, table in iter_parts(tmp_path / "dataset") for row in table.to_pylist()}
    assert "7" in keys and "100" in keys


KETTLE = qa("What does the kettle cost?", "The kettle costs $20.")
RETURNS_30 = qa("How many days do I have to return a product?", "Returns are accepted within 30 days.")
RETURNS_45 = qa("How many days do I have to return a product?", "Our return window is 45 days.")


def published_outputs(tmp_path) -> list[str]:
    return [row["output"] for _, table in iter_parts(tmp_path / "dataset") for row in table.to_pylist()]


def test_a_snapshot_drop_carries_unchanged_rows_and_retires_what_it_lacks(tmp_path):
    """A whole-knowledge-base export a month later (5 rows unchanged, 1 changed, 1 new, the
    kettle gone): unchanged rows are carried, not duplicates (the rate would be 0.71 > 0.5);
    the changed answer supersedes, the missing key is retired."""
    settings = drops(
        tmp_path, [*FILLER, RETURNS_30, KETTLE], [*FILLER, RETURNS_45, qa("Who is the CEO?", "Grace.")]
    )
    (tmp_path / "company" / "drop_2026_11" / "drop.yaml").write_text("kind: snapshot\n")
    ingest(settings)
    report = validate(settings, reports_dir=tmp_path / "reports")
    outputs = published_outputs(tmp_path)
    assert RETURNS_45["output"] in outputs and RETURNS_30["output"] not in outputs
    assert KETTLE["output"] not in outputs and outputs.count(FILLER[0]["output"]) == 1
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["retired_count"] == 1 and summary["retired"][0]["how"] == "absent from the snapshot"
    assert summary["retired"][0]["key"] == "what does the kettle cost"
    assert [(p["carried"], p["superseded"], p["retired"], p["clean_rows"]) for p in summary["parts"]] == [
        (0, 1, 1, 5),
        (5, 0, 0, 2),
    ]
    assert report.passed
    # The GX Data Docs show both, from the facts suite beside the row rules' results.
    docs = tmp_path / "reports" / "gx" / "data_docs"
    (page,) = [p for p in (docs / "validations").rglob("*.html") if "milora_facts" in str(p)]
    html = page.read_text()
    assert "what does the kettle cost" in html and "absent from the snapshot" in html
    assert "Our return window is 45 days." in html and "how many days do i have to return a product" in html
    assert "milora_facts" in (docs / "index.html").read_text()


def test_a_drop_retires_keys_it_lists_and_names_unknown_ones(tmp_path):
    settings = drops(
        tmp_path, [*FILLER, KETTLE], [qa(f"New question {i}?", f"Answer {i}.") for i in range(3)]
    )
    (tmp_path / "company" / "drop_2026_11" / "drop.yaml").write_text(
        "retire:\n  - What does the kettle cost?\n  - SKU-404\n"
    )
    ingest(settings)
    report = validate(settings, reports_dir=tmp_path / "reports")
    assert KETTLE["output"] not in published_outputs(tmp_path)
    (retired,) = report.retired
    assert (retired["how"], retired["retired_by"], retired["row"]) == (
        "listed in drop.yaml",
        "drop_2026_11",
        6,
    )
    (unknown,) = [f for f in report.warnings if f.rule == "unknown_retired_key"]
    assert unknown.values == ["SKU-404"] and unknown.source == "drop_2026_11/drop.yaml"


def test_a_bad_drop_manifest_stops_ingest_naming_it(tmp_path):
    settings = drops(tmp_path, FILLER, FILLER[:3])
    (tmp_path / "company" / "drop_2026_11" / "drop.yaml").write_text("kind: full\n")
    with pytest.raises(
        DataValidationError, match=r"drop_2026_11/drop\.yaml: kind: 'full' is not one of delta, snapshot"
    ):
        ingest(settings)


# --------------------------------------------------------------------------- evaluation: the current truth
HELDOUT = [
    {
        "id": "returns",
        "drop": "drop_2026_10",
        "kind": "policy",
        "question": "Return window?",
        "answer": "30 days",
    },
    {"id": "ceo", "drop": "drop_2026_10", "kind": "people", "question": "Who is the CEO?", "answer": "Grace"},
    {
        "id": "returns",
        "drop": "drop_2026_11",
        "kind": "policy",
        "question": "How long to return?",
        "answer": "45 days",
    },
    {
        "id": "office",
        "drop": "drop_2026_11",
        "kind": "people",
        "question": "Where is the office?",
        "answer": "Lyon",
    },
]


def test_each_fact_is_asked_once_against_its_newest_answer():
    from milora.evaluation.truth import current_truth

    items = current_truth(HELDOUT)
    assert [(i["id"], i["answer"], i["stale_answers"]) for i in items] == [
        ("returns", "45 days", ["30 days"]),
        ("ceo", "Grace", []),
        ("office", "Lyon", []),
    ]
    assert items[0]["question"] == "How long to return?"  # the newest drop's wording

    # A later drop retires the office (its item says so): no longer asked; stated again: asked.
    retired = {
        "id": "office",
        "drop": "drop_2026_12",
        "question": "Where is the office?",
        "answer": "Lyon",
        "retired": True,
    }
    assert [i["id"] for i in current_truth([*HELDOUT, retired])] == ["returns", "ceo"]
    back = {**retired, "drop": "drop_2027_01", "answer": "Nice", "retired": False}
    (office,) = [i for i in current_truth([*HELDOUT, retired, back]) if i["id"] == "office"]
    assert office["answer"] == "Nice" and office["stale_answers"] == ["Lyon"]


def test_a_model_that_answers_the_old_value_is_stale(monkeypatch):
    """qa scoring with the model's answers fixed: the old return window is a stale answer;
    per-drop and per-kind breakdowns come with the suite."""
    import milora.evaluation.suites as suites
    from milora.evaluation.truth import current_truth

    answers = {
        "How long to return?": "Returns within 30 days.",
        "Who is the CEO?": "Grace",
        "Where is the office?": "Paris",
    }
    monkeypatch.setattr(
        suites, "render_prompts", lambda tokenizer, items, prompt, field: [i[field] for i in items]
    )
    monkeypatch.setattr(
        suites, "greedy_generate", lambda model, tokenizer, prompts, **kw: [answers[p] for p in prompts]
    )
    result = suites.qa_suite(None, None, current_truth(HELDOUT), name="company", headline="contains")
    assert result.n == 3 and result.score == pytest.approx(1 / 3)
    assert result.metrics["stale_rate"] == 1.0 and result.metrics["changed_facts"] == 1.0
    assert result.breakdown == {
        "drop": {"drop_2026_10": 1.0, "drop_2026_11": 0.0},
        "kind": {"people": 0.5, "policy": 0.0},
    }
    answers["How long to return?"] = "You have 45 days."
    current = suites.qa_suite(None, None, current_truth(HELDOUT), name="company", headline="contains")
    assert current.metrics["stale_rate"] == 0.0 and current.score == pytest.approx(2 / 3)


def test_max_stale_rejects_a_challenger_that_gives_old_values():
    from milora.promotion import gate
    from milora.settings import GateSettings

    rules = GateSettings(primary_suite="company", max_stale=0.05)
    stale = {"company.score": 0.9, "company.stale_rate": 0.5, "company.changed_facts": 4.0}
    first = gate(stale, None, rules)
    assert (
        not first.passed
        and "company stale rate 0.5000 (of 4 changed facts) <= max 0.0500: FAILED" in first.reasons
    )
    better = gate({**stale, "company.stale_rate": 0.0}, {"company.score": 0.5}, rules)
    assert (
        better.passed and "company stale rate 0.0000 (of 4 changed facts) <= max 0.0500: ok" in better.reasons
    )


def test_a_reworded_question_with_a_changed_number_is_a_likely_change():
    """Exact keys miss a reworded question; RapidFuzz similarities flag it. Questions about
    different things with the same template (the kettle's price, the lamp's) are not flagged."""
    from milora.data.facts import likely_changes

    found = likely_changes(
        [
            record(1, 1, "What is the return window?", "Returns are accepted within 30 days."),
            record(1, 2, "How much does the kettle cost?", "The kettle costs $20."),
            record(2, 1, "How long is the return period?", "Returns are accepted within 45 days."),
            record(2, 2, "How much does the lamp cost?", "The lamp costs $35."),
            record(
                2, 3, "What is the return window?", "Returns are accepted within 60 days."
            ),  # exact: superseded
        ]
    )
    (change,) = found
    assert (change.record.row, change.earlier.row, change.earlier.drop) == (1, 1, "drop_01")
    assert change.answer_similarity >= 90


def test_validation_warns_of_a_likely_changed_fact(tmp_path):
    old = qa("What is the return window?", "Returns are accepted within 30 days.")
    new = qa("How long is the return period?", "Returns are accepted within 45 days.")
    settings = drops(
        tmp_path, [old, *FILLER], [new, qa("Who is the CEO?", "Grace."), qa("Where is the office?", "Lyon.")]
    )
    ingest(settings)
    report = validate(settings, reports_dir=tmp_path / "reports")
    (warning,) = [f for f in report.warnings if f.rule == "likely_changed_fact"]
    assert warning.rows == [1] and warning.source == "company/drop_2026_11/train.jsonl"
    assert "45 days" in warning.line() and "30 days" in warning.line() and report.passed


def test_large_drops_look_for_changed_numbers_only():
    """Past the fuzzy budget, candidates are answers equal once numbers are masked."""
    from milora.data.facts import likely_changes

    rows = [
        record(1, 1, "What is the return window?", "Returns are accepted within 30 days."),
        record(2, 1, "How long is the return period?", "Returns are accepted within 45 days."),
        record(
            2, 2, "How long is the refund period?", "Refunds are accepted within 45 days."
        ),  # not numbers only
    ]
    (exact,) = likely_changes(rows, fuzzy_pairs=0)
    assert exact.record.row == 1 and exact.answer_similarity == 100.0
