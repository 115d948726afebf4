"""HTML pages of the report: one per run and an index across runs.

Each page is one self-contained file (inline CSS and SVG, no script, nothing fetched), so it
can be mailed, attached to a ticket or served from any static folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from milora.records import LINEAGE_KEYS, Decision, RunStatus
from milora.redact import redact
from milora.reporting import plots
from milora.reporting.data import IndexRow, RunPage, Spectrum, VersionPoint

STATUS_CLASS = {
    RunStatus.PROMOTED: "ok",
    RunStatus.REJECTED: "warn",
    Decision.REJECTED: "warn",
    RunStatus.FAILED: "bad",
    RunStatus.ROLLED_BACK: "warn",
    RunStatus.FORCED: "warn",
    Decision.FORCED: "warn",
}
REASON_CHARS = 2000  # of a failure's text in the index (the run's page has all of it)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { padding: 0.1rem 0.5rem; border-radius: 0.6rem; background: #e0e0e0; white-space: nowrap; }
.ok { background: #c8e6c9; } .warn { background: #ffe0b2; } .bad { background: #ffcdd2; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.75rem; overflow-x: auto; white-space: pre-wrap; }
.note { color: #666; font-style: italic; } code { font-size: 0.85rem; }
.reason { white-space: pre-wrap; font-size: 0.8rem; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else ""


def _status(status: str) -> str:
    return f'<span class="status {STATUS_CLASS.get(status, "")}">{escape(status)}</span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table from already escaped cells; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(svg: str | None, caption: str, missing: str) -> str:
    if svg is None:
        return f'<p class="note">{escape(missing)}</p>'
    return f'<figure class="plot">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def _document(title: str, body: str) -> str:
    """The whole page; a credential in any text it shows (an error, a URI) is masked."""
    return redact(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: the page fetches nothing
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n"
    )


def _facts(record: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("time", _when(record.get("time"))),
        ("duration", f"{record.get('seconds', 0):.1f} s"),
    ]
    flow_run = record.get("flow_run") or {}
    if flow_run:
        rows.append(
            ("flow run", f"{escape(flow_run.get('name', ''))} <code>{escape(flow_run.get('id', ''))}</code>")
        )
    lineage = record.get("lineage") or record.get("champion") or {}
    rows += [(key, f"<code>{escape(str(lineage[key]))}</code>") for key in LINEAGE_KEYS if lineage.get(key)]
    if record.get("stages"):
        rows.append(
            (
                "stages",
                ", ".join(
                    f"{escape(k)} ({'ran' if v else 'unchanged'})" for k, v in record["stages"].items()
                ),
            )
        )
    registration = record.get("registration") or {}
    if registration.get("version"):
        new = "new" if registration.get("new") else "already registered"
        rows.append(("model version", f"{escape(str(registration['version']))} ({new})"))
    return _table(["", ""], [(escape(k), v) for k, v in rows])


def _gate(record: dict[str, Any]) -> str:
    decision = record.get("decision") or {}
    if not decision:
        return ""
    reasons = decision.get("reasons") or []
    reasons = reasons if isinstance(reasons, list) else [reasons]
    items = "".join(f"<li>{escape(str(r))}</li>" for r in reasons)
    return f"<h2>Gate: {_status(str(decision.get('decision')))}</h2><ul>{items}</ul>"


def _evaluation(page: RunPage) -> str:
    champion = page.champion
    label = f"champion v{champion.version}" if champion else "champion"
    rows = [
        (
            escape(str(r["suite"])),
            escape(str(r.get("metric", ""))),
            _fmt(r.get("n")),
            _fmt(r.get("base")),
            _fmt(r.get("adapter")),
            _fmt(champion.scores.get(r["suite"]) if champion else None),
            _fmt(r.get("forgetting")),
        )
        for r in page.evaluation
    ]
    table = _table(
        ["suite", "metric", "n", "base", "this run", label, "forgetting"], rows, numeric=range(2, 7)
    )
    return (
        table
        + _figure(plots.scores_plot(page.evaluation, champion), f"scores: base, this run, {label}", "")
        + "<h2>Forgetting</h2>"
        + _figure(
            plots.forgetting_plot(page.evaluation, champion, page.max_forgetting),
            "drop on what the base knew (retention suites); dashed: the gate's limit",
            "no retention suite was evaluated",
        )
    )


def _spectra(spectra: Sequence[Spectrum]) -> str:
    rows = []
    for s in spectra:
        held = s.adapter_values
        band = f"{s.adapted[0]}..{s.adapted[1] - 1}" if s.adapted else "none"
        rows.append(
            (
                escape(s.name),
                f"{s.shape[0]}x{s.shape[1]}",
                _fmt(s.values[0], 4),
                _fmt(s.values[-1], 6),
                band,
                f"{_fmt(min(held), 6)} .. {_fmt(max(held), 6)}" if held else "",
            )
        )
    caption = (
        "singular values of the frozen base weights (log scale); shaded: the components the adapter "
        "starts in; dots: the values its initial factors hold"
    )
    return _figure(plots.spectrum_plot(spectra), caption, "") + _table(
        ["weight", "shape", "σ max", "σ min", "adapted indices", "σ held by the init adapter"],
        rows,
        numeric=(2, 3),
    )


def _history(history: Sequence[VersionPoint]) -> str:
    rows = [
        (
            escape(p.version) + (" ★ champion" if p.champion else ""),
            _when(p.created),
            escape(p.start or ""),
            escape(p.parent or ""),
            escape((p.decision or "") + (", rolled back" if p.rolled_back else "")),
            ", ".join(f"{escape(k)} {v:.4f}" for k, v in sorted(p.scores.items())),
            escape(p.description),
        )
        for p in sorted(history, key=lambda p: int(p.version) if p.version.isdigit() else 0, reverse=True)
    ]
    return _figure(
        plots.history_plot(history),
        "score per suite across registered versions (filled: promoted, hollow: rejected, "
        "x: rolled back, star: current champion)",
        "no registered model versions yet",
    ) + (
        _table(["version", "registered", "start", "parent", "gate", "scores", "description"], rows)
        if rows
        else ""
    )


def _chain(history: Sequence[VersionPoint], primary: str) -> str:
    """Month by month: what each version cost, scored, answered stale and forgot in all."""
    return _figure(
        plots.chain_plot(history, primary),
        "per registered version: training seconds, the primary suite on the current truth, its "
        "stale rate and the largest forgetting since the stock base (cumulative over a chain); "
        "o: from the stock base, s: continued from its parent, ^: refolded on its parent; "
        "filled: promoted",
        "no registered model versions yet",
    )


def _changed_facts(record: dict[str, Any]) -> str:
    """The facts a later drop answered anew (the older records left training)."""
    data = record.get("data") or {}
    facts = data.get("superseded") or []
    if not facts:
        return ""
    shown = f" (the first {len(facts)})" if data.get("superseded_count", 0) > len(facts) else ""
    rows = [
        (escape(f["key"]), f"{escape(f['old_answer'])} <small>({escape(f['old_drop'])})</small>",
         f"{escape(f['new_answer'])} <small>({escape(f['new_drop'])})</small>")
        for f in facts
    ]  # fmt: skip
    return (
        f"<h2>Facts a later drop changed</h2><p>{data.get('superseded_count')} question(s) answered anew; "
        f"policy {escape(str(data.get('superseded_policy')))}{shown}</p>"
        + _table(["question", "old answer (drop)", "new answer (drop)"], rows)
    )


def render_run(page: RunPage) -> str:
    """One run's page: facts, gate, error, loss, evaluation vs champion, forgetting,
    spectrum and the registry's history."""
    record = page.record
    status = str(record.get("status", "unknown"))
    name = (record.get("flow_run") or {}).get("name") or "local run"
    parts = [
        '<p><a href="../index.html">all runs</a></p>',
        f"<h1>Retrain {escape(name)}: {_status(status)}</h1>",
        _facts(record),
        _gate(record),
        _changed_facts(record),
    ]
    if record.get("error"):
        parts.append(f"<h2>Error</h2><pre>{escape(str(record['error']))}</pre>")
    parts.append("<h2>Training loss</h2>")
    parts.append(
        _figure(plots.loss_plot(page.loss), "training loss per optimiser step", "no training in this run")
    )
    parts.append("<h2>Evaluation against the champion</h2>")
    parts.append(_evaluation(page) if page.evaluation else '<p class="note">no evaluation in this run</p>')
    parts.append("<h2>Singular-value spectrum</h2>")
    parts.append(
        _spectra(page.spectra) if page.spectra else '<p class="note">no spectrum (no base weights)</p>'
    )
    parts.append("<h2>Model versions in the registry</h2>")
    parts.append(_history(page.history))
    if page.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in page.notes) + "</ul>")
    return _document(f"retrain {name}: {status}", "\n".join(parts))


