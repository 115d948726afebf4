"""Running the configured suites on a base model and on its adapter, and comparing them.

The base model's results are the "before" of every comparison: the company score before
fine-tuning and, for suites marked ``retention``, what it knew that fine-tuning may erase
(forgetting = the drop in the suite's score; for perplexity, its relative rise). They depend only on
the base weights and the suite, so they are cached under a key of both and computed once
per base model, not once per training.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from milora.data.images import parse_images
from milora.digests import digest_files
from milora.errors import UserFacingError
from milora.evaluation.datasets import read_items
from milora.evaluation.kinds import SUITE_KINDS, SuiteKind
from milora.evaluation.scoring import forgetting
from milora.evaluation.suites import SuiteResult
from milora.promotion import CONFIDENCE, PairedDifference, paired_difference
from milora.settings import SuiteSettings

logger = logging.getLogger(__name__)

RESULTS_VERSION = 3  # bump when scoring changes, so cached base results are recomputed
# 3: BOS as training adds it (special_tokens_wanted); a vision-language base asked through its processor


class EvaluationInputError(ValueError, UserFacingError):
    """An input of the evaluation (adapter, suite file) is missing or malformed."""


class SuiteFileError(EvaluationInputError):
    """A configured suite file is missing or not in its suite's format."""


def suite_files(name: str, suite: SuiteSettings, root: Path) -> list[Path]:
    """The files of a suite, globs expanded in sorted order; an error names the key."""
    files: list[Path] = []
    for pattern in suite.paths:
        resolved = pattern if os.path.isabs(pattern) else str(root / pattern)
        matched = (
            sorted(Path(p) for p in glob.glob(resolved)) if glob.has_magic(resolved) else [Path(resolved)]
        )
        files.extend(p for p in matched if p.is_file())
    if not files and suite.required:
        raise SuiteFileError(
            f"evaluate.suites.{name}.path: no file matches {suite.paths} (relative to {root}); "
            "fix the path or set required: false to skip the suite when absent"
        )
    return files


