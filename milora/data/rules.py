"""Every data rule the pipeline enforces, with its level and default policy.

One registry so that ``params.yaml`` (policies), the Great Expectations suite (each
expectation's ``meta.rule``), the row checks and the error summaries all speak of the same
names. A *file* rule is judged while reading (the file cannot become rows), a *row* rule per
record, a *table* rule per drop, a *fact* rule across drops (a newer answer to a question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["fail", "warn", "quarantine", "supersede"]
Level = Literal["file", "row", "table", "fact"]
POLICIES: tuple[str, ...] = ("fail", "warn", "quarantine")
FACT_POLICIES: tuple[str, ...] = ("supersede", "warn", "fail")


@dataclass(frozen=True)
class Rule:
    """A named check: where it applies, what happens by default, what it means."""

    name: str
    level: Level
    default: Policy
    meaning: str

    @property
    def policies(self) -> tuple[str, ...]:
        """Quarantine sets rows aside, so only row rules can use it; a fact rule can let the
        newer record supersede the older one (milora.data.facts)."""
        if self.level == "fact":
            return FACT_POLICIES
        return POLICIES if self.level == "row" else ("fail", "warn")


_RULES = (
    # Files that cannot become records at all.
    Rule(
        "unreadable_file",
        "file",
        "fail",
        "the file is missing, of an unknown type, or not parseable as its type",
    ),
    Rule("empty_file", "file", "fail", "the file holds no records"),
    Rule(
        "unmatched_file",
        "file",
        "fail",
        "a file in ingest.watch that no ingest.sources entry reads and ingest.ignore does not name",
    ),
    Rule("not_records", "file", "fail", "a JSON document that is not a list of records (objects)"),
    Rule(
        "unknown_schema", "file", "fail", "no record matches a known schema (Alpaca, chat, prompt/completion)"
    ),
    # Structure of one record (default: stop the run).
    Rule("malformed_row", "row", "fail", "a line that is not valid JSON (e.g. truncated) or not an object"),
    Rule("required_fields", "row", "fail", "a required field is missing or null"),
    Rule(
        "wrong_type",
        "row",
        "fail",
        "a field holds a list, number or object where text belongs, or an image path that leaves the drop folder",
    ),
    Rule("invalid_utf8", "row", "fail", "bytes that are not valid UTF-8 (shown as \\x.. escapes)"),
    Rule("empty_text", "row", "fail", "a required text (instruction, output, a chat turn) is blank"),
    Rule("control_chars", "row", "fail", "control characters other than tab and newline"),
    Rule("chat_roles", "row", "fail", "unknown role, or turns not system? then user/assistant alternating"),
    # Content of one record (default: set the row aside, keep going).
    Rule(
        "special_tokens",
        "row",
        "quarantine",
        "text holding a special token of the base's tokenizer verbatim (</s>, a template's <|user|>, "
        "a vision model's <image>): it would be read as that token, not as text",
    ),
    Rule("max_tokens", "row", "quarantine", "the record is longer than the model's context, in tokens"),
    Rule("pii_email", "row", "quarantine", "an e-mail address"),
    Rule("pii_phone", "row", "quarantine", "a phone number"),
    Rule("pii_card", "row", "quarantine", "a payment card number (13-19 digits passing the Luhn check)"),
    Rule(
        "contamination", "row", "quarantine", "text copied from an evaluation benchmark or the held-out set"
    ),
    Rule(
        "replay_conflict",
        "row",
        "quarantine",
        "a general (replay) row asks a company question (a line of its prompt) and answers it otherwise",
    ),
    # The images of one record (milora.data.images; bounds in validate.images).
    Rule(
        "image_missing",
        "row",
        "fail",
        "an image the record names is not there (paths are relative to its file)",
    ),
    Rule(
        "image_unreadable",
        "row",
        "quarantine",
        "an image that Pillow cannot decode (corrupt, truncated, not an image)",
    ),
    Rule(
        "image_size",
        "row",
        "quarantine",
        "an image smaller or larger than validate.images allows (sides, bytes), or more images than max_images",
    ),
    # One drop as a whole.
    Rule("min_rows", "table", "fail", "fewer rows than the minimum (before and after quarantine)"),
    Rule("duplicate_rate", "table", "fail", "share of exact duplicates above the bound"),
    Rule("dataset_contract", "table", "fail", "the normalised columns break their contract (a pipeline bug)"),
    Rule("conflicting_answers", "table", "fail", "two different answers to one fact key inside one drop"),
    # Facts across drops (milora.data.facts).
    Rule(
        "superseded",
        "fact",
        "supersede",
        "a later drop answers the same fact key differently: the earlier record leaves training",
    ),
    Rule(
        "retired",
        "fact",
        "supersede",
        "a later drop retires the fact key (drop.yaml retire, or absent from a snapshot): its records leave training",
    ),
    Rule("unknown_retired_key", "table", "warn", "a drop.yaml retires a key no earlier drop states"),
    Rule(
        "likely_changed_fact",
        "table",
        "warn",
        "an answer reads like an earlier drop's to a similar question with a number or name changed",
    ),
)
RULES: dict[str, Rule] = {rule.name: rule for rule in _RULES}
ROW_RULES: tuple[str, ...] = tuple(r.name for r in _RULES if r.level == "row")
# Row rules that a derived ``check_<rule>`` column carries (max_tokens uses ``n_tokens``).
CHECK_RULES: tuple[str, ...] = tuple(r for r in ROW_RULES if r != "max_tokens")


def check_column(rule: str) -> str:
    """Name of the per-row column holding the offending value of ``rule`` (null when fine)."""
    return f"check_{rule}"


def default_policies() -> dict[str, Policy]:
    """The policy of every rule when ``params.yaml`` says nothing."""
    return {name: rule.default for name, rule in RULES.items()}
