"""Image+text records through ingest and the real gate: paths relative to the drop, ids and
fact keys that include the pictures' content, the three image rules, content-addressed
publication and images on the first user turn of ``load_messages``.

Synthetic PNGs are made with Pillow; no model (the base model folder holds a config.json and
the test tokenizer only).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings, tokenizer_dir, write_jsonl
from PIL import Image

from milora.data.dataset import iter_parts, load_messages, read_manifest
from milora.data.errors import DataValidationError
from milora.data.normalise import FieldMapping, normalise, record_id
from milora.data.readers import RawRow, iter_rows
from tasks.ingest import ingest
from tasks.validate import validate

DROP = "company/drop_2026_01"
IMAGE_TOKENS = 40  # image_seq_length of the test base model's config.json


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reports")


def png(path: Path, colour: tuple[int, int, int], side: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), colour).save(path)
    return path


def ask(question: str, answer: str, images: Any = None, **fields: Any) -> dict[str, Any]:
    """A chat record (system turn first) with ``images`` when given."""
    record: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "You describe product photos."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        **fields,
    }
    if images is not None:
        record["images"] = images
    return record


def text_rows(n: int = 3, start: int = 0) -> list[dict[str, Any]]:
    return [ask(f"Where is order {i}?", f"Order {i} ships tomorrow.") for i in range(start, start + n)]


def project(tmp_path: Path, **overrides: Any):
    """Settings reading ``company/drop_*/train.jsonl`` with a base model that states
    ``image_seq_length`` (the tokenizer is the test one)."""
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({"image_seq_length": IMAGE_TOKENS}))
    return make_settings(
        tmp_path,
        {
            "base_model": str(base),
            "validate.tokenizer": str(tokenizer_dir()),
            "ingest.sources": ["company/drop_*/train.jsonl"],
            "ingest.watch": "company",
            **overrides,
        },
    )


def published_rows(folder: Path) -> list[dict[str, Any]]:
    return [row for _, table in iter_parts(folder) for row in table.to_pylist()]


def quarantined(reports: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (reports / "quarantine.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- normalise
def test_the_images_field_forms_and_its_problems(tmp_path):
    folder = tmp_path / DROP
    png(folder / "img" / "a.png", (200, 0, 0))

    def row(images: Any, mapping: FieldMapping | None = None, key: str = "images") -> dict[str, Any]:
        return normalise(
            RawRow(1, {**ask("What is this?", "A kettle."), key: images}), mapping, folder, tmp_path
        )

    shown = f"{DROP}/img/a.png"
    assert row("img/a.png")["images"] == [shown]  # one text is one path
    assert row('["img/a.png", "img/./a.png"]')["images"] == [shown, shown]  # a CSV cell holding JSON
    assert row(["img/a.png"], FieldMapping(columns={"image": "images"}), key="image")["images"] == [shown]
    assert row(None)["images"] == row("")["images"] == row([])["images"] == []
    assert row(["img/missing.png"])["check_wrong_type"] is None  # missing is the gate's rule
    for value, problem in (
        (5, "images is a number"),
        ("[oops", "images is text that starts like a JSON list but is not one"),
        ([1, " "], "images[0] is a number; images[1] is blank"),
        ("/etc/a.png", "images[0]: '/etc/a.png' is an absolute path (give it relative to the drop folder)"),
        ("../other/a.png", "images[0]: '../other/a.png' leaves the drop folder"),
    ):
        found = row(value)
        assert found["check_wrong_type"] == problem and found["images"] == []
    # A CSV export: the column mapped onto images, the cell a JSON list.
    (folder / "train.csv").write_text('question,answer,picture\nWhat is this?,A kettle.,"[""img/a.png""]"\n')
    mapping = FieldMapping(columns={"question": "instruction", "answer": "output", "picture": "images"})
    (raw,) = iter_rows(folder / "train.csv")
    assert normalise(raw, mapping, folder, tmp_path)["images"] == [shown]


def test_text_ids_are_unchanged_and_image_content_changes_the_id(tmp_path):
    folder = tmp_path / DROP
    record = ask("What colour is this?", "Red.")
    text = normalise(RawRow(1, record), None, folder, tmp_path)
    # The id as computed before images existed: BLAKE2b over the five content fields.
    old = json.dumps(
        [
            "You describe product photos.",
            "What colour is this?",
            "",
            "Red.",
            [[m["role"], m["content"]] for m in record["messages"]],
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert text["record_id"] == hashlib.blake2b(old.encode(), digest_size=16).hexdigest()
    assert text["record_id"] == record_id(
        text["system"], text["instruction"], text["input"], text["output"], text["messages"]
    )
    assert text["images"] == []

    def image_id(name: str) -> str:
        return normalise(RawRow(1, {**record, "images": [name]}), None, folder, tmp_path)["record_id"]

    png(folder / "img" / "a.png", (200, 0, 0))
    first = image_id("img/a.png")
    assert first != text["record_id"]
    shutil.copy(folder / "img" / "a.png", folder / "img" / "copy.png")
    assert image_id("img/copy.png") == first  # the same picture under another name: one record
    png(folder / "img" / "a.png", (0, 0, 200))
    assert image_id("img/a.png") != first  # other pixels: another record
    assert image_id("img/gone.png") not in (first, text["record_id"])  # missing: its own id


# --------------------------------------------------------------------------- the gate
def test_images_resolve_in_the_drop_and_are_published_content_addressed(tmp_path, reports):
    drop = tmp_path / DROP
    red = png(drop / "img" / "red.png", (200, 0, 0))
    png(drop / "img" / "blue.PNG", (0, 0, 200))
    rows = [
        ask("What colour is this?", "Red.", ["img/red.png"]),
        ask("What colour is this?", "Blue.", "img/blue.PNG"),  # another picture: another fact
        ask("Is this the kettle?", "Yes, the red kettle.", ["img/red.png"]),  # the same picture again
        ask("Compare the two.", "One is red, one is blue.", ["img/red.png", "img/blue.PNG"]),
        ask("Compare the two.", "One is red, one is blue."),  # the text twin of the last row
        *text_rows(3),
    ]
    write_jsonl(drop / "train.jsonl", rows)
    settings = project(tmp_path)
    ingest(settings)
    ingested = published_rows(tmp_path / "ingested")
    assert ingested[0]["images"] == [f"{DROP}/img/red.png"] and ingested[5]["images"] == []
    assert read_manifest(tmp_path / "ingested")["format_version"] == 3

    report = validate(settings, reports_dir=reports)
    assert report.passed and report.rows == 8 and report.quarantined == 0
    dataset = tmp_path / "dataset"
    red_name = f"images/{hashlib.sha256(red.read_bytes()).hexdigest()}.png"
    published = {row["source_row"]: row for row in published_rows(dataset)}
    assert published[1]["images"] == published[3]["images"] == [red_name]
    assert published[2]["images"][0].endswith(".png") and published[6]["images"] == []
    assert sorted(p.name for p in (dataset / "images").iterdir()) == sorted(
        Path(n).name for n in published[4]["images"]
    )  # one file per content, lower-case extension
    assert (dataset / red_name).read_bytes() == red.read_bytes()
    assert published[4]["n_tokens"] - published[5]["n_tokens"] == 2 * IMAGE_TOKENS

    conversations = load_messages(dataset, "train") + load_messages(dataset, "validation")
    pictured = [c for c in conversations if any("images" in m for m in c)]
    assert len(pictured) == 4 and len(conversations) == 8
    for conversation in pictured:
        system, user, assistant = conversation
        assert "images" not in system and "images" not in assistant
        assert all((dataset / name).is_file() for name in user["images"])
    assert all(
        set(m) == {"role", "content"} for c in conversations if c not in pictured for m in c
    )  # text rows: the message dicts of before

    # A picture in the drop that no record names is an unmatched file, as any other.
    png(drop / "img" / "stray.png", (0, 200, 0))
    with pytest.raises(DataValidationError) as error:
        ingest(settings)
    assert [(f.rule, f.source) for f in error.value.findings] == [("unmatched_file", f"{DROP}/img/stray.png")]


def test_a_missing_image_fails_and_publishes_nothing(tmp_path, reports):
    drop = tmp_path / DROP
    png(drop / "img" / "red.png", (200, 0, 0))
    write_jsonl(drop / "train.jsonl", [ask("What colour?", "Red.", ["img/red.png"]), *text_rows(3)])
    settings = project(tmp_path)
    ingest(settings)
    assert validate(settings, reports_dir=reports).passed
    before = snapshot(tmp_path / "dataset")

    later = tmp_path / "company" / "drop_2026_02"
    png(later / "img" / "blue.png", (0, 0, 200))
    write_jsonl(
        later / "train.jsonl",
        [
            ask("What colour?", "Blue.", ["img/blue.png"]),
            *text_rows(2, 10),
            ask("And?", "Green.", ["img/nope.png"]),
        ],
    )
    ingest(settings)
    with pytest.raises(DataValidationError) as error:
        validate(settings, reports_dir=reports)
    (finding,) = error.value.findings
    assert (finding.rule, finding.source, finding.rows) == (
        "image_missing",
        "company/drop_2026_02/train.jsonl",
        [4],
    )
    assert finding.values == ["company/drop_2026_02/img/nope.png: no such file"]
    assert "company/drop_2026_02/train.jsonl row 4 [image_missing]" in str(error.value)
    assert snapshot(tmp_path / "dataset") == before  # the published version is untouched


def test_corrupt_and_tiny_images_are_quarantined_with_the_reason(tmp_path, reports):
    drop = tmp_path / DROP
    png(drop / "img" / "ok.png", (200, 0, 0))
    (drop / "img" / "corrupt.png").write_bytes(bytes(range(256)) * 4)
    png(drop / "img" / "tiny.png", (0, 0, 200), side=4)
    rows = [
        ask("What colour?", "Red.", ["img/ok.png"]),
        ask("What is this?", "Noise.", ["img/corrupt.png"]),
        ask("How big is this?", "Tiny.", ["img/ok.png", "img/tiny.png"]),
        *text_rows(3),
    ]
    write_jsonl(drop / "train.jsonl", rows)
    settings = project(tmp_path)
    ingest(settings)
    report = validate(settings, reports_dir=reports)
    assert report.passed and report.quarantined == 2 and report.rows == 4
    assert sorted((w.rule, tuple(w.rows)) for w in report.warnings) == [
        ("image_size", (3,)),
        ("image_unreadable", (2,)),
    ]
    corrupt, tiny = sorted(quarantined(reports), key=lambda r: r["source_row"])
    assert corrupt["rules"] == ["image_unreadable"] and corrupt["images"] == [f"{DROP}/img/corrupt.png"]
    assert corrupt["reasons"][0].startswith(f"{DROP}/img/corrupt.png: cannot be decoded (")
    assert str(tmp_path) not in corrupt["reasons"][0]
    assert tiny["rules"] == ["image_size"]
    assert tiny["reasons"] == [f"{DROP}/img/tiny.png: 4x4 pixels, below min_side 8"]
    assert tiny["images"] == [f"{DROP}/img/ok.png", f"{DROP}/img/tiny.png"]  # source paths kept
    published = published_rows(tmp_path / "dataset")
    assert len(list((tmp_path / "dataset" / "images").iterdir())) == 1  # only the clean row's
    assert {r["source_row"] for r in published} == {1, 4, 5, 6}


def test_same_picture_and_question_with_two_answers_in_one_drop_conflict(tmp_path, reports):
    drop = tmp_path / DROP
    png(drop / "img" / "red.png", (200, 0, 0))
    shutil.copy(drop / "img" / "red.png", drop / "img" / "red_again.png")  # the same content
    rows = [
        ask("What colour is this?", "Red.", ["img/red.png"]),
        *text_rows(3),
        ask("what colour is this", "Crimson.", ["img/red_again.png"]),
    ]
    write_jsonl(drop / "train.jsonl", rows)
    settings = project(tmp_path)
    ingest(settings)
    with pytest.raises(DataValidationError) as error:
        validate(settings, reports_dir=reports)
    (conflict,) = [f for f in error.value.findings if f.rule == "conflicting_answers"]
    assert conflict.rows == [1, 5] and "'Red.'" in conflict.detail and "'Crimson.'" in conflict.detail
    assert not (tmp_path / "dataset").exists()


def test_a_later_drop_supersedes_the_answer_about_the_same_picture(tmp_path, reports):
    first, second = tmp_path / DROP, tmp_path / "company" / "drop_2026_02"
    png(first / "img" / "red.png", (200, 0, 0))
    png(first / "img" / "blue.png", (0, 0, 200))
    write_jsonl(
        first / "train.jsonl",
        [
            ask("What colour is this?", "Red.", ["img/red.png"]),
            ask("What colour is this?", "Blue.", ["img/blue.png"]),
            *text_rows(3),
        ],
    )
    png(second / "img" / "photo.png", (200, 0, 0))  # the same picture, delivered again
    write_jsonl(
        second / "train.jsonl",
        [ask("What colour is this?", "Crimson.", ["img/photo.png"]), *text_rows(2, 10)],
    )
    settings = project(tmp_path)
    ingest(settings)
    report = validate(settings, reports_dir=reports)
    assert report.passed and [p["superseded"] for p in report.parts] == [1, 0]
    (superseded,) = report.superseded
    assert (superseded["old_answer"], superseded["new_answer"], superseded["row"]) == ("Red.", "Crimson.", 1)
    answers = {row["output"] for row in published_rows(tmp_path / "dataset")}
    assert {"Blue.", "Crimson."} <= answers and "Red." not in answers  # blue is another fact
    images = tmp_path / "dataset" / "images"
    assert len(list(images.iterdir())) == 2  # blue, and red: the new row's photo.png is the same picture


def test_an_image_linked_into_a_cache_is_read_and_a_path_out_of_the_drop_is_not(tmp_path):
    from milora.data.images import resolve_image

    cache, drop = tmp_path / "cache", tmp_path / "drop"
    cache.mkdir()
    drop.mkdir()
    (cache / "abc").write_bytes(b"png")
    (drop / "a.png").symlink_to(cache / "abc")  # DVC with cache.type: symlink
    path, refused = resolve_image("a.png", drop)
    assert refused is None and path == drop / "a.png" and path.read_bytes() == b"png"
    assert resolve_image("../cache/abc", drop) == (None, "'../cache/abc' leaves the drop folder")
