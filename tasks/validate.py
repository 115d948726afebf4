"""Stage 2, validate: the Great Expectations gate between ingested rows and the dataset.

``python -m tasks.validate PATH [PATH ...]``  check files before they enter the pipeline
(ingest into a scratch folder + validate; nothing is published). Exit 0 when they pass,
1 with a summary (file, rows, rule, up to five offending values) when they do not.

``python -m tasks.validate``  the pipeline stage: validate ``ingest.out_dir`` and publish
the clean rows to ``validate.dataset_dir``.

For each ingested part (one per source file, so memory stays flat however many drops
accumulate) the row checks of :mod:`milora.data` add derived columns (``check_<rule>``,
``n_tokens``), then the checkpoint ``milora_ingest_gate`` of the GX project kept in ``gx/``
runs the committed suite ``milora_ingest`` on them (result format COMPLETE) and updates the
Data Docs. Each failed expectation carries its rule in ``meta.rule``; the rule's policy in
``params.yaml`` decides: ``fail`` stops the run, ``warn`` logs, ``quarantine`` sets the rows
aside (``quarantine.jsonl`` with rule and reason) as long as at least ``min_rows`` clean rows
remain. The dataset is written beside its target and renamed into place only when every
part passed, so a failure changes no dataset version; the images of its clean rows go with it
(``images/<sha256>.<ext>``, milora.data.images).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from milora.atomic import atomic_directory, atomic_write_text
from milora.data.checks import CONTENT_CHECKS, row_checks, special_tokens_pattern
from milora.data.contamination import BenchmarkIndex, benchmark_files
from milora.data.dataset import (
    COMPANY,
    DATASET_SCHEMA,
    FORMAT_VERSION,
    PARTS_DIR,
    PartWriter,
    display_path,
    iter_parts,
    part_role,
    read_manifest,
    write_manifest,
)
from milora.data.errors import DataValidationError, Finding
from milora.data.facts import (
    DROP_MANIFEST,
    Drop,
    FactRecord,
    Resolution,
    drop_of,
    fact_key,
    normalised,
    resolve,
)
from milora.data.images import IMAGE_CHECKS, check_images, image_digests, published_name
from milora.data.normalise import FORMATS
from milora.data.pii import allow_pattern
from milora.data.rules import CHECK_RULES, RULES, check_column
from milora.data.tokens import TokenCounter, context_length, image_tokens
from milora.settings import DEFAULT_PARAMS, ImageSettings, Settings, SettingsError, load_settings
from tasks import claim, run_command
from tasks.ingest import ingest

logger = logging.getLogger(__name__)

SUITE = "milora_ingest"
CHECKPOINT = "milora_ingest_gate"
DATASOURCE, ASSET, BATCH = "milora", "ingested_rows", "whole_dataframe"
VALIDATION = "milora_ingest_rows"
# The facts of all drops, after supersession: one row per clean company record, so Data Docs
# list each superseded or retired record with its key, both answers and both drops.
FACTS_SUITE, FACTS_VALIDATION, FACTS_CHECKPOINT = "milora_facts", "milora_facts_rows", "milora_facts_report"
FACT_COLUMNS = ["source", "source_row", "drop", "key", "answer", "superseded_by", "retired_by"]
OUTPUT_VARIABLE = "MILORA_GX_OUTPUT"
GX_COLUMNS = ["record_id", "split", "format", "source", "source_row", "duplicate", "n_tokens"] + [
    check_column(rule) for rule in CHECK_RULES
]


# --------------------------------------------------------------------------- GX project
def _suite_spec() -> list[tuple[str, dict[str, Any], str]]:
    """(expectation class, kwargs, rule) of the committed suite, in order."""
    spec: list[tuple[str, dict[str, Any], str]] = [
        ("ExpectTableColumnsToMatchSet", {"column_set": GX_COLUMNS}, "dataset_contract"),
        ("ExpectColumnValuesToMatchRegex", {"column": "record_id", "regex": r"^[0-9a-f]{32}$"}, "dataset_contract"),
        ("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "validation"]}, "dataset_contract"),
        ("ExpectColumnValuesToBeInSet", {"column": "format", "value_set": list(FORMATS)}, "dataset_contract"),
        ("ExpectColumnValuesToNotBeNull", {"column": "source"}, "dataset_contract"),
        ("ExpectColumnValuesToBeBetween", {"column": "source_row", "min_value": 1}, "dataset_contract"),
        ("ExpectTableRowCountToBeBetween", {"min_value": {"$PARAMETER": "min_rows"}}, "min_rows"),
        ("ExpectColumnMeanToBeBetween", {"column": "duplicate", "max_value": {"$PARAMETER": "max_duplicate_rate"}}, "duplicate_rate"),
        ("ExpectColumnValuesToBeBetween", {"column": "n_tokens", "max_value": {"$PARAMETER": "max_tokens"}}, "max_tokens"),
    ]  # fmt: skip
    spec += [("ExpectColumnValuesToBeNull", {"column": check_column(rule)}, rule) for rule in CHECK_RULES]
    return spec


def _facts_spec() -> list[tuple[str, dict[str, Any], str]]:
    """(expectation class, kwargs, rule) of the facts suite: ``mostly: 0`` makes them reports,
    not gates (the fact rules' policies decide), so Data Docs show every changed fact."""
    return [
        ("ExpectTableColumnsToMatchSet", {"column_set": FACT_COLUMNS}, "dataset_contract"),
        ("ExpectColumnValuesToBeNull", {"column": "superseded_by", "mostly": 0.0}, "superseded"),
        ("ExpectColumnValuesToBeNull", {"column": "retired_by", "mostly": 0.0}, "retired"),
    ]


_GX_YAML = """\
# Great Expectations (GX Core 1.x) project of the MiLoRA pipeline, built once by
# `python -m tasks.validate --init-gx` and committed: this file, expectations/,
# validation_definitions/ and checkpoints/. Run outputs (validation results, Data Docs)
# go to ${MILORA_GX_OUTPUT}, which tasks.validate sets to <validate.reports_dir>/gx.
config_version: 4
config_variables_file_path: uncommitted/config_variables.yml
plugins_directory:
stores:
  expectations_store:
    class_name: ExpectationsStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: expectations/
  validation_results_store:
    class_name: ValidationResultsStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: ${MILORA_GX_OUTPUT}/validations/
  checkpoint_store:
    class_name: CheckpointStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      suppress_store_backend_id: true
      base_directory: checkpoints/
  validation_definition_store:
    class_name: ValidationDefinitionStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: validation_definitions/
expectations_store_name: expectations_store
validation_results_store_name: validation_results_store
checkpoint_store_name: checkpoint_store
data_docs_sites:
  local_site:
    class_name: SiteBuilder
    show_how_to_buttons: false
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: ${MILORA_GX_OUTPUT}/data_docs/
    site_index_builder:
      class_name: DefaultSiteIndexBuilder
analytics_enabled: false
progress_bars:
  globally: false
  metric_calculations: false
"""

_CONTEXTS: dict[tuple[str, str], Any] = {}


def gx_context(gx_dir: Path, output_dir: Path) -> Any:
    """The file-backed GX context of ``gx_dir``, run outputs under ``output_dir`` (cached)."""
    import great_expectations as gx

    key = (str(Path(gx_dir).resolve()), str(Path(output_dir).resolve()))
    if key not in _CONTEXTS:
        gx_dir = Path(gx_dir)
        if not (gx_dir / "great_expectations.yml").is_file():
            raise SettingsError(
                f"validate.gx_dir: {gx_dir} holds no GX project (create it with python -m tasks.validate --init-gx)"
            )
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        env = {OUTPUT_VARIABLE: key[1]}
        if gx_dir.name == "gx":
            context = gx.get_context(
                mode="file", project_root_dir=str(gx_dir.parent), runtime_environment=env
            )
        else:
            context = gx.get_context(mode="file", context_root_dir=str(gx_dir), runtime_environment=env)
        _CONTEXTS[key] = context
    return _CONTEXTS[key]


def build_gx_project(gx_dir: Path, output_dir: Path) -> Path:
    """Create or update the committed GX project: data source, suite, definition, checkpoint.

    A developer's command (``--init-gx``), run when the rules change; its files are
    committed and validation only loads them.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    gx_dir = Path(gx_dir)
    gx_dir.mkdir(parents=True, exist_ok=True)
    config = gx_dir / "great_expectations.yml"
    if not config.is_file():
        config.write_text(_GX_YAML, encoding="utf-8")
    (gx_dir / ".gitignore").write_text("uncommitted/\n", encoding="utf-8")
    _CONTEXTS.pop((str(gx_dir.resolve()), str(Path(output_dir).resolve())), None)
    context = gx_context(gx_dir, output_dir)
    try:  # get-or-create everything, so re-running leaves unchanged files byte-identical
        source = context.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        source = context.data_sources.add_pandas(DATASOURCE)
    asset = (
        source.get_asset(ASSET) if ASSET in source.get_asset_names() else source.add_dataframe_asset(ASSET)
    )
    names = [b.name for b in asset.batch_definitions]
    batch = (
        asset.get_batch_definition(BATCH)
        if BATCH in names
        else asset.add_batch_definition_whole_dataframe(BATCH)
    )
    for name, spec, validation, checkpoint, notes, index in (
        (SUITE, _suite_spec(), VALIDATION, CHECKPOINT, "Rules of milora.data.rules; see README 'Bring your own data'.", ["source_row"]),
        (FACTS_SUITE, _facts_spec(), FACTS_VALIDATION, FACTS_CHECKPOINT, "Facts a later drop changed or retired (milora.data.facts).", ["source", "source_row", "key"]),
    ):  # fmt: skip
        expectations = [
            getattr(gxe, class_name)(**kwargs, meta={"rule": rule}, notes=RULES[rule].meaning)
            for class_name, kwargs, rule in spec
        ]
        suite = _suite(context, name, expectations, {"notes": notes})
        try:
            definition = context.validation_definitions.get(validation)
        except Exception:  # not there yet
            definition = None
        if definition is None or definition.suite.name != name or definition.batch_definition.name != BATCH:
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=validation, data=batch, suite=suite)
            )
        context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=checkpoint,
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index},
            )
        )
    return gx_dir


def _suite(context: Any, name: str, expectations: list[Any], meta: dict[str, Any]) -> Any:
    """The stored suite when it already says the same, else a rewritten one.

    Keeping it avoids id churn in the committed JSON. (A suite object is only built for a
    rewrite: GX saves ``add_expectation`` calls straight into a stored suite of that name.)
    """
    import great_expectations as gx

    def content(items: list[Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.configuration.to_json_dict().items() if k != "id"} for e in items]

    try:
        stored = context.suites.get(name)
    except Exception:  # not there yet
        stored = None
    if stored is not None:
        notes = {k: v for k, v in stored.meta.items() if k != "great_expectations_version"}
        if notes == meta and content(stored.expectations) == content(expectations):
            return stored
    return context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations, meta=meta))


# --------------------------------------------------------------------------- results
@dataclass
class ValidationReport:
    """The gate's verdict and where its outputs are."""

    passed: bool
    parts: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    quarantined: int = 0
    superseded: list[dict[str, Any]] = field(default_factory=list)  # facts a later drop answered anew
    superseded_policy: str = "supersede"  # supersede: out of training; warn: kept, reported
    retired: list[dict[str, Any]] = field(default_factory=list)  # facts a later drop retired
    published: Path | None = None
    data_docs: Path | None = None
    summary_path: Path | None = None
    quarantine_path: Path | None = None

    @property
    def rows(self) -> int:
        return sum(p["clean_rows"] for p in self.parts)

    def to_dict(self, root: Path = Path(".")) -> dict[str, Any]:
        """JSON-ready, paths relative to ``root`` so the summary is the same on every machine."""
        return {
            "passed": self.passed,
            "rows_published": self.rows if self.passed else 0,
            "quarantined": self.quarantined,
            "superseded_count": len(self.superseded),
            "superseded_policy": self.superseded_policy,
            "retired_count": len(self.retired),
            "retired": self.retired[:SUPERSEDED_SHOWN],
            "superseded": self.superseded[:SUPERSEDED_SHOWN],
            "parts": self.parts,
            "failures": [f.to_dict() for f in self.failures],
            "warnings": [f.to_dict() for f in self.warnings],
            "dataset": display_path(self.published, root) if self.published else None,
            "data_docs": display_path(self.data_docs, root) if self.data_docs else None,
        }


def findings_from_result(result: dict[str, Any], source: str, settings: Settings) -> list[Finding]:
    """One finding per failed expectation of a GX validation result (``to_json_dict()``)."""
    findings = []
    for outcome in result["results"]:
        if outcome["success"]:
            continue
        config = outcome["expectation_config"]
        rule = (config.get("meta") or {}).get("rule", "dataset_contract")
        detail_result = outcome.get("result") or {}
        exception = (outcome.get("exception_info") or {}).get("exception_message")
        rows = [int(item["source_row"]) for item in detail_result.get("unexpected_index_list") or []]
        values = [str(v) for v in (detail_result.get("partial_unexpected_list") or [])]
        if exception:
            detail = f"{config['type']} could not run: {exception}"
        elif "observed_value" in detail_result:
            detail = f"{RULES[rule].meaning if rule in RULES else config['type']}: observed {_plain_value(detail_result['observed_value'])}"
            low, high = config["kwargs"].get("min_value"), config["kwargs"].get("max_value")
            bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
            detail += f", expected {' and '.join(b for b in bounds if b)}" if any(bounds) else ""
        else:
            detail = RULES[rule].meaning if rule in RULES else config["type"]
        count = int(detail_result.get("unexpected_count") or len(rows))
        findings.append(Finding(rule, source, settings.validation.policy(rule), rows, values, count, detail))
    # Row problems in file order, then whole-drop problems.
    return sorted(findings, key=lambda f: (not f.rows, f.rows[0] if f.rows else 0))


def _plain_value(value: Any) -> Any:
    """numpy scalars as plain numbers, rounded for people."""
    if hasattr(value, "item"):
        value = value.item()
    return round(value, 4) if isinstance(value, float) else value


# --------------------------------------------------------------------------- the stage
@dataclass
class _Tools:
    """What every part needs, built once per run."""

    counter: TokenCounter
    index: BenchmarkIndex
    max_tokens: int
    checkpoint: Any
    facts_checkpoint: Any
    data_docs: Path
    pii_allow: re.Pattern[str] | None
    special: re.Pattern[str] | None  # the base tokenizer's special tokens as text
    root: Path  # the ingested image paths are relative to it
    images: ImageSettings
    image_tokens: int  # tokens one image takes in the model's input


_COUNTERS: dict[tuple[str, float], TokenCounter] = {}


def _token_counter(path: Path) -> TokenCounter:
    """One tokenizer per folder and process (reloaded when its files change)."""
    stamp = max((p.stat().st_mtime for p in Path(path).glob("*") if p.is_file()), default=0.0)
    key = (str(Path(path).resolve()), stamp)
    if key not in _COUNTERS:
        _COUNTERS[key] = TokenCounter(path)
    return _COUNTERS[key]


def _tools(settings: Settings, reports: Path) -> _Tools:
    cfg = settings.validation
    if not settings.tokenizer_path.is_dir():
        raise SettingsError(f"base_model / validate.tokenizer: {settings.tokenizer_path} is not a folder")
    counter = _token_counter(settings.tokenizer_path)
    max_tokens = cfg.max_tokens or context_length(settings.path(settings.base_model))
    if not max_tokens:
        model_max = getattr(counter.tokenizer, "model_max_length", None)
        max_tokens = model_max if isinstance(model_max, int) and model_max < 10**7 else None
    if not max_tokens:
        raise SettingsError("validate.max_tokens: the base model states no context length; set it")
    contamination = cfg.contamination
    try:
        files = benchmark_files(contamination.benchmarks, settings.root)
        files += benchmark_files(contamination.optional, settings.root, required=False)
    except FileNotFoundError as error:
        raise SettingsError(str(error)) from None
    cache = settings.path(contamination.cache_dir) if contamination.cache_dir else None
    index = BenchmarkIndex.load_or_build(
        files, settings.root, cache, contamination.ngram, contamination.max_item_frequency
    )
    context = gx_context(settings.path(cfg.gx_dir), reports / "gx")
    checkpoints = []
    for name in (CHECKPOINT, FACTS_CHECKPOINT):
        try:
            checkpoints.append(context.checkpoints.get(name))
        except Exception as error:
            raise SettingsError(
                f"validate.gx_dir: checkpoint {name!r} not found ({error}); run --init-gx"
            ) from None
    docs = reports / "gx" / "data_docs" / "index.html"
    return _Tools(
        counter,
        index,
        int(max_tokens),
        *checkpoints,
        docs,
        allow_pattern(cfg.pii_allow),
        special_tokens_pattern(counter.special_tokens),
        settings.root,
        cfg.images,
        image_tokens(settings.path(settings.base_model)),
    )


def derive_columns(
    rows: list[dict[str, Any]], tools: _Tools, company: dict[str, str] | None = None
) -> dict[str, list[Any]]:
    """The per-row columns the suite judges: content and image checks, token counts (images
    included), contamination, and for general (replay) data, given ``company`` (a company
    question -> its newest answer), rows that would teach a company question another answer."""
    derived: dict[str, list[Any]] = {name: [] for name in (*CONTENT_CHECKS, *IMAGE_CHECKS)}
    for row in rows:
        checks = {
            **row_checks(row, tools.pii_allow, tools.special),
            **check_images(row["images"], tools.root, tools.images),
        }
        for name, value in checks.items():
            derived[name].append(value)
    derived["n_tokens"] = tools.counter.count(
        [row["messages"] or [] for row in rows],
        tools.max_tokens,
        [tools.image_tokens * len(row["images"]) for row in rows],
    ).tolist()
    queries = []
    for row in rows:
        if row["format"] == "chat":
            prompts = [m["content"] for m in row["messages"] or [] if m["role"] == "user"]
            texts = [m["content"] for m in row["messages"] or [] if m["role"] != "system"]
        elif row["format"] == "unknown":
            prompts, texts = [], []
        else:
            prompts = [t for t in (row["instruction"], row["input"]) if t]
            texts = [*prompts, *([row["output"]] if row["output"] else [])]
        if row.get("images"):  # the same short question about another picture is not a copy:
            prompts = []  # only shared passages (n-grams) count for an image record
        queries.append((prompts, texts))
    derived[check_column("contamination")] = [str(m) if m else None for m in tools.index.check(queries)]
    derived[check_column("replay_conflict")] = [_replay_conflict(row, company or {}) for row in rows]
    return derived


def company_question(row: dict[str, Any]) -> str:
    """What a company record asks, without the wrapper instruction an export may put before it
    ("Answer the customer's question." + the question as input)."""
    return normalised(row["input"] or row["instruction"] or "")


def _replay_conflict(row: dict[str, Any], company: dict[str, str]) -> str | None:
    """A general row any line of whose prompt is a company question, answered otherwise (a
    row with images asks about its pictures, not the company's facts)."""
    if not company or not row["output"] or row["images"]:
        return None
    lines = [line for text in (row["instruction"], row["input"]) if text for line in text.splitlines()]
    for question in dict.fromkeys(normalised(line) for line in lines if line.strip()):
        answer = company.get(question)
        if answer is not None and normalised(answer) != normalised(row["output"]):
            return f"asks {question!r}, which the company answers {answer!r}"
    return None


def _gx_frame(rows: list[dict[str, Any]], derived: dict[str, list[Any]]) -> pd.DataFrame:
    columns: dict[str, Any] = {}
    for name in GX_COLUMNS:
        values = derived[name] if name in derived else [row[name] for row in rows]
        if name == "duplicate":
            columns[name] = np.asarray(values, dtype=np.int8)
        elif name in ("source_row", "n_tokens"):
            columns[name] = np.asarray(values, dtype=np.int64)
        else:
            columns[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(columns)


SUPERSEDED_SHOWN = 200  # superseded facts listed in summary.json (all are counted)


def _drop_info(entry: dict[str, Any]) -> dict[str, Any]:
    """The part's drop as ingest recorded it (name, kind, retire, date)."""
    return entry.get("drop") or {
        "name": drop_of(entry["source"]),
        "kind": "delta",
        "retire": [],
        "date": None,
    }


def _fact_records(
    source: str, drop: str, order: int, clean: list[dict[str, Any]], root: Path
) -> list[FactRecord]:
    """The clean rows of one part as facts (quarantined rows and duplicates take no part)."""
    return [
        FactRecord(source, row["source_row"], drop, order, _fact_key(row, root), row["output"])
        for row in clean
        if row["output"]
    ]


def _fact_key(row: dict[str, Any], root: Path) -> str:
    """A row's fact key: its question, and the content of its images (paths under ``root``)."""
    return fact_key(row["instruction"], row["input"], row.get("key"), image_digests(row["images"], root))


def _apply_facts(
    facts: Resolution,
    report: ValidationReport,
    parts: list[dict[str, Any]],
    scratch: Path,
    settings: Settings,
) -> None:
    """Report the facts of all drops; under ``supersede``, take the superseded records out of
    the parts already written (a part is rewritten only if it lost rows)."""
    policy = settings.validation.policy("superseded")
    report.superseded = [s.to_dict() for s in facts.superseded.values()]
    report.superseded_policy = policy
    report.retired = [r.to_dict() for r in facts.retired.values()]
    unknown = [
        Finding(
            "unknown_retired_key",
            f"{drop}/{DROP_MANIFEST}",
            settings.validation.policy("unknown_retired_key"),
            values=[entry for name, entry in facts.unknown_retired if name == drop],
            detail="retires keys no earlier drop states (an id, or a question as asked)",
        )
        for drop in dict.fromkeys(name for name, _ in facts.unknown_retired)
    ]
    report.failures += [f for f in unknown if f.policy == "fail"]
    report.warnings += [f for f in unknown if f.policy != "fail"]
    for counts in report.parts:
        findings = _fact_findings(counts["source"], facts, settings)
        report.failures += [f for f in findings if f.policy == "fail"]
        report.warnings += [f for f in findings if f.policy != "fail"]
        for finding in findings:
            (logger.error if finding.policy == "fail" else logger.warning)(
                "%s (policy %s)", finding.line(), finding.policy
            )
        counts["superseded"] = counts["retired"] = 0
    if report.failures:
        return
    leaving = {
        where: reason
        for reason, found in (("superseded", facts.superseded), ("retired", facts.retired))
        if settings.validation.policy(reason) == "supersede"
        for where in found
    }
    for part in parts:
        gone = {row: reason for (source, row), reason in leaving.items() if source == part["source"]}
        if not gone:
            continue
        table = pq.read_table(scratch / part["file"])
        kept = [row for row in table.to_pylist() if row["source_row"] not in gone]
        with PartWriter(scratch / part["file"], DATASET_SCHEMA) as writer:
            for row in kept:
                writer.write(row)
        counts = next(c for c in report.parts if c["source"] == part["source"])
        for reason in ("superseded", "retired"):
            counts[reason] = sum(1 for why in gone.values() if why == reason)
        counts["clean_rows"] = part["rows"] = len(kept)


def _facts_docs(tools: _Tools, records: list[FactRecord], facts: Resolution) -> None:
    """Every company record as a fact, with what superseded or retired it, through the facts
    checkpoint: Data Docs list each changed fact beside the row rules' results."""
    from great_expectations.core.run_identifier import RunIdentifier

    superseded, retired = facts.superseded, facts.retired
    rows = []
    for r in records:
        s, t = superseded.get((r.source, r.row)), retired.get((r.source, r.row))
        rows.append(
            {
                "source": r.source,
                "source_row": r.row,
                "drop": r.drop,
                "key": r.key,
                "answer": r.answer,
                "superseded_by": f"{s.new_drop}: {s.new_answer!r} (was {s.old_answer!r})" if s else None,
                "retired_by": f"{t.retired_by}: {t.how}" if t else None,
            }
        )
    tools.facts_checkpoint.run(
        batch_parameters={"dataframe": pd.DataFrame(rows, columns=FACT_COLUMNS)},
        run_id=RunIdentifier(run_name="facts"),
    )


def _leaving(
    rule: str,
    source: str,
    found: dict[tuple[str, int], Any],
    settings: Settings,
    value: Callable[[Any], str],
    detail: Callable[[list[Any]], str],
) -> list[Finding]:
    """One finding for the records of ``source`` that ``rule`` takes out of training."""
    mine = [fact for (where, _), fact in found.items() if where == source]
    if not mine:
        return []
    rows = sorted(fact.row for fact in mine)
    return [
        Finding(
            rule,
            source,
            settings.validation.policy(rule),
            rows=rows,
            values=[value(f) for f in mine],
            detail=detail(mine),
        )
    ]


def _fact_findings(source: str, facts: Resolution, settings: Settings) -> list[Finding]:
    """The fact findings of one part: its records a later drop superseded, its in-drop conflicts."""
    findings = _leaving(
        "superseded",
        source,
        facts.superseded,
        settings,
        lambda s: f"{s.key!r}: {s.old_answer!r} -> {s.new_answer!r}",
        lambda found: (
            f"answered differently by the later drop {', '.join(sorted({s.new_drop for s in found}))}"
        ),
    )
    findings += _leaving(
        "retired",
        source,
        facts.retired,
        settings,
        lambda r: f"{r.key!r} ({r.how} {r.retired_by})",
        lambda _: "no longer true",
    )
    alike = [c for c in facts.likely_changes if c.record.source == source]
    if alike:
        findings.append(
            Finding(
                "likely_changed_fact",
                source,
                settings.validation.policy("likely_changed_fact"),
                rows=sorted(c.record.row for c in alike),
                values=[
                    f"{c.record.answer!r} vs {c.earlier.drop}: {c.earlier.answer!r} (asked {c.earlier.key!r})"
                    for c in alike
                ],
                detail="the same fact reworded? give both one key (a key column) so the newer answer supersedes",
            )
        )
    for conflict in facts.conflicts:
        if conflict.first.source == source or conflict.second.source == source:
            first, second = conflict.first, conflict.second
            findings.append(
                Finding(
                    "conflicting_answers",
                    source,
                    settings.validation.policy("conflicting_answers"),
                    rows=sorted({first.row, second.row}) if first.source == second.source else [first.row],
                    detail=(
                        f"the drop {conflict.drop} answers {conflict.key!r} twice: {first.answer!r} "
                        f"({first.source} row {first.row}) and {second.answer!r} ({second.source} row "
                        f"{second.row}); keep one"
                    ),
                )
            )
    return findings


def _validate_part(
    entry: dict[str, Any],
    rows: list[dict[str, Any]],
    settings: Settings,
    tools: _Tools,
    carried: set[str] = frozenset(),
    company: dict[str, str] | None = None,
) -> tuple[list[Finding], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run the checkpoint on one part: (findings, clean rows, quarantined rows, counts).
    ``carried``: record ids of earlier drops, which a snapshot drop repeats without them being
    duplicates (not published twice, not counted in the duplicate rate, counted in min_rows).
    ``company``: for a replay part, the company's questions and their newest answers."""
    from great_expectations.core.run_identifier import RunIdentifier

    cfg = settings.validation
    source = entry["source"]
    derived = derive_columns(rows, tools, company)
    n_carried = sum(1 for row in rows if row["duplicate"] and row["record_id"] in carried)
    frame = _gx_frame(
        [{**row, "duplicate": row["duplicate"] and row["record_id"] not in carried} for row in rows], derived
    )
    result = tools.checkpoint.run(
        batch_parameters={"dataframe": frame},
        expectation_parameters={
            "min_rows": cfg.min_rows,
            "max_duplicate_rate": cfg.max_duplicate_rate,
            "max_tokens": tools.max_tokens,
        },
        run_id=RunIdentifier(run_name=Path(entry["file"]).stem),  # GX keys allow no "/"
    )
    findings: list[Finding] = []
    for validation in result.run_results.values():
        findings += findings_from_result(validation.to_json_dict(), source, settings)
    position = {row["source_row"]: i for i, row in enumerate(rows)}
    reasons: dict[int, list[tuple[str, str]]] = {}
    for finding in findings:
        if finding.policy == "quarantine":
            for number in finding.rows:
                index = position[number]
                if finding.rule == "max_tokens":
                    reason = f"{derived['n_tokens'][index]} tokens > {tools.max_tokens}"
                else:
                    reason = str(frame.at[index, check_column(finding.rule)])
                reasons.setdefault(index, []).append((finding.rule, reason))
    clean, quarantined = [], []
    for index, row in enumerate(rows):
        if index in reasons:
            rules = reasons[index]
            quarantined.append(
                {"rules": [r for r, _ in rules], "reasons": [why for _, why in rules], **_content(row)}
            )
        elif not row["duplicate"]:
            clean.append({**_content(row), "n_tokens": derived["n_tokens"][index]})
    if len(clean) + n_carried < cfg.min_rows and not any(f.rule == "min_rows" for f in findings):
        detail = f"only {len(clean) + n_carried} clean new rows remain after quarantine and de-duplication (minimum {cfg.min_rows})"
        findings.append(Finding("min_rows", source, cfg.policy("min_rows"), detail=detail))
    counts = {
        "source": source,
        "rows": len(rows),
        "duplicates": int(sum(row["duplicate"] for row in rows)),
        "quarantined": len(quarantined),
        "carried": n_carried,  # a snapshot's rows unchanged since an earlier drop
        "superseded": 0,  # set once every drop is read (_apply_facts)
        "retired": 0,
        "clean_rows": len(clean),
    }
    return findings, clean, quarantined, counts


def _company_part(
    entry: dict[str, Any],
    rows: list[dict[str, Any]],
    settings: Settings,
    tools: _Tools,
    drops: dict[str, dict[str, Any]],
    records: list[FactRecord],
) -> tuple[list[Finding], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Validate one part of a company drop and note its facts: ``drops`` (name -> info, order
    in reading order, the keys and record ids it states) and ``records`` grow."""
    info = _drop_info(entry)
    drop = drops.setdefault(info["name"], {**info, "order": len(drops), "keys": set(), "ids": set()})
    earlier = set().union(*(d["ids"] for d in drops.values() if d["order"] < drop["order"]))
    carried = earlier if info["kind"] == "snapshot" else set()
    findings, clean, bad, counts = _validate_part(entry, rows, settings, tools, carried)
    records += _fact_records(entry["source"], info["name"], drop["order"], clean, settings.root)
    whole = [r for r in rows if r["output"] and not any(r[c] for c in r if c.startswith("check_"))]
    drop["keys"] |= {_fact_key(r, settings.root) for r in whole}
    drop["ids"] |= {r["record_id"] for r in whole}
    return findings, clean, bad, counts


def _content(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in DATASET_SCHEMA.names if name in row}


def validate(
    settings: Settings,
    ingested_dir: Path | None = None,
    publish_dir: Path | None = None,
    reports_dir: Path | None = None,
    publish: bool = True,
) -> ValidationReport:
    """Validate ``ingested_dir`` (default ``ingest.out_dir``); publish when it passes.

    ``publish_dir`` defaults to ``validate.dataset_dir``; ``publish=False`` only checks.
    Raises :class:`DataValidationError` (after writing the summary and Data Docs) when a
    ``fail`` rule broke; nothing is published then.
    """
    cfg = settings.validation
    ingested = Path(ingested_dir) if ingested_dir else settings.path(settings.ingest.out_dir)
    reports = Path(reports_dir) if reports_dir else settings.path(cfg.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(ingested)
    tools = _tools(settings, reports)
    report = ValidationReport(passed=False, data_docs=tools.data_docs)
    records: list[FactRecord] = []
    images: dict[str, Path] = {}  # published image (images/<sha256>.<ext>) -> its source file
    drops: dict[str, dict[str, Any]] = {}  # name -> info, order (reading order, oldest first), keys, ids
    answers: dict[str, str] = {}  # company question -> its newest answer (replay rows must agree)
    target = claim(settings, publish_dir, "validate.dataset_dir") if publish else None
    scratch_parent = tempfile.TemporaryDirectory(prefix="milora-validate-")
    staging = atomic_directory(target, mark=True) if target else _plain(Path(scratch_parent.name) / "dataset")
    quarantine_tmp = reports / f".quarantine.jsonl.tmp-{os.getpid()}"
    try:
        with staging as scratch, quarantine_tmp.open("w", encoding="utf-8", newline="\n") as quarantine:
            parts = []
            for entry, table in tqdm(
                iter_parts(ingested), total=len(manifest["parts"]), desc="validate", unit="part", disable=None
            ):
                rows = table.to_pylist()
                if part_role(entry) == COMPANY:
                    findings, clean, bad, counts = _company_part(entry, rows, settings, tools, drops, records)
                    answers.update(
                        (company_question(r), r["output"]) for r in clean if r["output"] and not r["images"]
                    )
                else:  # general data: the row rules, and no company question answered otherwise
                    findings, clean, bad, counts = _validate_part(
                        entry, rows, settings, tools, company=answers
                    )
                counts["role"] = part_role(entry)
                report.parts.append(counts)
                report.failures += [f for f in findings if f.policy == "fail"]
                report.warnings += [f for f in findings if f.policy != "fail"]
                for finding in findings:
                    log = logger.error if finding.policy == "fail" else logger.warning
                    log("%s (policy %s)", finding.line(), finding.policy)
                report.quarantined += len(bad)
                for row in bad:
                    quarantine.write(json.dumps(row, ensure_ascii=False) + "\n")
                if report.failures:
                    continue  # keep checking the other parts, write nothing
                with PartWriter(scratch / entry["file"], DATASET_SCHEMA) as writer:
                    for row in clean:
                        writer.write(_published_images(row, settings.root, images))
                parts.append(
                    {
                        "file": entry["file"],
                        "source": entry["source"],
                        "sha256": entry["sha256"],
                        "role": part_role(entry),
                        "rows": len(clean),
                    }
                )
            described = [
                Drop(name, d["order"], d["kind"], tuple(d["retire"]), frozenset(d["keys"]))
                for name, d in drops.items()
            ]
            facts = resolve(records, described)
            _apply_facts(facts, report, parts, scratch, settings)
            if target and not report.failures:
                _copy_images(scratch, parts, images)
            if records:
                _facts_docs(tools, records, facts)
            report.passed = not report.failures
            _write_summary(reports, report, settings.root)
            if not report.passed:
                raise DataValidationError(report.failures, data_docs=str(tools.data_docs))
            write_manifest(
                scratch,
                {"format_version": FORMAT_VERSION, "parts": parts, "rows": sum(p["rows"] for p in parts)},
            )
        report.quarantine_path = reports / "quarantine.jsonl"
        os.replace(quarantine_tmp, report.quarantine_path)
    finally:
        quarantine_tmp.unlink(missing_ok=True)
        scratch_parent.cleanup()
    report.published = target
    _write_summary(reports, report, settings.root)
    logger.info(
        "validation passed: %d rows%s, %d quarantined; Data Docs: %s",
        report.rows, f" published to {target}" if target else "", report.quarantined, tools.data_docs,
    )  # fmt: skip
    return report


def _published_images(row: dict[str, Any], root: Path, images: dict[str, Path]) -> dict[str, Any]:
    """``row`` with its images named as published (relative to the dataset folder), noting in
    ``images`` where each comes from. A missing image (kept under ``image_missing: warn``,
    which named it) cannot be published: the row goes without it."""
    if not row["images"]:
        return row
    names = []
    for path in row["images"]:
        name = published_name(path, root)
        if name is not None:
            images.setdefault(name, root / path)
            names.append(name)
    return {**row, "images": names}


def _copy_images(scratch: Path, parts: list[dict[str, Any]], images: dict[str, Path]) -> None:
    """Copy into the staged dataset each image its rows still name (after supersession), once."""
    named: set[str] = set()
    for part in parts:
        column = pq.read_table(scratch / part["file"], columns=["images"]).column("images")
        named.update(name for names in column.to_pylist() for name in names or [])
    for name in sorted(named):
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images[name], scratch / name)


class _plain:
    """A scratch folder with the same shape as :func:`atomic_directory` (check-only runs)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        (self.path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        return None


def _write_summary(reports: Path, report: ValidationReport, root: Path) -> None:
    report.summary_path = reports / "summary.json"
    atomic_write_text(report.summary_path, json.dumps(report.to_dict(root), indent=2, sort_keys=True) + "\n")


def check_files(
    settings: Settings, paths: Sequence[str | Path], reports_dir: Path | None = None
) -> ValidationReport:
    """Ingest ``paths`` into a scratch folder and validate them; publishes nothing."""
    with tempfile.TemporaryDirectory(prefix="milora-check-") as scratch:
        ingest(settings, paths, Path(scratch) / "ingested")
        return validate(settings, Path(scratch) / "ingested", reports_dir=reports_dir, publish=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.validate", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="files to check (ingest + validate, nothing published)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--ingested", type=Path, help="ingested folder to validate (default: ingest.out_dir)")
    parser.add_argument(
        "--out", type=Path, help="where to publish the dataset (default: validate.dataset_dir)"
    )
    parser.add_argument("--reports", type=Path, help="reports folder (default: validate.reports_dir)")
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="RULE=POLICY",
        help="override a rule's policy, e.g. pii_email=warn",
    )
    parser.add_argument(
        "--init-gx", action="store_true", help="(developers) create/update the GX project in gx_dir"
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.policy:
        rule, sep, policy = item.partition("=")
        if not sep:
            parser.error(f"--policy expects RULE=POLICY, got {item!r}")
        overrides[f"validate.policies.{rule.strip()}"] = policy.strip()
    settings = load_settings(args.params, overrides)
    reports = args.reports or settings.path(settings.validation.reports_dir)
    if args.init_gx:
        print(
            f"GX project written to {build_gx_project(settings.path(settings.validation.gx_dir), reports / 'gx')}"
        )
        return 0
    if args.paths:
        report = check_files(settings, args.paths, args.reports)
    else:
        report = validate(settings, args.ingested, args.out, args.reports)
    print(
        f"passed: {report.rows} clean rows, {report.quarantined} quarantined, {len(report.warnings)} warnings\n"
        f"  summary: {report.summary_path}\n  Data Docs: {report.data_docs}"
        + (f"\n  quarantine: {report.quarantine_path}" if report.quarantined else "")
        + (f"\n  dataset: {report.published}" if report.published else "")
    )
    return 0


if __name__ == "__main__":
    run_command(main)
