"""Company facts that change: the newest drop's answer to a question is the one taught.

A record states a *fact*: its key is the question (the normalised prompt: instruction and
input, or a chat's first user turn), its value the answer. Drops are read oldest first (the
order ingest reads them: name drops by date, ``drop_2027_01``). When a later drop answers a
key differently, the later record *supersedes* the earlier ones: they leave the training set,
and each is reported with the key, both answers and both drops. Two different answers to one
key inside one drop cannot be ordered: that is a conflict, reported with both rows.

A drop may say more in a small ``drop.yaml`` beside its files: ``kind: snapshot`` (the whole
knowledge base as of this drop: rows unchanged since an earlier drop are carried, not
duplicates, and a key an earlier drop had that the snapshot lacks is *retired*), or the
default ``kind: delta`` (only what is new or changed); ``retire:`` a list of keys (an export's
id, or the question as asked) that stop being true; ``date:`` the effective date when the
folder's name does not say it. A retired key's earlier records leave training.

Pure functions over plain values, so the rule is tested without files or a pipeline.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

_SPACE = re.compile(r"\s+")
_DATE = re.compile(r"(?<!\d)(\d{4})[-_.]?(0[1-9]|1[0-2])(?:[-_.]?(0[1-9]|[12]\d|3[01]))?(?!\d)")


def normalised(text: str) -> str:
    """Text as compared for facts: Unicode-normalised, case-folded, one space between words,
    no trailing punctuation ("What is the return window?" == "what is the return window")."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", folded).strip().rstrip("?.!:;").strip()


ID_PREFIX = "key:"  # a fact key taken from an export's own id, not from the question
IMAGES_MARK = "\nimages:"  # a question about pictures: their digests follow (never in a normalised prompt)


def fact_key(
    instruction: str | None,
    input_text: str | None = None,
    key: str | None = None,
    images: Sequence[str] = (),
) -> str:
    """The fact key of a record: the export's own ``key`` (an article, policy or SKU id,
    compared exactly but for surrounding spaces) when it has one, else its normalised prompt,
    followed, for a record with images, by their content digests (``images``; the same
    question about another picture is another fact). A text record's key has no images part."""
    if key and key.strip():
        return f"{ID_PREFIX}{key.strip()}"
    prompt = (instruction or "") + (f"\n{input_text}" if input_text else "")
    if images:
        return normalised(prompt) + IMAGES_MARK + ",".join(images)
    return normalised(prompt)


def drop_of(source: str) -> str:
    """The drop a source file belongs to: its folder (``company/drop_2026_10/train.jsonl`` ->
    ``drop_2026_10``), or the file's stem when it lies directly in the watched folder."""
    path = PurePosixPath(source)
    return path.parent.name if len(path.parts) > 1 and path.parent.name else path.stem


def drop_date(drop: str) -> str | None:
    """The effective date a drop's name states (``drop_2026_10`` -> ``2026-10``), or None."""
    match = _DATE.search(drop)
    if match is None:
        return None
    return "-".join(part for part in match.groups() if part)


DROP_MANIFEST = "drop.yaml"
DROP_KINDS = ("delta", "snapshot")


@dataclass(frozen=True)
class Drop:
    """A drop as its ``drop.yaml`` describes it (defaults: a delta, nothing retired).
    ``present``: for a snapshot, every key its rows state (carried ones included)."""

    name: str
    order: int
    kind: str = "delta"
    retire: tuple[str, ...] = ()
    present: frozenset[str] = frozenset()


def parse_drop_manifest(data: object) -> dict[str, object]:
    """A ``drop.yaml`` mapping checked: ``kind`` (delta | snapshot), ``retire`` (a list of
    keys), ``date`` (text). Raises ValueError naming the field."""
    if data is None:
        return {"kind": "delta", "retire": [], "date": None}
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping (kind, retire, date), got {type(data).__name__}")
    unknown = sorted(set(data) - {"kind", "retire", "date"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}: a drop.yaml holds kind, retire and date")
    kind = data.get("kind", "delta")
    if kind not in DROP_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(DROP_KINDS)}")
    retire = data.get("retire") or []
    if not isinstance(retire, list) or not all(isinstance(k, str | int) and str(k).strip() for k in retire):
        raise ValueError("retire: expected a list of keys (ids or questions as asked)")
    date = data.get("date")
    return {"kind": kind, "retire": [str(k) for k in retire], "date": None if date is None else str(date)}