def _text_lines(path: Path, limit: int | None) -> list[dict[str, Any]]:
    lines = [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def load_suite_items(name: str, suite: SuiteSettings, root: Path) -> list[dict[str, Any]]:
    """Every item of a suite (``limit`` per file); ``.txt`` files are one text per line; an
    image suite's paths become relative to ``root`` (each must exist)."""
    kind = SUITE_KINDS[suite.kind]
    items: list[dict[str, Any]] = []
    for path in suite_files(name, suite, root):
        try:
            if kind.text_lines and path.suffix == ".txt":
                items.extend(_text_lines(path, suite.limit))
            else:
                found = read_items(path, kind.required_keys, suite.limit)
                items.extend(_with_images(path, found, root) if kind.images else found)
        except (ValueError, UnicodeDecodeError) as error:
            raise SuiteFileError(f"evaluate.suites.{name}: {error}") from None
    if suite.current_truth:
        from milora.evaluation.truth import current_truth

        items = current_truth(items)
    return items


def _with_images(path: Path, items: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Items whose ``images`` (a path or a list, relative to ``path``'s folder) are made
    relative to ``root``; a missing image names its file and record."""
    out = []
    for number, item in enumerate(items, start=1):
        listed, problems = parse_images(item["images"])
        if problems or not listed:
            reason = "; ".join(problems) or "no images"
            raise ValueError(f"{path}: record {number}: {reason} (a path or a list of paths is expected)")
        resolved = []
        for image in listed:
            full = (path.parent / image).resolve()
            if not full.is_file():
                raise ValueError(f"{path}: record {number}: image {image} not found ({full})")
            resolved.append(os.path.relpath(full, Path(root).resolve()))
        out.append({**item, "images": resolved})
    return out


def image_files(items: Iterable[dict[str, Any]], root: Path) -> list[Path]:
    """The image files an image suite's items name (each once, in order)."""
    return [root / p for p in dict.fromkeys(p for item in items for p in item.get("images") or ())]


def run_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    suite: SuiteSettings,
    items: list[dict[str, Any]],
    *,
    batch_size: int = 32,
    processor: Any = None,
    root: Path = Path("."),
) -> SuiteResult:
    """One suite on one model, by its kind (:data:`~milora.evaluation.kinds.SUITE_KINDS`);
    an image suite needs the ``processor`` of a vision-language model."""
    kind = SUITE_KINDS[suite.kind]
    if kind.images and processor is None:
        raise EvaluationInputError(
            f"evaluate.suites.{name}: a {suite.kind} suite shows the model images, and the base "
            "model is not a vision-language model (or has no processor); drop the suite or use "
            "an image-text-to-text base"
        )
    extra = {"processor": processor, "image_root": root} if kind.takes_processor and processor else {}
    return kind.score(model, tokenizer, items, suite, name=name, batch_size=batch_size, **extra)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suites: Mapping[str, SuiteSettings],
    root: Path,
    *,
    batch_size: int = 32,
    label: str = "model",
    processor: Any = None,
) -> dict[str, SuiteResult]:
    """Every suite whose files exist; a missing optional suite is skipped with a warning.
    ``processor``: a vision-language base's, for image suites."""
    results = {}
    for name, suite in suites.items():
        items = load_suite_items(name, suite, root)
        if not items:
            logger.warning("suite %s skipped: no file matches %s", name, suite.paths)
            continue
        logger.info("%s: suite %s (%s, %d items)", label, name, suite.kind, len(items))
        results[name] = run_suite(
            model, tokenizer, name, suite, items, batch_size=batch_size, processor=processor, root=root
        )
    return results


def weights_digest(model_dir: str | os.PathLike[str]) -> str:
    """A content hash of a model folder's weights and config (the base results' cache key)."""
    import xxhash

    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json"))
    return digest_files(xxhash.xxh3_128(), [(path.name.encode(), path) for path in files])


def _suite_key(weights: str, name: str, suite: SuiteSettings, root: Path, batch_size: int) -> str:
    paths = suite_files(name, suite, root)
    if SUITE_KINDS[suite.kind].images:  # the images are part of what is asked
        paths += image_files(load_suite_items(name, suite, root), root)
    files = [(os.path.relpath(p, root), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    payload = json.dumps(
        [RESULTS_VERSION, weights, name, suite.model_dump(), files, batch_size], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cached_results(
    weights: str,
    suites: Mapping[str, SuiteSettings],
    root: Path,
    cache_dir: Path | None,
    compute: Callable[[Mapping[str, SuiteSettings]], dict[str, SuiteResult]],
    *,
    batch_size: int = 32,
) -> dict[str, SuiteResult]:
    """Results of ``suites`` on the model with digest ``weights``, computing only the misses."""
    present = {name: suite for name, suite in suites.items() if suite_files(name, suite, root)}
    keys = {name: _suite_key(weights, name, suite, root, batch_size) for name, suite in present.items()}
    results: dict[str, SuiteResult] = {}
    if cache_dir is not None:
        for name, key in keys.items():
            path = cache_dir / f"{key}.json"
            if path.is_file():
                results[name] = SuiteResult.read(path)
    missing = {name: suite for name, suite in present.items() if name not in results}
    if missing:
        fresh = compute(missing)
        for name, result in fresh.items():
            if cache_dir is not None:
                result.write(cache_dir / f"{keys[name]}.json")
        results.update(fresh)
    else:
        logger.info("base-model results served from %s", cache_dir)
    return {name: results[name] for name in suites if name in results}


@dataclass
class Comparison:
    """One suite's score before (base) and after (adapter) fine-tuning."""

    suite: str
    metric: str
    n: int
    base: float | None
    adapter: float
    retention: bool
    forgetting: float | None = field(default=None)
    champion: float | None = None  # the champion's score on the same items, when re-scored
    paired: PairedDifference | None = None  # adapter - champion per item, with its interval

    @property
    def change(self) -> float | None:
        return None if self.base is None else self.adapter - self.base


def compare(
    base: Mapping[str, SuiteResult],
    adapter: Mapping[str, SuiteResult],
    suites: Mapping[str, SuiteSettings],
    champion: Mapping[str, SuiteResult] | None = None,
) -> list[Comparison]:
    """Per suite: base and adapter score; forgetting for retention suites (the drop of the
    score, or the relative rise of perplexity: positive = knowledge lost); with ``champion``
    (scored on the same items), its score and the paired per-item difference."""
    rows = []
    for name, result in adapter.items():
        before = base[name].score if name in base else None
        lost = None
        if suites[name].retention and before is not None:
            lost = forgetting(before, result.score, result.metric)
        row = Comparison(name, result.metric, result.n, before, result.score, suites[name].retention, lost)
        held = (champion or {}).get(name)
        if held is not None:
            row.champion = held.score
            row.paired = paired_on_same_items(result, held, SUITE_KINDS[suites[name].kind])
        rows.append(row)
    return rows


def paired_on_same_items(new: SuiteResult, old: SuiteResult, kind: SuiteKind) -> PairedDifference | None:
    """``new - old`` item by item, when both scored the very same items and the kind keeps
    per-item scores (not perplexity)."""
    new_items, old_items = (
        kind.item_scores(new.predictions, new.metric),
        kind.item_scores(old.predictions, old.metric),
    )
    if new_items is None or old_items is None or len(new_items) != len(old_items) or not new_items:
        return None
    asked = [row.get("question", row.get("answer")) for row in new.predictions]
    if asked != [row.get("question", row.get("answer")) for row in old.predictions]:
        return None  # other items: never paired
    return paired_difference(new_items, old_items)


def flat_metrics(rows: Iterable[Comparison], adapter: Mapping[str, SuiteResult]) -> dict[str, Any]:
    """``{suite: {metric: value, ..., base_<metric>, forgetting}}`` for DVC and MLflow."""
    metrics: dict[str, Any] = {}
    for row in rows:
        entry = {k: v for k, v in adapter[row.suite].metrics.items() if isinstance(v, int | float)}
        entry["score"] = row.adapter
        if row.base is not None:
            entry["base_score"] = row.base
        if row.forgetting is not None:
            entry["forgetting"] = row.forgetting
        entry["n"] = row.n
        if row.champion is not None:
            entry["champion_score"] = row.champion
        if row.paired is not None:
            entry.update(row.paired.metrics())
        metrics[row.suite] = entry
    return metrics


def summary_table(rows: Iterable[Comparison], champion: str | None = None) -> str:
    """A Markdown table: suite, metric, n, base, adapter, change, forgetting (and, with the
    ``champion`` version re-scored, its score and the paired difference)."""
    rows = list(rows)
    header = "| suite | metric | n | base | adapter | change | forgetting |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if champion:
        header += f" champion v{champion} | adapter - champion (paired, {CONFIDENCE:.0%} CI) |"
        rule += "---:|---:|"
    lines = [header, rule]

    def show(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    for row in rows:
        change = "" if row.change is None else f"{row.change:+.4f}"
        line = (
            f"| {row.suite} | {row.metric} | {row.n} | {show(row.base)} | {row.adapter:.4f} | {change} "
            f"| {show(row.forgetting)} |"
        )
        if champion:
            paired = (
                ""
                if row.paired is None
                else f"{row.paired.mean:+.4f} [{row.paired.low:+.4f}, {row.paired.high:+.4f}]"
            )
            line += f" {show(row.champion)} | {paired} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path,
    base: Mapping[str, SuiteResult],
    adapter: Mapping[str, SuiteResult],
    rows: list[Comparison],
    info: Mapping[str, Any],
) -> dict[str, Any]:
    """``<suite>.json`` (adapter, every prediction), ``base/<suite>.json``, ``metrics.json``,
    ``summary.md``; returns the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, result in adapter.items():
        result.write(out_dir / f"{name}.json")
    for name, result in base.items():
        result.write(out_dir / "base" / f"{name}.json")
    metrics = flat_metrics(rows, adapter)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    (out_dir / "comparison.json").write_text(
        json.dumps({"info": dict(info), "rows": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    (out_dir / "summary.md").write_text(summary_table(rows) + breakdown_text(adapter))
    return metrics


def breakdown_text(results: Mapping[str, SuiteResult]) -> str:
    """Markdown: each suite's stale rate and its headline metric per drop and per kind."""
    lines = []
    for name, result in results.items():
        if "stale_rate" in result.metrics:
            lines.append(
                f"\n{name}: stale rate {result.metrics['stale_rate']:.4f} (of {int(result.metrics['changed_facts'])} "
                "facts that changed, the share answered with an old value)"
            )
        for field_name, values in result.breakdown.items():
            shown = ", ".join(f"{value} {score:.4f}" for value, score in values.items())
            lines.append(f"\n{name} {result.metric} by {field_name}: {shown}")
    return "\n".join(lines) + ("\n" if lines else "")


def base_processor(base_path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The processor of a vision-language base (for image suites), else None."""
    from milora.modeling import is_vision_language, load_processor

    if not is_vision_language(base_path):
        return None
    return load_processor(base_path, trust_remote_code=trust_remote_code)


def evaluate_adapter(
    base_path: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    suites: Mapping[str, SuiteSettings],
    root: Path,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    merged: bool = False,
    trust_remote_code: bool = False,
    info: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[Comparison]]:
    """Score the base, then base + adapter (or the merged weights), on every suite.

    ``out_dir`` is replaced as a whole only when every suite ran (see :func:`write_results`);
    ``info`` is recorded in ``comparison.json`` beside the paths. Returns the metrics and the
    comparison rows.
    """
    from milora.adapter_io import load_adapter
    from milora.atomic import atomic_directory
    from milora.conversion import merge_adapter
    from milora.modeling import load_base_model, load_tokenizer

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise EvaluationInputError(f"{adapter}: no adapter here (adapter_config.json is missing)")
    tokenizer = load_tokenizer(base_path, trust_remote_code=trust_remote_code)
    processor = base_processor(base_path, trust_remote_code)
    model = load_base_model(base_path, trust_remote_code=trust_remote_code)
    model.eval()
    common = {"batch_size": batch_size, "processor": processor}
    base = cached_results(
        weights_digest(base_path),
        suites,
        root,
        cache_dir,
        lambda missing: evaluate_model(model, tokenizer, missing, root, label="base", **common),
        batch_size=batch_size,
    )
    tuned = merge_adapter(model, adapter) if merged else load_adapter(model, adapter)
    tuned.eval()
    results = evaluate_model(tuned, tokenizer, suites, root, label="adapter", **common)
    rows = compare(base, results, suites)
    info = {"base_model": str(base_path), "adapter": str(adapter), "merged": merged, **(info or {})}
    with atomic_directory(Path(out_dir), mark=True) as scratch:
        metrics = write_results(scratch, base, results, rows, info)
    logger.info(
        "evaluated %s: %s",
        adapter,
        "; ".join(
            f"{r.suite} {r.metric} {r.adapter:.4f}" + ("" if r.base is None else f" (base {r.base:.4f})")
            for r in rows
        ),
    )
    return metrics, rows


# --------------------------------------------------------------------------- against the champion


def read_results(folder: Path, suites: Iterable[str]) -> dict[str, SuiteResult]:
    """The ``<suite>.json`` results an evaluation wrote (suites without a file are left out)."""
    found = {}
    for name in suites:
        path = folder / f"{name}.json"
        if path.is_file():
            found[name] = SuiteResult.read(path)
    return found


def compare_with_champion(
    base_path: str | os.PathLike[str],
    champion_adapter: str | os.PathLike[str],
    champion: str,
    evaluated: str | os.PathLike[str],
    suites: Mapping[str, SuiteSettings],
    root: Path,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score ``champion``'s served adapter (a plain LoRA for the stock base) on the very items
    the challenger was scored on in ``evaluated``, and pair them item by item.

    Champion results are cached per base weights, adapter and suite (as the base's are), so
    a champion is scored once per suite content. Writes ``<suite>.json`` (the champion's
    predictions), ``paired.json`` (per suite: the champion's score and the challenger minus
    champion difference with its interval) and ``summary.md``; returns ``paired.json``."""
    from peft import PeftModel

    from milora.atomic import atomic_directory
    from milora.layout import PAIRED, adapter_digest
    from milora.modeling import load_base_model, load_tokenizer

    challenger = read_results(Path(evaluated), suites)
    if not challenger:
        raise EvaluationInputError(f"{evaluated}: no suite results of the challenger to compare with")
    base_results = read_results(Path(evaluated) / "base", suites)
    tokenizer = load_tokenizer(base_path, trust_remote_code=trust_remote_code)
    digest = adapter_digest(champion_adapter)

    def score(missing: Mapping[str, SuiteSettings]) -> dict[str, SuiteResult]:
        model = load_base_model(base_path, trust_remote_code=trust_remote_code)
        wrapped = PeftModel.from_pretrained(model, champion_adapter).eval()
        return evaluate_model(
            wrapped,
            tokenizer,
            missing,
            root,
            batch_size=batch_size,
            label=f"champion v{champion}",
            processor=base_processor(base_path, trust_remote_code),
        )

    held = cached_results(
        f"{weights_digest(base_path)}+{digest}", suites, root, cache_dir, score, batch_size=batch_size
    )
    rows = compare(base_results, challenger, {n: suites[n] for n in challenger}, held)
    paired = {
        "champion_version": champion,
        "champion_adapter_digest": digest,
        "suites": {
            row.suite: {
                "n": row.n,
                "champion_score": row.champion,
                **(row.paired.metrics() if row.paired is not None else {}),
            }
            for row in rows
            if row.champion is not None
        },
    }
    with atomic_directory(Path(out_dir), mark=True) as scratch:
        for name, result in held.items():
            result.write(scratch / f"{name}.json")
        (scratch / PAIRED).write_text(json.dumps(paired, indent=1, sort_keys=True) + "\n")
        (scratch / "summary.md").write_text(summary_table(rows, champion))
    logger.info(
        "against champion v%s: %s",
        champion,
        "; ".join(f"{r.suite} {r.paired.text()}" for r in rows if r.paired is not None) or "no paired suite",
    )
    return paired
