"""The Great Expectations gate: every bad input the issue lists, each with its rule and row.

Each case writes a small file, runs ingest + the real GX checkpoint (``check_files``, as
``python -m tasks.validate PATH`` does) and asserts the rule and the row numbers reported.
One reports folder is shared so the GX context is built once per session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import BOOLQ_TEMPLATE, GSM_ANSWER, REPO, alpaca, chat, make_settings, write_jsonl

from milora.data.dataset import load_messages, read_manifest
from milora.data.errors import DataValidationError, Finding
from tasks import run_command
from tasks.ingest import ingest
from tasks.validate import (
    FACT_COLUMNS,
    FACTS_SUITE,
    GX_COLUMNS,
    SUITE,
    _facts_spec,
    _suite_spec,
    check_files,
    main,
    validate,
)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reports")


def good(n: int = 6) -> list[dict[str, str]]:
    return [alpaca(i) for i in range(n)]


def fails(
    tmp_path: Path,
    reports: Path,
    rows: list[Any],
    overrides: dict[str, Any] | None = None,
    name: str = "drop.jsonl",
):
    """Check a JSONL file that must fail; returns the findings by rule."""
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DataValidationError) as caught:
        check_files(make_settings(tmp_path, overrides), [path], reports)
    return {f.rule: f for f in caught.value.findings}, caught.value


def only(findings: dict[str, Finding], rule: str, rows: list[int]) -> Finding:
    """Exactly ``rule`` broke, at ``rows``, in the checked file."""
    assert list(findings) == [rule], findings
    finding = findings[rule]
    assert finding.rows == rows and finding.source == "drop.jsonl" and finding.policy == "fail"
    return finding


# --------------------------------------------------------------------------- passes
def test_valid_file_passes_and_is_published(tmp_path, reports):
    rows = good(8) + [chat(i) for i in range(4)]
    path = write_jsonl(tmp_path / "drop.jsonl", rows)
    settings = make_settings(tmp_path, {"ingest.sources": ["drop.jsonl"]})
    ingest(settings)
    report = validate(settings, reports_dir=reports)
    assert report.passed and report.rows == 12 and report.quarantined == 0 and not report.warnings
    manifest = read_manifest(tmp_path / "dataset")
    assert manifest["rows"] == 12
    conversations = load_messages(tmp_path / "dataset", "train") + load_messages(
        tmp_path / "dataset", "validation"
    )
    assert len(conversations) == 12 and conversations[0][-1]["role"] == "assistant"
    assert (reports / "gx" / "data_docs" / "index.html").is_file()
    assert json.loads((reports / "summary.json").read_text())["passed"] is True
    assert path.exists()

    # Same content again: the published dataset is byte-identical (same DVC hash).
    before = {p: p.read_bytes() for p in (tmp_path / "dataset").rglob("*") if p.is_file()}
    validate(settings, reports_dir=reports)
    assert before == {p: p.read_bytes() for p in (tmp_path / "dataset").rglob("*") if p.is_file()}


def test_command_exit_codes(tmp_path, reports, capsys):
    ok = write_jsonl(tmp_path / "ok.jsonl", good())
    bad = write_jsonl(tmp_path / "bad.jsonl", [*good(), {"instruction": "x"}])
    params = str(make_settings(tmp_path).root / "params.yaml")
    for path, code in ((ok, 0), (bad, 1)):
        with pytest.raises(SystemExit) as exited:
            run_command(lambda p=path: main([str(p), "--params", params, "--reports", str(reports)]))
        assert exited.value.code == code
    err = capsys.readouterr().err
    assert "bad.jsonl row 7 [required_fields]" in err and "Data Docs:" in err
    with pytest.raises(SystemExit) as exited:
        run_command(lambda: main([str(ok), "--params", params, "--policy", "pii_email=drop"]))
    assert exited.value.code == 2 and "'drop' is not a policy" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input
def test_empty_file(tmp_path, reports):
    (tmp_path / "drop.jsonl").write_bytes(b"")
    with pytest.raises(DataValidationError) as caught:
        check_files(make_settings(tmp_path), [tmp_path / "drop.jsonl"], reports)
    assert caught.value.rules() == ["empty_file"] and caught.value.findings[0].source == "drop.jsonl"


def test_truncated_json_line_among_good_ones(tmp_path, reports):
    line = json.dumps(alpaca(99))[:40]
    findings, error = fails(tmp_path, reports, [*good(3), line, *good(6)[3:]])
    finding = only(findings, "malformed_row", [4])
    assert "not valid JSON" in finding.values[0]
    assert "drop.jsonl row 4 [malformed_row]" in str(error)


def test_missing_field(tmp_path, reports):
    findings, _ = fails(
        tmp_path, reports, [*good(4), {"instruction": "What is the warranty?", "input": ""}, alpaca(5)]
    )
    assert only(findings, "required_fields", [5]).values == ["output"]


def test_blank_response(tmp_path, reports):
    findings, _ = fails(
        tmp_path, reports, [*good(5), {"instruction": "Hello?", "input": "", "output": "  \n "}]
    )
    assert only(findings, "empty_text", [6]).values == ["output is blank"]


def test_wrong_types(tmp_path, reports):
    rows = [*good(4), {"instruction": ["a", "list"], "output": "x"}, {"instruction": "Count?", "output": 42}]
    findings, _ = fails(tmp_path, reports, rows)
    assert only(findings, "wrong_type", [5, 6]).values == ["instruction is a list", "output is a number"]


def test_file_of_duplicates(tmp_path, reports):
    findings, _ = fails(tmp_path, reports, [alpaca(1)] * 10)
    assert (
        findings["duplicate_rate"].detail
        == "share of exact duplicates above the bound: observed 0.9, expected <= 0.5"
    )
    assert findings["duplicate_rate"].source == "drop.jsonl"


def test_bytes_that_are_not_utf8(tmp_path, reports):
    raw = json.dumps(alpaca(50)).encode().replace(b"router", b"rout\xff\xfer", 1)
    findings, _ = fails(tmp_path, reports, [*good(2), raw, *good(5)[2:]])
    assert only(findings, "invalid_utf8", [3]).values == ["instruction: b'\\xff\\xfe' at character 32"]


def test_one_enormous_row(tmp_path, reports):
    huge = {"instruction": "Summarise this.", "input": "word " * 20000, "output": "ok"}
    findings, _ = fails(
        tmp_path, reports, [*good(3), huge, *good(5)[3:]], {"validate.policies.max_tokens": "fail"}
    )
    finding = only(findings, "max_tokens", [4])
    assert int(finding.values[0]) > 256


def test_enormous_row_is_quarantined_by_default(tmp_path, reports):
    huge = {"instruction": "Summarise this.", "input": "word " * 20000, "output": "ok"}
    path = write_jsonl(tmp_path / "drop.jsonl", [*good(3), huge, *good(5)[3:]])
    report = check_files(make_settings(tmp_path), [path], reports)
    assert report.passed and report.quarantined == 1 and report.rows == 5
    (row,) = [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]
    assert row["rules"] == ["max_tokens"] and row["source_row"] == 4 and row["reasons"][0].endswith("> 256")


@pytest.mark.parametrize(
    ("rule", "text", "value"),
    [
        ("pii_email", "Write to jane.doe@example.com for a refund.", "output: j***@example.com"),
        ("pii_phone", "Call me back on +44 20 7946 0958 please.", "output: +** ** **** **58"),
        ("pii_card", "My card is 4111-1111-1111-1111, charge it.", "output: ****-****-****-1111"),
    ],
)
def test_pii(tmp_path, reports, rule, text, value):
    row = {"instruction": "Reply to the customer.", "input": "", "output": text}
    findings, error = fails(
        tmp_path, reports, [*good(2), row, *good(5)[2:]], {f"validate.policies.{rule}": "fail"}
    )
    assert only(findings, rule, [3]).values == [value]
    assert "jane.doe" not in str(error) and "4111-1111-1111-1111" not in str(error)  # masked


def test_pii_is_quarantined_by_default_and_run_goes_on(tmp_path, reports):
    rows = [*good(5), {"instruction": "Who?", "input": "", "output": "Ask bob@example.org"}]
    report = check_files(make_settings(tmp_path), [write_jsonl(tmp_path / "drop.jsonl", rows)], reports)
    assert report.passed and [(w.rule, w.rows) for w in report.warnings] == [("pii_email", [6])]
    (row,) = [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]
    assert row["rules"] == ["pii_email"] and row["reasons"] == ["output: b***@example.org"]


def test_quarantine_below_minimum_fails(tmp_path, reports):
    rows = [
        *good(3),
        *({"instruction": "Who?", "input": "", "output": f"Ask user{i}@example.org"} for i in range(3)),
    ]
    findings, _ = fails(tmp_path, reports, rows, {"validate.min_rows": 4})
    assert list(findings) == ["min_rows"] and "only 3 clean new rows" in findings["min_rows"].detail


def test_chat_with_unknown_role(tmp_path, reports):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    findings, _ = fails(tmp_path, reports, [chat(1), chat(2), bad, chat(3), chat(4)])
    assert only(findings, "chat_roles", [3]).values[0].startswith("messages[1] has unknown role 'bot'")


def test_chat_with_empty_assistant_turn(tmp_path, reports):
    bad = chat(9)
    bad["messages"][2]["content"] = " "
    findings, _ = fails(tmp_path, reports, [chat(1), chat(2), chat(3), bad, chat(4)])
    assert only(findings, "empty_text", [4]).values == ["messages[2] (assistant) is blank"]


def test_csv_header_matching_no_schema(tmp_path, reports):
    (tmp_path / "drop.csv").write_text("question,reply\nWhere?,Here.\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as caught:
        check_files(make_settings(tmp_path), [tmp_path / "drop.csv"], reports)
    (finding,) = caught.value.findings
    assert (finding.rule, finding.source, finding.rows) == ("unknown_schema", "drop.csv", [1])
    assert "['question', 'reply']" in finding.detail and "column_map" in finding.detail


def test_csv_with_mapped_columns_passes(tmp_path, reports):
    (tmp_path / "drop.csv").write_text(
        "question,reply\n" + "".join(f"Where is {i}?,Here is {i}.\n" for i in range(5)), encoding="utf-8"
    )
    settings = make_settings(tmp_path, {"ingest.column_map": {"question": "instruction", "reply": "output"}})
    assert check_files(settings, [tmp_path / "drop.csv"], reports).rows == 5


def test_json_object_that_is_not_a_list(tmp_path, reports):
    (tmp_path / "drop.json").write_text(json.dumps({"records": good(3)}), encoding="utf-8")
    with pytest.raises(DataValidationError) as caught:
        check_files(make_settings(tmp_path), [tmp_path / "drop.json"], reports)
    (finding,) = caught.value.findings
    assert (finding.rule, finding.source) == (
        "not_records",
        "drop.json",
    ) and "keys: records" in finding.detail


def test_row_copied_from_a_benchmark(tmp_path, reports):
    copied = {
        "instruction": BOOLQ_TEMPLATE.format(q="can penguins fly over the sea"),
        "input": "",
        "output": "false",
    }
    solved = {"instruction": "Explain how many clips.", "input": "", "output": GSM_ANSWER}
    findings, _ = fails(
        tmp_path,
        reports,
        [*good(2), copied, *good(4)[2:], solved],
        {"validate.policies.contamination": "fail"},
    )
    finding = only(findings, "contamination", [3, 6])
    assert finding.values[0].endswith("boolq.json item 2 (exact prompt)")
    assert finding.values[1].endswith("gsm8k_test.jsonl item 1 (shares a 13-word passage)")


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "benchmarks").is_dir(), reason="shared benchmarks not present"
)
def test_row_copied_from_the_shared_benchmarks(tmp_path, reports):
    item = json.loads((REPO.parent / "shared" / "benchmarks" / "commonsense" / "piqa.json").read_text())[7]
    copied = {"instruction": item["instruction"], "input": "", "output": item["output"]}
    rows = [*good(3), copied, *good(5)[3:]]
    shared = {
        "validate.contamination.benchmarks": ["../shared/benchmarks"],
        "validate.policies.contamination": "fail",
    }
    settings = make_settings(tmp_path, shared)
    settings = settings.model_copy(update={"root": REPO})  # ../shared/benchmarks from the repo root
    path = write_jsonl(tmp_path / "drop.jsonl", rows)
    with pytest.raises(DataValidationError) as caught:
        check_files(settings, [path], reports)
    (finding,) = caught.value.findings
    assert finding.rule == "contamination" and finding.rows == [4]
    assert "piqa.json item 8" in finding.values[0]


def test_control_characters(tmp_path, reports):
    bad = {"instruction": "Ring the bell\x07 twice", "input": "", "output": "Done."}
    findings, _ = fails(tmp_path, reports, [*good(4), bad, alpaca(7)])
    assert only(findings, "control_chars", [5]).values == ["instruction: '\\x07' at character 13"]


def test_special_tokens_written_as_text_are_quarantined(tmp_path, reports):
    """A literal EOS in an answer would end it there in training: the row is set aside, named."""
    bad = {"instruction": "How do I end a reply?", "input": "", "output": "Type </s> at the end."}
    rows = [*good(5), bad]
    report = check_files(make_settings(tmp_path), [write_jsonl(tmp_path / "drop.jsonl", rows)], reports)
    assert report.passed and [(w.rule, w.rows) for w in report.warnings] == [("special_tokens", [6])]
    (row,) = [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]
    assert row["rules"] == ["special_tokens"] and row["reasons"] == ["output: '</s>' at character 5"]


def test_special_tokens_in_a_chat_turn_fail_under_the_fail_policy(tmp_path, reports):
    turns = chat(9)["messages"]
    turns[1] = {"role": "user", "content": "Where is it?<s> Answer fast"}
    rows = [chat(i) for i in range(4)] + [{"messages": turns}]
    findings, _ = fails(tmp_path, reports, rows, {"validate.policies.special_tokens": "fail"})
    assert only(findings, "special_tokens", [5]).values == ["messages[1] (user): '<s>' at character 12"]


# --------------------------------------------------------------------------- the gate itself
def test_failure_touches_nothing_downstream(tmp_path, reports):
    write_jsonl(tmp_path / "drop.jsonl", good(6))
    settings = make_settings(tmp_path, {"ingest.sources": ["drop.jsonl"]})
    ingest(settings)
    validate(settings, reports_dir=reports)
    published = {p: p.read_bytes() for p in (tmp_path / "dataset").rglob("*") if p.is_file()}

    write_jsonl(tmp_path / "drop.jsonl", [*good(6), {"instruction": "x", "input": "", "output": ""}])
    ingest(settings)
    with pytest.raises(DataValidationError) as caught:
        validate(settings, reports_dir=reports)
    assert caught.value.rules() == ["empty_text"] and caught.value.data_docs.endswith("data_docs/index.html")
    assert published == {p: p.read_bytes() for p in (tmp_path / "dataset").rglob("*") if p.is_file()}
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["passed"] is False and summary["failures"][0]["rows"] == [7]
    assert not list(tmp_path.glob(".dataset*")) and not list(reports.glob(".*tmp*"))
    assert any((reports / "gx" / "data_docs" / "validations").rglob("*.html"))


def test_warn_policy_keeps_rows(tmp_path, reports):
    rows = [*good(5), {"instruction": "Who?", "input": "", "output": "Ask bob@example.org"}]
    settings = make_settings(tmp_path, {"validate.policies.pii_email": "warn"})
    report = check_files(settings, [write_jsonl(tmp_path / "drop.jsonl", rows)], reports)
    assert (
        report.passed and report.rows == 6 and report.quarantined == 0 and report.warnings[0].policy == "warn"
    )


@pytest.mark.parametrize(
    ("name", "spec", "columns"), [(SUITE, _suite_spec, GX_COLUMNS), (FACTS_SUITE, _facts_spec, FACT_COLUMNS)]
)
def test_committed_suite_matches_the_rules(name, spec, columns):
    """The suites in gx/ are the ones the code describes (regenerate with --init-gx)."""
    suite = json.loads((REPO / "gx" / "expectations" / f"{name}.json").read_text())
    committed = [
        (e["type"], {k: v for k, v in e["kwargs"].items()}, e["meta"]["rule"]) for e in suite["expectations"]
    ]
    expected = [
        ("expect_" + "_".join(w.lower() for w in _split_camel(name)[1:]), kwargs, rule)
        for name, kwargs, rule in spec()
    ]
    assert [(t, r) for t, _, r in committed] == [(t, r) for t, _, r in expected]
    for (_, got, _), (_, want, _) in zip(committed, expected, strict=True):
        assert {k: got[k] for k in want} == want
    assert committed[0][1]["column_set"] == columns


def _split_camel(name: str) -> list[str]:
    import re

    return re.findall(r"[A-Z][a-z]*", name)


# --------------------------------------------------------------------------- replay
def test_replay_data_passes_the_same_row_rules_and_no_fact_rule(tmp_path, reports):
    """General data (ingest.replay) is its own part: contamination and PII quarantined as in a
    drop; a general row answering a company question otherwise supersedes nothing, it is
    quarantined (replay_conflict); one answering it alike is a duplicate of the company row."""
    from milora.data.dataset import REPLAY

    write_jsonl(tmp_path / "company" / "drop_2026_10" / "train.jsonl", good(6))
    general = [chat(i) for i in range(6)] + [
        {
            "instruction": BOOLQ_TEMPLATE.format(q="can penguins fly over the sea"),
            "input": "",
            "output": "no",
        },
        {"instruction": "Who answers mail?", "input": "", "output": "Write to jane.doe@example.com."},
        {**alpaca(0), "output": "A general answer to the company's question."},
        alpaca(1),
    ]
    write_jsonl(tmp_path / "general" / "chats.jsonl", general)
    replay = {"sources": ["general/*.jsonl"], "watch": "general"}
    settings = make_settings(
        tmp_path,
        {
            "ingest.sources": ["company/drop_*/train.jsonl"],
            "ingest.watch": "company",
            "ingest.replay": replay,
        },
    )
    ingest(settings)
    report = validate(settings, reports_dir=reports)
    assert report.passed and not report.superseded
    summary = json.loads((reports / "summary.json").read_text())
    (company, general_part) = summary["parts"]
    assert company["role"] == "company" and company["clean_rows"] == 6
    assert general_part["role"] == REPLAY and general_part["quarantined"] == 3
    assert {(w.rule, w.source, tuple(w.rows)) for w in report.warnings} == {
        ("contamination", "general/chats.jsonl", (7,)),
        ("pii_email", "general/chats.jsonl", (8,)),
        ("replay_conflict", "general/chats.jsonl", (9,)),
    }
    dataset = tmp_path / "dataset"
    assert [p["role"] for p in read_manifest(dataset)["parts"]] == ["company", REPLAY]
    every = {
        role: load_messages(dataset, "train", role) + load_messages(dataset, "validation", role)
        for role in ("company", REPLAY)
    }
    assert len(every["company"]) == 6 and len(every[REPLAY]) == 6  # the agreeing row: a duplicate
    assert all("general answer" not in c[-1]["content"] for c in every["company"])


def test_replay_source_outside_its_watched_folder_is_refused(tmp_path):
    from milora.settings import SettingsError

    write_jsonl(tmp_path / "company" / "drop.jsonl", good(6))
    write_jsonl(tmp_path / "general.jsonl", [chat(i) for i in range(6)])
    settings = make_settings(
        tmp_path,
        {
            "ingest.sources": ["company/*.jsonl"],
            "ingest.watch": "company",
            "ingest.replay": {"sources": ["general.jsonl"], "watch": "company"},
        },
    )
    with pytest.raises(
        SettingsError,
        match=r"ingest\.replay\.sources: general\.jsonl lies outside ingest\.replay\.watch \(company\)",
    ):
        ingest(settings)
    missing = make_settings(
        tmp_path, {"ingest.sources": ["company/*.jsonl"], "ingest.replay": {"sources": ["nowhere/*.jsonl"]}}
    )
    with pytest.raises(DataValidationError, match=r"ingest\.replay\.sources: no file found"):
        ingest(missing)