def retired_forms(entry: str) -> tuple[str, str]:
    """The fact keys a ``retire`` entry can mean: an export's id, or a question as asked."""
    return fact_key(None, key=entry), fact_key(entry)


@dataclass(frozen=True)
class FactRecord:
    """One clean record as a fact: where it is, in which drop (``order``: the drop's place in
    reading order), its key and answer."""

    source: str
    row: int
    drop: str
    order: int
    key: str
    answer: str


@dataclass(frozen=True)
class Supersession:
    """An earlier record whose key a later drop answers differently."""

    key: str
    old_answer: str
    new_answer: str
    old_drop: str
    new_drop: str
    source: str
    row: int
    new_source: str
    new_row: int

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


@dataclass(frozen=True)
class Conflict:
    """Two different answers to one key inside one drop (no order decides between them)."""

    key: str
    drop: str
    first: FactRecord
    second: FactRecord


@dataclass(frozen=True)
class Retirement:
    """An earlier record whose key a later drop retired (listed, or left out of a snapshot)."""

    key: str
    answer: str
    drop: str
    retired_by: str
    how: str  # "listed in drop.yaml" | "absent from the snapshot"
    source: str
    row: int

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


@dataclass
class Resolution:
    """What the facts of all drops resolve to: the records superseded and retired (by source
    and row), the conflicts inside a drop, and ``retire`` entries that match no earlier key
    (``(drop, entry)``)."""

    superseded: dict[tuple[str, int], Supersession] = field(default_factory=dict)
    retired: dict[tuple[str, int], Retirement] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    unknown_retired: list[tuple[str, str]] = field(default_factory=list)
    likely_changes: list[LikelyChange] = field(default_factory=list)


@dataclass(frozen=True)
class LikelyChange:
    """A record whose answer reads like an earlier drop's answer to a similar question with a
    number or a name changed: perhaps the same fact reworded, which exact keys cannot see."""

    record: FactRecord
    earlier: FactRecord
    answer_similarity: float
    question_similarity: float


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W_]+")


def _masked(text: str) -> str:
    return _NUMBER.sub("#", normalised(text))


def _words(text: str) -> set[str]:
    return set(_WORD.findall(normalised(text)))


FUZZY_PAIRS = 20_000_000  # answer pairs compared fuzzily per drop; beyond, exact masked answers only


