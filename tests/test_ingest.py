"""Ingest and the data library: settings, readers, normalisation, dataset bytes, row checks.

No Great Expectations here (see test_validate.py); helpers at the top are shared with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    BOOLQ_TEMPLATE,
    GSM_ANSWER,
    REPO,
    alpaca,
    benchmark_dir,
    chat,
    make_settings,
    tokenizer_dir,
    write_jsonl,
)

from milora.atomic import mark_output
from milora.data import pii
from milora.data.checks import chat_roles, control_chars, row_checks
from milora.data.contamination import BenchmarkIndex, benchmark_files, words
from milora.data.dataset import iter_parts, read_manifest
from milora.data.errors import DataValidationError
from milora.data.normalise import FieldMapping, clean_text, normalise, split_of
from milora.data.readers import RawRow, iter_rows
from milora.settings import SettingsError, load_settings
from tasks import retry_on_io_error
from tasks.ingest import ingest


def part_rows(folder: Path) -> list[dict[str, Any]]:
    return [row for _, table in iter_parts(folder) for row in table.to_pylist()]


# --------------------------------------------------------------------------- settings
def test_repository_params_parse():
    settings = load_settings(REPO / "params.yaml")
    assert settings.base_model == "data/demo/base_model"
    assert settings.ingest.sources and settings.validation.policy("pii_card") == "quarantine"
    assert settings.validation.policy("required_fields") == "fail"
    assert settings.tokenizer_path == REPO / "data" / "demo" / "base_model"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"validate": {"min_rowz": 3}}, r"validate\.min_rowz: unknown key"),
        (
            {"validate": {"policies": {"pii_email": "drop"}}},
            r"validate\.policies: pii_email: 'drop' is not a policy",
        ),
        (
            {"validate": {"policies": {"empty_file": "quarantine"}}},
            r"empty_file: 'quarantine' is not a policy for a file rule",
        ),
        ({"validate": {"policies": {"nope": "fail"}}}, r"unknown rule 'nope'"),
        (
            {"ingest": {"validation_fraction": 1.5}},
            r"ingest\.validation_fraction: Input should be less than 1",
        ),
        ({"ingest": {"column_map": {"q": "question"}}}, r"ingest\.column_map: maps to unknown field"),
        ({"validate": {"pii_allow": ["("]}}, r"validate\.pii_allow: '\(' is not a regular expression"),
        ({"trian": {}}, r"trian: unknown key"),
    ],
)
def test_bad_params_name_the_key(tmp_path, params, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(SettingsError, match=message):
        load_settings(path)


def test_overrides_and_missing_file(tmp_path):
    settings = make_settings(tmp_path, {"validate.policies.pii_email": "warn"})
    assert settings.validation.policy("pii_email") == "warn"
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- normalising
def test_same_content_same_id_across_formats():
    plain = normalise(RawRow(1, {"instruction": "Hi", "input": "", "output": "Hello"}))
    as_chat = normalise(
        RawRow(
            2, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        )
    )
    as_prompt = normalise(RawRow(3, {"prompt": " Hi\r\n", "completion": "Hello "}))
    assert plain["record_id"] == as_chat["record_id"] == as_prompt["record_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", plain["record_id"])
    assert plain["messages"] == as_chat["messages"]
    assert as_chat["instruction"] == "Hi" and as_chat["output"] == "Hello"


def test_text_normalisation_keeps_control_chars_visible():
    assert clean_text("  e\u0301te\r\nx \n") == ("\u00e9te\nx", None)
    text, note = clean_text("a\x07b ")
    assert text == "a\x07b" and note is None
    text, note = clean_text(b"ok \xff\xfe!".decode("utf-8", "surrogateescape"))
    assert text == "ok \ufffd!" and note == "b'\\xff\\xfe' at character 3"


def test_column_mapping_sharegpt():
    mapping = FieldMapping(
        columns={"conversations": "messages"},
        message_keys={"from": "role", "value": "content"},
        roles={"human": "user", "gpt": "assistant"},
    )
    row = normalise(
        RawRow(1, {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
        mapping,
    )
    assert row["format"] == "chat" and row["messages"] == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_structural_problems_are_noted_not_raised():
    row = normalise(RawRow(4, {"instruction": ["a", "b"], "output": None}))
    assert row["check_wrong_type"] == "instruction is a list" and row["check_required_fields"] == "output"
    assert row["instruction"] == '["a", "b"]'
    row = normalise(RawRow(5, {"messages": [{"role": "user", "content": 7}, "hi"]}))
    assert row["check_wrong_type"] == "messages[0].content is a number; messages[1] is a text"


def test_split_is_stable_and_near_the_fraction():
    ids = [normalise(RawRow(i, alpaca(i)))["record_id"] for i in range(2000)]
    splits = [split_of(rid, 0.1, "salt") for rid in ids]
    assert 0.07 < splits.count("validation") / len(ids) < 0.13
    assert splits == [split_of(rid, 0.1, "salt") for rid in ids]
    assert split_of(ids[0], 0.0) == "train"


# --------------------------------------------------------------------------- readers
def test_every_format_reads_the_same_records(tmp_path):
    records = [alpaca(i) for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "a.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "a.csv").write_text(
        "instruction,input,output\n" + "".join(f'"{r["instruction"]}",,"{r["output"]}"\n' for r in records),
        encoding="utf-8",
    )
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        rows = list(iter_rows(tmp_path / name))
        assert [r.row for r in rows] == [1, 2, 3], name
        assert [normalise(r)["record_id"] for r in rows] == [
            normalise(RawRow(1, r))["record_id"] for r in records
        ], name


# --------------------------------------------------------------------------- ingest
def test_ingest_is_deterministic_and_drops_accumulate(tmp_path):
    drop1 = write_jsonl(tmp_path / "drops" / "2026_10" / "train.jsonl", [alpaca(i) for i in range(30)])
    settings = make_settings(tmp_path, {"ingest.sources": ["drops/*/train.jsonl"]})
    ingest(settings, out_dir=tmp_path / "v1")
    ingest(settings, out_dir=tmp_path / "v1-again")
    part1 = "parts/drops__2026_10__train.jsonl.parquet"
    assert (tmp_path / "v1" / part1).read_bytes() == (tmp_path / "v1-again" / part1).read_bytes()
    assert (tmp_path / "v1" / "manifest.json").read_bytes() == (
        tmp_path / "v1-again" / "manifest.json"
    ).read_bytes()

    # A new month: 20 new rows and 5 repeats of last month's; October's part is untouched.
    write_jsonl(tmp_path / "drops" / "2026_11" / "train.jsonl", [alpaca(i) for i in range(25, 50)])
    report = ingest(settings, out_dir=tmp_path / "v2")
    assert (tmp_path / "v2" / part1).read_bytes() == (tmp_path / "v1" / part1).read_bytes()
    assert [p["rows"] for p in report.parts] == [30, 25] and report.duplicates == 5
    rows = part_rows(tmp_path / "v2")
    assert [r["source_row"] for r in rows if r["duplicate"]] == [1, 2, 3, 4, 5]
    assert {r["source"] for r in rows} == {"drops/2026_10/train.jsonl", "drops/2026_11/train.jsonl"}
    old = {r["record_id"]: r["split"] for r in part_rows(tmp_path / "v1")}
    assert all(old.get(r["record_id"], r["split"]) == r["split"] for r in rows)
    assert drop1.exists()


def test_duplicates_within_a_file_are_flagged_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), alpaca(2), alpaca(1), alpaca(1)])
    report = ingest(make_settings(tmp_path), [path])
    assert report.duplicates == 2
    assert [r["duplicate"] for r in part_rows(report.out_dir)] == [False, False, True, True]


@pytest.mark.parametrize(
    ("name", "content", "rule", "detail"),
    [
        ("empty.jsonl", b"", "empty_file", "empty"),
        ("blank.jsonl", b"\n\n  \n", "empty_file", "no records"),
        ("list.json", b"[]", "empty_file", "no records"),
        (
            "object.json",
            b'{"data": [{"instruction": "a", "output": "b"}]}',
            "not_records",
            "a JSON object (keys: data)",
        ),
        (
            "header.csv",
            b"question,answer\nwhat,that\n",
            "unknown_schema",
            "['question', 'answer'] match no schema",
        ),
        ("keys.jsonl", b'{"q": "a", "a": "b"}\n', "unknown_schema", "match no schema"),
        ("doc.json", b'[{"instruction": "a", "output": "b"}', "unreadable_file", "not valid JSON"),
        ("notes.txt", b"hello", "unreadable_file", "unsupported file type '.txt'"),
    ],
)
def test_files_that_cannot_become_rows(tmp_path, name, content, rule, detail):
    (tmp_path / name).write_bytes(content)
    settings = make_settings(tmp_path)
    (tmp_path / "ingested").mkdir()
    (tmp_path / "ingested" / "keep.txt").write_text("previous version")
    mark_output(tmp_path / "ingested")  # a previous output of the stage
    with pytest.raises(DataValidationError) as caught:
        ingest(settings, [tmp_path / name])
    finding = caught.value.findings[0]
    assert (finding.rule, finding.source) == (rule, name)
    assert detail in finding.detail and f"{name}" in str(caught.value) and f"[{rule}]" in str(caught.value)
    assert (tmp_path / "ingested" / "keep.txt").read_text() == "previous version"  # untouched


def test_warn_policy_skips_an_unreadable_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [alpaca(i) for i in range(3)])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    settings = make_settings(tmp_path, {"validate.policies.empty_file": "warn"})
    report = ingest(settings, [good, tmp_path / "empty.jsonl"])
    assert [p["source"] for p in report.parts] == ["good.jsonl"]
    assert [f.rule for f in report.skipped] == ["empty_file"]
    assert read_manifest(report.out_dir)["rows"] == 3


def test_missing_source_is_reported(tmp_path):
    with pytest.raises(DataValidationError, match=r"\[unreadable_file\].*no such file"):
        ingest(make_settings(tmp_path), [tmp_path / "absent.jsonl"])


def test_prefect_retries_io_errors_only():
    class State:
        def __init__(self, error):
            self.error = error

        def result(self):
            raise self.error

    assert retry_on_io_error(None, None, State(OSError("disk")))
    assert not retry_on_io_error(None, None, State(DataValidationError([])))
    assert not retry_on_io_error(None, None, State(ValueError("bug")))


# --------------------------------------------------------------------------- row checks
def test_pii_detectors():
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    assert pii.find_card("pay with 4111 1111 1111 1111 today") == "**** **** **** 1111"
    assert pii.find_card("order 4111 1111 1111 1112") is None
    assert pii.find_email("mail jane.doe@example.com now") == "j***@example.com"
    assert pii.find_email("write to help@corp.example", pii.allow_pattern([r"help@corp\.example"])) is None
    assert pii.find_phone("call +1 415 555 0134 after six") == "+* *** *** **34"
    assert pii.find_phone("call (415) 555-0134") == "(***) ***-**34"
    for text in (
        "SKU BV-9903 costs $83.",
        "on 2026-10-01 at 10:30",
        "version 1.2.3",
        "host 192.168.100.200",
        "1 000 units",
    ):
        assert pii.find_phone(text) is None and pii.find_card(text) is None, text


def test_chat_role_rules():
    def turns(*roles):
        return [{"role": r, "content": "x"} for r in roles]

    assert chat_roles(turns("system", "user", "assistant", "user", "assistant")) is None
    assert "unknown role 'bot'" in chat_roles(turns("user", "bot"))
    assert "messages[2] is 'user' where 'assistant' belongs" in chat_roles(turns("system", "user", "user"))
    assert "ends with a 'user' turn" in chat_roles(turns("user", "assistant", "user"))
    assert "system turn after the start" in chat_roles(turns("user", "system"))


def test_row_checks_of_a_chat():
    row = normalise(RawRow(1, chat(1)))
    assert all(v is None for v in row_checks(row).values())
    row = normalise(
        RawRow(
            1,
            {"messages": [{"role": "user", "content": "Hi\x1b[31m"}, {"role": "assistant", "content": " "}]},
        )
    )
    checks = row_checks(row)
    assert checks["check_empty_text"] == "messages[1] (assistant) is blank"
    assert checks["check_control_chars"] == "messages[0] (user): '\\x1b' at character 2"
    assert control_chars([("output", "tab\tand\nnewline are fine")]) is None


def test_contamination_index(tmp_path):
    files = benchmark_files([benchmark_dir()], tmp_path)
    index = BenchmarkIndex.load_or_build(files, tmp_path, tmp_path / "cache", n=13, max_item_frequency=2)
    cached = BenchmarkIndex.load_or_build(files, tmp_path, tmp_path / "cache", n=13, max_item_frequency=2)
    copied = BOOLQ_TEMPLATE.format(q="Is the sky BLUE on a clear day")
    same_template = BOOLQ_TEMPLATE.format(q="is our warranty transferable to a new owner")
    rows = [
        ([copied], [copied, "true"]),
        ([same_template], [same_template, "true"]),
        (["Explain the clips."], ["Explain the clips.", "Sure. " + GSM_ANSWER.upper()]),
        (["Hello"], ["Hello", "world"]),
    ]
    for idx in (index, cached):
        found = idx.check(rows)
        assert found[0].how == "exact prompt" and found[0].file.endswith("boolq.json") and found[0].item == 1
        assert found[1] is None  # the shared template alone is not a copy
        assert found[2].how == "shares a 13-word passage" and found[2].file.endswith("gsm8k_test.jsonl")
        assert found[3] is None
    assert words("Janet’s ducks—lay 16_eggs!") == ["janet", "s", "ducks", "lay", "16", "eggs"]


def test_token_counter_matches_the_chat_template():
    from milora.data.tokens import TokenCounter

    counter = TokenCounter(tokenizer_dir())
    conversations = [chat(i)["messages"] for i in range(3)] + [chat(0)["messages"][1:]]
    exact = [
        len(
            counter.tokenizer(
                counter.tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False
            )["input_ids"]
        )
        for c in conversations
    ]
    assert counter.count(conversations).tolist() == exact


def test_optional_benchmark_paths_may_be_absent(tmp_path):
    from milora.data.contamination import benchmark_files

    assert benchmark_files(["missing/benchmarks"], tmp_path, required=False) == []
    with pytest.raises(FileNotFoundError, match="benchmark path missing/benchmarks does not exist"):
        benchmark_files(["missing/benchmarks"], tmp_path)


def test_a_drop_no_source_pattern_reads_cannot_slip_by(tmp_path):
    """Every file in ingest.watch is read, ignored by name, an evaluation file, or an error."""
    write_jsonl(tmp_path / "drops" / "2026_12" / "train.jsonl", [alpaca(i) for i in range(6)])
    write_jsonl(tmp_path / "drops" / "2026_12" / "heldout.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "drops" / ".gitkeep").write_text("")
    suites = {"company": {"kind": "qa", "path": "drops/*/heldout.jsonl"}}
    overrides = {
        "ingest.sources": ["drops/*/train.jsonl"],
        "ingest.watch": "drops",
        "evaluate.suites": suites,
    }
    settings = make_settings(tmp_path, overrides)
    first = ingest(settings)
    assert first.rows == 6 and not first.skipped  # hidden files and the held-out set count as accounted
    before = (tmp_path / "ingested" / "manifest.json").read_bytes()

    # January's export arrives as CSV beside *.jsonl patterns: the run stops and names it.
    (tmp_path / "drops" / "2027_01").mkdir()
    (tmp_path / "drops" / "2027_01" / "train.csv").write_text("instruction,output\nHi,Hello\n")
    with pytest.raises(DataValidationError) as error:
        ingest(settings)
    (finding,) = error.value.findings
    assert finding.rule == "unmatched_file" and finding.source == "drops/2027_01/train.csv"
    assert "ingest.ignore" in error.value.summary()
    assert (tmp_path / "ingested" / "manifest.json").read_bytes() == before  # the last output stays

    ignored = ingest(make_settings(tmp_path, {**overrides, "ingest.ignore": ["drops/2027_01/*.csv"]}))
    assert ignored.rows == 6 and not ignored.skipped
    warned = ingest(make_settings(tmp_path, overrides, policies={"unmatched_file": "warn"}))
    assert warned.rows == 6 and [f.source for f in warned.skipped] == ["drops/2027_01/train.csv"]
    read = ingest(make_settings(tmp_path, {**overrides, "ingest.sources": ["drops/*/train.*"]}))
    assert read.rows == 7 and not read.skipped


def test_a_semicolon_csv_is_told_to_set_the_delimiter(tmp_path):
    (tmp_path / "export.csv").write_text("instruction;output\nReset the router?;Hold the button.\n")
    settings = make_settings(tmp_path, {"ingest.sources": ["export.csv"]})
    with pytest.raises(DataValidationError) as error:
        ingest(settings)
    (finding,) = error.value.findings
    assert finding.rule == "unknown_schema" and "set ingest.csv_delimiter: ';'" in finding.detail
    fixed = ingest(make_settings(tmp_path, {"ingest.sources": ["export.csv"], "ingest.csv_delimiter": ";"}))
    assert fixed.rows == 1
