"""What a broken rule looks like to a person, and the error that stops the run.

A finding names the file, the rows, the rule and a few offending values, so the message
alone says what to fix; the full detail goes to the Data Docs and the summary JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_VALUES = 5
MAX_ROWS_SHOWN = 20


@dataclass
class Finding:
    """One rule broken in one file: where, how often, and examples."""

    rule: str
    source: str
    policy: str = "fail"
    rows: list[int] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    count: int = 0
    detail: str = ""

    def __post_init__(self) -> None:
        self.count = self.count or len(self.rows)
        unique = list(dict.fromkeys(_short(v) for v in self.values))  # "output" x5 says less than once
        self.values = unique[:MAX_VALUES]

    def line(self) -> str:
        """One line: ``file rows 3, 7 [rule] detail: 'value', ...``."""
        where = self.source
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:MAX_ROWS_SHOWN])
            more = f" (+{len(self.rows) - MAX_ROWS_SHOWN} more)" if len(self.rows) > MAX_ROWS_SHOWN else ""
            where += f" row{'s' if len(self.rows) > 1 else ''} {shown}{more}"
        text = f"{where} [{self.rule}]"
        if self.detail:
            text += f" {self.detail}"
        if self.values:
            text += (": " if self.detail else " ") + ", ".join(self.values)
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(value: object, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataValidationError(Exception):
    """Bad data: the run stops here and nothing downstream is written.

    ``findings`` keeps every broken ``fail`` rule; ``data_docs`` points at the HTML report
    when the Great Expectations checkpoint ran.
    """

    def __init__(
        self, findings: list[Finding], headline: str = "data failed validation", data_docs: str | None = None
    ):
        self.findings = findings
        self.headline = headline
        self.data_docs = data_docs
        super().__init__(self.summary())

    def summary(self) -> str:
        lines = [f"{self.headline}: {len(self.findings)} problem{'s' if len(self.findings) != 1 else ''}"]
        lines += [f"  - {f.line()}" for f in self.findings]
        if self.data_docs:
            lines.append(f"  Data Docs: {self.data_docs}")
        return "\n".join(lines)

    def rules(self) -> list[str]:
        """The rule names reported, in order (handy in tests and logs)."""
        return [f.rule for f in self.findings]