def likely_changes(
    records: Iterable[FactRecord],
    min_answer_similarity: float = 90.0,
    min_question_similarity: float = 50.0,
    fuzzy_pairs: int = FUZZY_PAIRS,
) -> list[LikelyChange]:
    """Records of a later drop that look like a changed fact of an earlier drop under other
    words (RapidFuzz similarities, 0-100): the answers are alike once numbers are masked
    (``fuzz.ratio``) yet differ, the questions are alike (``fuzz.token_set_ratio``), and the
    words the questions differ in are none the answers name (else they ask about different
    things: "the price of the kettle" and "the price of the lamp"). Records keyed by an
    export's id are left out: their keys are exact; so are questions about images: another
    picture is another fact, whatever the words.

    The fuzzy comparison is every new record against every earlier one; when a drop would
    make more than ``fuzzy_pairs`` such pairs, only answers equal once numbers are masked (a
    changed number) are candidates, found by lookup, so validation stays linear."""
    from rapidfuzz import fuzz, process

    records = [r for r in records if not r.key.startswith(ID_PREFIX) and IMAGES_MARK not in r.key]
    found = []
    for order in sorted({r.order for r in records}):
        earlier = list({r.key: r for r in records if r.order < order}.values())
        if not earlier:
            continue
        known, masked = {r.key for r in earlier}, [_masked(r.answer) for r in earlier]
        new = [r for r in records if r.order == order and r.key not in known]
        by_mask: dict[str, list[int]] = {}
        for index, text in enumerate(masked):
            by_mask.setdefault(text, []).append(index)
        fuzzy = len(new) * len(earlier) <= fuzzy_pairs
        for record in new:
            if fuzzy:
                candidates = process.extract(
                    _masked(record.answer),
                    masked,
                    scorer=fuzz.ratio,
                    score_cutoff=min_answer_similarity,
                    limit=5,
                )
            else:
                candidates = [(None, 100.0, index) for index in by_mask.get(_masked(record.answer), [])[:5]]
            for _, answer_score, index in candidates:
                other = earlier[index]
                question_score = fuzz.token_set_ratio(record.key, other.key)
                differing = _words(record.key) ^ _words(other.key)
                if (
                    normalised(other.answer) != normalised(record.answer)
                    and question_score >= min_question_similarity
                    and not differing & (_words(record.answer) | _words(other.answer))
                ):
                    found.append(LikelyChange(record, other, answer_score, question_score))
                    break
    return found


def resolve(records: Iterable[FactRecord], drops: Iterable[Drop] = ()) -> Resolution:
    """Supersede every record whose key a later drop answers differently; report conflicts.

    Answers are compared normalised (case and spacing do not make a new fact). The newest
    drop's answer is the current one; every earlier record of the key with another answer is
    superseded by that newest record (not by an intermediate one). Then retirement: a record
    is retired when a later drop retires its key and no record of the key comes in that drop
    or after it (a key retired and stated again later is current again)."""
    records = list(records)
    by_key: dict[str, list[FactRecord]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    resolution = Resolution()
    for key, found in by_key.items():
        latest_order = max(r.order for r in found)
        latest = [r for r in found if r.order == latest_order]
        for order in sorted({r.order for r in found}):
            answers: dict[str, FactRecord] = {}
            for record in (r for r in found if r.order == order):
                answers.setdefault(normalised(record.answer), record)
            if len(answers) > 1:
                first, second = list(answers.values())[:2]
                resolution.conflicts.append(Conflict(key, first.drop, first, second))
        current = latest[0]
        for record in found:
            if record.order < latest_order and normalised(record.answer) != normalised(current.answer):
                resolution.superseded[(record.source, record.row)] = Supersession(
                    key=key,
                    old_answer=record.answer,
                    new_answer=current.answer,
                    old_drop=record.drop,
                    new_drop=current.drop,
                    source=record.source,
                    row=record.row,
                    new_source=current.source,
                    new_row=current.row,
                )
    _retire(by_key, sorted(drops, key=lambda d: d.order), resolution)
    resolution.likely_changes = likely_changes(records)
    return resolution


def _retire(by_key: dict[str, list[FactRecord]], drops: list[Drop], resolution: Resolution) -> None:
    for drop in drops:
        earlier = {key for key, found in by_key.items() if any(r.order < drop.order for r in found)}
        retiring: dict[str, str] = {}
        for entry in drop.retire:
            matched = [form for form in retired_forms(entry) if form in earlier]
            if not matched:
                resolution.unknown_retired.append((drop.name, entry))
            retiring.update(dict.fromkeys(matched, "listed in drop.yaml"))
        if drop.kind == "snapshot":
            retiring.update(
                dict.fromkeys(sorted(earlier - drop.present - set(retiring)), "absent from the snapshot")
            )
        for key, how in retiring.items():
            if any(r.order >= drop.order for r in by_key[key]):
                continue  # stated again in this drop or later: current
            for record in by_key[key]:
                where = (record.source, record.row)
                if where not in resolution.superseded and where not in resolution.retired:
                    resolution.retired[where] = Retirement(
                        key, record.answer, record.drop, drop.name, how, record.source, record.row
                    )
