"""Stage 1, ingest: company exports -> one normalised, deduplicated, split dataset.

``python -m tasks.ingest [SOURCE ...] [--out DIR] [--params params.yaml]``

Every source file (in order) becomes one Parquet part of ``ingest.out_dir``: each row with
its content id, source file and row, train/validation split and normalised columns. Exact
duplicates (of an earlier row in the same file or an earlier file) stay, flagged
``duplicate`` and counted, so the validation gate can judge the duplicate rate; the gate
publishes only first occurrences. Structural problems are noted per row for the gate to
report; only files that cannot become rows at all stop ingest here. The output folder is
replaced atomically and only when every file was read.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from milora.atomic import atomic_directory
from milora.data.dataset import (
    COMPANY,
    FORMAT_VERSION,
    INGESTED_SCHEMA,
    PARTS_DIR,
    REPLAY,
    PartWriter,
    display_path,
    part_name,
    write_manifest,
)
from milora.data.errors import DataValidationError, Finding
from milora.data.facts import DROP_MANIFEST, drop_date, drop_of, parse_drop_manifest
from milora.data.normalise import FieldMapping, normalise, split_of
from milora.data.readers import FileProblem, iter_rows, resolve_sources, unmatched_files
from milora.digests import file_sha256
from milora.settings import DEFAULT_PARAMS, Settings, SettingsError, load_settings
from milora.yamlfile import safe_load_bounded
from tasks import claim, run_command

logger = logging.getLogger(__name__)

CSV_DELIMITERS = (";", "\t", "|", ",")  # what a one-column CSV header may really be split by


@dataclass
class IngestReport:
    """What ingest wrote: one entry per part, totals, and files skipped under ``warn``."""

    out_dir: Path
    parts: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p["rows"] for p in self.parts)

    @property
    def duplicates(self) -> int:
        return sum(p["duplicates"] for p in self.parts)


def _read_file(
    path: Path,
    source: str,
    writer: PartWriter,
    settings: Settings,
    mapping: FieldMapping,
    seen: set[str],
    images: set[str],
) -> dict[str, Any]:
    """Stream one file into ``writer``; returns its counts and adds the images its records
    name to ``images`` (relative to the project root). Raises FileProblem."""
    cfg = settings.ingest
    local: set[str] = set()
    formats: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    duplicates = malformed = 0
    first_keys: list[str] | None = None
    for raw in iter_rows(path, cfg.csv_delimiter):
        row = normalise(raw, mapping, path.parent, settings.root)
        images.update(row["images"])
        rid = row["record_id"]
        duplicate = rid in seen or rid in local
        local.add(rid)
        row.update(
            split=split_of(rid, cfg.validation_fraction, cfg.split_salt),
            source=source,
            source_row=raw.row,
            duplicate=duplicate,
        )
        writer.write(row)
        formats[row["format"]] += 1
        splits[row["split"]] += 1
        duplicates += duplicate
        malformed += row["check_malformed_row"] is not None
        if first_keys is None and raw.record is not None:
            first_keys = [str(k) for k in raw.record]
    if writer.rows == 0:
        raise FileProblem("empty_file", "no records (only blank lines or an empty list)")
    if writer.rows > malformed and formats["unknown"] == writer.rows:
        joined = [d for d in CSV_DELIMITERS if first_keys and len(first_keys) == 1 and d in first_keys[0]]
        if path.suffix.lower() == ".csv" and joined:
            raise FileProblem(
                "unknown_schema",
                f"the header {first_keys[0]!r} reads as one column: the file looks {joined[0]!r}-delimited "
                f"(set ingest.csv_delimiter: {joined[0]!r} in params.yaml)",
                1,
            )
        raise FileProblem(
            "unknown_schema",
            f"columns {first_keys} match no schema; expected instruction/input/output, prompt/completion "
            "or messages (map other names with ingest.column_map in params.yaml)",
            1,
        )
    seen |= local
    return {
        "rows": writer.rows,
        "duplicates": duplicates,
        "formats": dict(sorted(formats.items())),
        "splits": dict(sorted(splits.items())),
    }


def unwatched_sources(settings: Settings, files: list[Path] | None = None) -> list[str]:
    """Source files outside their watched folder (``ingest.watch``, ``ingest.replay.watch``
    for replay data), one problem each: DVC's ingest stage depends on those folders only, so a
    change to such a file would never rerun the pipeline."""
    cfg = settings.ingest
    problems = []
    for setting, entries, watched, given in (
        ("ingest.sources", cfg.sources, cfg.watch, files),
        ("ingest.replay.sources", cfg.replay.sources, cfg.replay.watch, None),
    ):
        watch = settings.path(watched).resolve()
        try:
            found = given if given is not None else resolve_sources(entries, settings.root)
        except OSError:
            continue  # ingest names the unreadable source itself
        problems += [
            f"{setting}: {display_path(path, settings.root)} lies outside {setting[:-8]}.watch ({watched}): "
            "DVC watches that folder only, so a change to this file would not rerun the pipeline; move it "
            "into the watched folder, or set the watched folder to one that holds every source"
            for path in found
            if not path.resolve().is_relative_to(watch)
        ]
    return problems


def drop_manifest(path: Path, settings: Settings, cache: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """The drop a source file belongs to, with its ``drop.yaml`` (milora.data.facts) when its
    folder holds one: name, kind, keys it retires, effective date. Raises FileProblem naming
    the manifest when it is not a valid one."""
    folder = path.resolve().parent
    if folder not in cache:
        manifest = folder / DROP_MANIFEST
        name = drop_of(display_path(path, settings.root))
        try:
            data = safe_load_bounded(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
            fields = parse_drop_manifest(data)
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise FileProblem(
                "unreadable_file", f"{display_path(manifest, settings.root)}: {error}"
            ) from None
        cache[folder] = {"name": name, **fields, "date": fields["date"] or drop_date(name)}
    return cache[folder]


def _unmatched(settings: Settings, files: list[Path], report: IngestReport) -> list[Finding]:
    """Files of the watched folder this run would not read (``files``: those read, and the
    images their records name): a drop that matches no source pattern must not slip by.
    Returns them as findings under a ``fail`` policy; under ``warn`` they are logged and
    listed in the report."""
    watch = settings.path(settings.ingest.watch).resolve()
    if watch == settings.root.resolve() or not watch.is_dir():
        return []  # no drop folder configured (the whole project is not a drop folder)
    evaluation = [path for suite in settings.evaluation.suites.values() for path in suite.paths]
    contamination = settings.validation.contamination
    accounted = [*settings.ingest.ignore, *evaluation, *contamination.benchmarks, *contamination.optional]
    accounted += [str(watch / DROP_MANIFEST), str(watch / "**" / DROP_MANIFEST)]  # read with their drop
    found = unmatched_files(watch, files, accounted, settings.root)
    if not found:
        return []
    policy = settings.validation.policy("unmatched_file")
    findings = [
        Finding(
            "unmatched_file",
            display_path(path, settings.root),
            policy,
            detail="in ingest.watch but read by no ingest.sources entry: add a pattern that reads it, "
            "or name it in ingest.ignore",
        )
        for path in found
    ]
    if policy == "fail":
        return findings
    for finding in findings:
        logger.warning("not read: %s", finding.line())
    report.skipped += findings
    return []


def ingest(
    settings: Settings, sources: Sequence[str | Path] | None = None, out_dir: Path | None = None
) -> IngestReport:
    """Read ``sources`` (default ``ingest.sources``) into ``out_dir`` (default ``ingest.out_dir``).

    Raises :class:`DataValidationError` naming each file that cannot be read under a
    ``fail`` policy, and each file of ``ingest.watch`` that no source reads (unless ``sources``
    are given here); the previous output folder is then left untouched.
    """
    cfg = settings.ingest
    out = claim(settings, out_dir, "ingest.out_dir")
    entries = list(sources) if sources else cfg.sources
    try:
        files = resolve_sources(entries, settings.root)
    except OSError as error:
        raise DataValidationError([Finding("unreadable_file", str(entries), detail=str(error))]) from error
    if not files:
        raise DataValidationError(
            [
                Finding(
                    "unreadable_file", ", ".join(map(str, entries)) or "(none)", detail="no source file found"
                )
            ],
            headline="ingest failed",
        )
    outside = [] if sources else unwatched_sources(settings, files)
    if outside:
        raise SettingsError("\n".join(outside))
    try:
        replay = resolve_sources(cfg.replay.sources, settings.root)
    except OSError as error:
        raise DataValidationError(
            [Finding("unreadable_file", str(cfg.replay.sources), detail=f"ingest.replay.sources: {error}")]
        ) from error
    if cfg.replay.sources and not replay:
        raise DataValidationError(
            [
                Finding(
                    "unreadable_file",
                    ", ".join(cfg.replay.sources),
                    detail="ingest.replay.sources: no file found",
                )
            ],
            headline="ingest failed",
        )
    mapping = FieldMapping(cfg.column_map, cfg.message_keys, cfg.role_map)
    report = IngestReport(out)
    failures: list[Finding] = []
    seen: set[str] = set()
    images: set[str] = set()
    taken: set[str] = set()
    drops: dict[Path, dict[str, Any]] = {}
    with atomic_directory(out, mark=True) as scratch:
        roles = [(path, COMPANY) for path in files] + [(path, REPLAY) for path in replay]
        for path, role in tqdm(roles, desc="ingest", unit="file", disable=None):
            source = display_path(path, settings.root)
            name = part_name(source, taken)
            part = scratch / PARTS_DIR / f"{name}.parquet"
            writer = PartWriter(part, INGESTED_SCHEMA)
            try:
                drop = drop_manifest(path, settings, drops) if role == COMPANY else None
                with writer:
                    counts = _read_file(path, source, writer, settings, mapping, seen, images)
            except FileProblem as problem:
                part.unlink(missing_ok=True)
                policy = settings.validation.policy(problem.rule)
                finding = Finding(
                    problem.rule, source, policy, [problem.row] if problem.row else [], detail=problem.detail
                )
                if policy == "fail":
                    failures.append(finding)
                else:
                    logger.warning("skipping %s", finding.line())
                    report.skipped.append(finding)
                continue
            entry = {
                "file": f"{PARTS_DIR}/{name}.parquet",
                "source": source,
                "sha256": file_sha256(path),
                "drop": drop,
                "role": role,
                **counts,
            }
            report.parts.append(entry)
            logger.info(
                "%s: %d rows, %d duplicates -> %s",
                source,
                counts["rows"],
                counts["duplicates"],
                entry["file"],
            )
        if not sources:  # after reading: the images records name belong to their drop
            failures[:0] = _unmatched(settings, [*files, *(settings.path(p) for p in images)], report)
        if failures:
            raise DataValidationError(failures, headline="ingest failed")
        if not report.parts:
            raise DataValidationError(report.skipped, headline="ingest failed: every file was skipped")
        write_manifest(
            scratch,
            {
                "format_version": FORMAT_VERSION,
                "parts": report.parts,
                "rows": report.rows,
                "duplicates": report.duplicates,
                "validation_fraction": cfg.validation_fraction,
            },
        )
    logger.info(
        "ingested %d rows (%d duplicates) from %d files into %s",
        report.rows,
        report.duplicates,
        len(roles),
        out,
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help="files, folders or globs (default: ingest.sources)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ingest.out_dir)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    args = parser.parse_args(argv)
    report = ingest(load_settings(args.params), args.sources or None, args.out)
    print(
        f"{report.rows} rows ({report.duplicates} duplicates) in {len(report.parts)} parts -> {report.out_dir}"
    )
    return 0


if __name__ == "__main__":
    run_command(main)