def render_index(
    rows: Sequence[IndexRow],
    history: Sequence[VersionPoint],
    notes: Sequence[str] = (),
    primary: str = "company",
) -> str:
    """All runs, newest first (failed ones with their reason), and the champion's history."""
    champion = next((p for p in history if p.champion), None)
    parts = [f"<h1>Retrain runs</h1><p>{len(rows)} run(s); generated {_when(time.time())}</p>"]
    if champion is not None:
        scores = ", ".join(f"{escape(k)} {v:.4f}" for k, v in sorted(champion.scores.items()))
        parts.append(f"<p>Champion: version {escape(champion.version)} ({scores})</p>")
    table = [
        (
            _when(row.time),
            _status(row.status),
            f'<a href="{escape(row.href)}">{escape(row.name)}</a>' if row.href else escape(row.name),
            escape(row.version or ""),
            escape(row.decision or ""),
            _fmt(row.primary),
            _fmt(row.forgetting),
            f"{row.seconds:.1f} s" if row.seconds is not None else "",
            f'<span class="reason">{escape(row.reason[:REASON_CHARS])}</span>',
        )
        for row in sorted(rows, key=lambda r: r.time, reverse=True)
    ]
    parts.append(
        _table(
            [
                "time",
                "status",
                "run",
                "version",
                "gate",
                "primary score",
                "max forgetting",
                "duration",
                "reason",
            ],
            table,
            numeric=(5, 6, 7),
        )
        if table
        else '<p class="note">no runs recorded yet (outputs/runs/ is empty)</p>'
    )
    parts.append("<h2>Champion history across model versions</h2>")
    parts.append(_history(history))
    parts.append("<h2>Retraining month by month</h2>")
    parts.append(_chain(history, primary))
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    return _document("retrain runs", "\n".join(parts))
