"""Stage "register/promote/rollback": a trained, evaluated adapter into the model registry.

``python -m tasks.register [--params params.yaml] promote VERSION | rollback | show``

``register`` logs one MLflow run with everything a model version is made of (parameters,
per-step training metrics, the evaluation, the validation report and Data Docs, the
adapters, the input dataset with its DVC hash, lineage tags), and only then registers the
served adapter as a new version of ``registry.model_name`` with alias ``challenger``. The
served adapter is the plain-LoRA ``adapter_for_stock_base`` (rank 2r): it belongs to the
*unmodified* base model, whereas the raw MiLoRA adapter needs the residual base and would be
the wrong model on the original one. The version is a loadable MLflow model: a "models from
code" pyfunc (``tasks/serving_model.py``, nothing pickled) logged in the same run, holding
that adapter and the absolute path of its base, so ``mlflow.pyfunc.load_model(
"models:/<name>@champion")`` serves it. A version is its content (``IDENTITY_KEYS``: the
adapters' digest, data version, params hash, base): the same content registers nothing
(``new: False``), whatever commit or run folder produced it.

``promote`` asks the gate (:mod:`milora.promotion`) whether the challenger may replace the
``champion``; every decision and its numbers are recorded as version tags, and the replaced
champion is remembered so ``rollback`` can restore it. All MLflow calls go through
:mod:`tasks.registry`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from milora.digests import folder_sha256
from milora.layout import (
    CHAIN_RECORD,
    FROM_BASE,
    LOSS_PLOT,
    LOSS_TABLE,
    METRICS,
    PAIRED,
    RAW_ADAPTER,
    RUN_KEY,
    SERVED_ADAPTER,
    START_WEIGHTS,
    SUMMARY,
    adapter_digest,
)
from milora.promotion import SERVING, PairedDifference, by_suite, flatten, gate
from milora.records import IDENTITY_KEYS, LINEAGE_KEYS, REQUIRED_LINEAGE, Decision, RunStatus
from milora.redact import redact
from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import LOCK_FILE, TEMPFAIL, parse_overrides, run_command, stage_task
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    OVERRIDE_TAG,
    PREVIOUS,
    REASONS_TAG,
    RESCORED_TAG,
    ROLLED_BACK,
    SERVING_MAX_NEW_TOKENS,
    TRAIN_PREFIX,
    Registry,
    RegistryError,
    RunWriter,
    Version,
    is_registry_error,
    is_transient,
    retry_on_registry_fault,
)

logger = logging.getLogger(__name__)

LINEAGE_ARTIFACTS = "lineage"  # run artifact folder: dvc.lock and params.yaml of the run
# ... and {path: sha256} of the company files ingest read and of the published dataset's files
RAW_FILES, DATASET_FILES = "raw_files.json", "dataset_files.json"
# The only files of an adapter folder that are logged: PEFT's adapter, the initial factors
# (same names under initial/), the manifest and PEFT's model card. Anything else (a merged or
# residual model, tokenizer) is left out, so no base weights ever reach the artifact store.
ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "milora.json", "README.md"}
)
TRAIN_ARTIFACTS = (LOSS_PLOT, SUMMARY, METRICS, LOSS_TABLE, RUN_KEY, CHAIN_RECORD)
TRAIN_ARTIFACT_DIR = "train"  # run artifact folder of TRAIN_ARTIFACTS
# Keys of a run's chain.json that become version tags (tasks/train.py writes them).
CHAIN_TAGS = ("start", "parent_version", "rows_new", "rows_earlier", "earlier_share", "replay_share")
BASE_DIGEST_MAX_BYTES = 2 << 30  # hash the base weights only when that is cheap


# --------------------------------------------------------------------------- what a version is made of
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RegistryError(f"{path}: not valid JSON ({error})") from None


def adapter_files(folder: Path) -> list[Path]:
    """The adapter files of an adapter folder (see ``ADAPTER_FILES``), never anything else."""
    if not (folder / "adapter_config.json").is_file():
        raise RegistryError(f"{folder}: no adapter here (adapter_config.json is missing; run train first)")
    links = [p for p in sorted(folder.rglob("*")) if p.is_symlink()]
    if links:
        raise RegistryError(
            f"{links[0]}: a symbolic link inside an adapter folder is never logged (copy the file in)"
        )
    files, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        (files if path.name in ADAPTER_FILES else skipped).append(path)
    if skipped:
        logger.warning(
            "%s: not logging %d non-adapter file(s): %s",
            folder,
            len(skipped),
            ", ".join(str(p.relative_to(folder)) for p in skipped[:5]),
        )
    return files


def _inputs(settings: Settings) -> dict[str, Path]:
    """Every file and folder a registration reads, checked before anything is logged."""
    run_dir = settings.path(settings.train.run_dir)
    eval_dir = settings.path(settings.evaluation.out_dir)
    needed = {
        "train_summary": run_dir / SUMMARY,
        "served": run_dir / SERVED_ADAPTER,
        "raw": run_dir / RAW_ADAPTER,
        "eval_metrics": eval_dir / "metrics.json",
    }
    missing = [f"{name} ({path})" for name, path in needed.items() if not path.exists()]
    if missing:
        raise RegistryError(
            "nothing to register: missing "
            + ", ".join(missing)
            + " (run the train and evaluate stages first)"
        )
    return {
        **needed,
        "run_dir": run_dir,
        "eval_dir": eval_dir,
        "reports": settings.path(settings.validation.reports_dir),
        "dataset": settings.path(settings.validation.dataset_dir),
        "lock": settings.root / LOCK_FILE,
        "dvc_params": settings.root / "params.yaml",
        "champion": settings.path(settings.registry.champion_dir),
    }


def _check_lineage(lineage: Mapping[str, Any]) -> dict[str, str]:
    missing = [key for key in REQUIRED_LINEAGE if not lineage.get(key)]
    if missing:
        raise RegistryError(
            f"lineage lacks {', '.join(missing)}: a version must say which data, adapter, code and "
            "parameters made it (run the stages through DVC so dvc.lock records their hashes)"
        )
    return {key: str(value) for key, value in lineage.items() if value is not None and value != ""}


def _params(settings: Settings, chain_tags: Mapping[str, str]) -> dict[str, str]:
    """The run's parameters; a run from the champion trained with ``train.from_champion.profile``."""
    spec = settings.train.adapter_spec()
    targets = spec.target_modules
    from_champion = chain_tags.get("start", FROM_BASE) != FROM_BASE
    cfg = settings.train
    params = {
        "method": spec.method,
        "rank": spec.r,
        "alpha": spec.lora_alpha,
        "targets": targets if isinstance(targets, str) else ",".join(targets),
        "dropout": spec.lora_dropout,
        "solver": spec.solver,
        "profile": (cfg.from_champion.profile if from_champion else None) or cfg.profile,
        "base_model": settings.base_model,
        **asdict(cfg.hyperparameters(from_champion=from_champion)),
    }
    return {key: str(value) for key, value in params.items()}


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _train_metrics(path: Path) -> list[tuple[str, float, int, int]]:
    """Every numeric value of ``metrics.jsonl`` as ``(key, value, time in ms, step)``."""
    if not path.is_file():
        logger.warning("%s is missing: no per-step training metrics logged", path)
        return []
    metrics = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step, stamp = int(row.get("step", 0)), int(float(row.get("time", time.time())) * 1000)
        metrics += [
            (f"{TRAIN_PREFIX}{key}", float(value), stamp, step)
            for key, value in row.items()
            if key not in ("step", "time") and _numeric(value)
        ]
    return metrics


def _base_digest(path: Path) -> str | None:
    """The base weights' content hash (the evaluation cache's key), when reading them is cheap."""
    files = [*path.glob("*.safetensors"), *path.glob("config.json")]
    size = sum(p.stat().st_size for p in files)
    if not files or size > BASE_DIGEST_MAX_BYTES:
        logger.info("base model digest skipped (%s: %.1f GiB of weights)", path, size / (1 << 30))
        return None
    from milora.evaluation.runner import weights_digest

    return f"xxh3-128:{weights_digest(path)}"


def _log_dataset(run: RunWriter, settings: Settings, dataset: Path, lineage: dict[str, str]) -> None:
    """The training dataset as the run's input: its DVC hash as digest, where it lives, its rows."""
    version = lineage["data_version"]
    profile = {}
    manifest = dataset / "manifest.json"
    if manifest.is_file():
        content = _read_json(manifest)
        profile = {"rows": content.get("rows"), "parts": len(content.get("parts", []))}
    run.log_dataset(
        dataset,
        name=f"{settings.validation.dataset_dir}@{version}",
        digest=version[:36],
        tags={
            "dvc_md5": version,
            "raw_data_hash": lineage["raw_data_hash"],
            "rows": str(profile.get("rows", "")),
        },
        profile=profile,
    )


def _log_input_files(run: RunWriter, settings: Settings, dataset: Path) -> None:
    """Every company file's and dataset file's hash, so ``rebuild --recompute`` can name what
    differs (a drop the commit lacks, a file changed since)."""
    from tasks.lineage import raw_files

    with tempfile.TemporaryDirectory() as tmp:
        for name, files in ((RAW_FILES, raw_files(settings)), (DATASET_FILES, folder_sha256(dataset))):
            (Path(tmp) / name).write_text(json.dumps(files, indent=1, sort_keys=True) + "\n")
            run.log_file(Path(tmp) / name, LINEAGE_ARTIFACTS)


def _log_artifacts(run: RunWriter, paths: dict[str, Path]) -> None:
    """Reports, evaluation and adapters (adapter files only) under fixed artifact paths."""
    run_dir, eval_dir, reports = paths["run_dir"], paths["eval_dir"], paths["reports"]
    for name in TRAIN_ARTIFACTS:
        if (run_dir / name).is_file():
            run.log_file(run_dir / name, TRAIN_ARTIFACT_DIR)
    for path in [*sorted(eval_dir.glob("*.json")), eval_dir / "summary.md"]:
        if path.is_file():
            run.log_file(path, "eval")
    for path in sorted((eval_dir / "base").glob("*.json")):
        run.log_file(path, "eval/base")
    # The validation summary and Data Docs; never quarantine.jsonl (rows set aside for PII).
    if (reports / "summary.json").is_file():
        run.log_file(reports / "summary.json", "validation")
    else:
        logger.warning("%s: no validation summary.json to log", reports)
    docs = reports / "gx" / "data_docs"
    if docs.is_dir():
        run.log_folder(docs, "validation/data_docs")
    # What `python -m tasks.rebuild` needs besides the commit: the stage hashes DVC recorded
    # (dvc.lock, not committed by the flow) and the parameters file DVC read.
    for key in ("lock", "dvc_params"):
        if paths[key].is_file():
            run.log_file(paths[key], LINEAGE_ARTIFACTS)
    champion = paths["champion"]
    if (champion / "paired.json").is_file():
        for path in sorted(champion.glob("*.json")) + sorted(champion.glob("*.md")):
            run.log_file(path, "eval/champion")
    weights = run_dir / START_WEIGHTS  # a run from the champion: what its weights started from
    for folder in (paths["raw"], paths["served"], *([weights] if weights.is_dir() else [])):
        for path in adapter_files(folder):
            parent = path.parent.relative_to(folder)
            run.log_file(path, folder.name if str(parent) == "." else f"{folder.name}/{parent.as_posix()}")


def chain_facts(run_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """A version's place in its chain, as registry tags (parent version, start strategy, rows
    since the parent, replay shares), and its served adapter's metrics (rank, truncation
    error: the gate's ``max_compression_error``)."""
    record = _read_json(run_dir / CHAIN_RECORD) if (run_dir / CHAIN_RECORD).is_file() else {}
    summary = _read_json(run_dir / SUMMARY)
    tags = {key: str(record[key]) for key in CHAIN_TAGS if record.get(key) is not None}
    if summary.get("seconds") is not None:
        tags["train_seconds"] = f"{float(summary['seconds']):.1f}"
    weights = run_dir / START_WEIGHTS / "adapter_config.json"
    if weights.is_file():
        tags["start_weights_rank"] = str(_read_json(weights).get("r", ""))
    metrics = {
        f"{SERVING}.rank": float(summary.get("served_rank") or 0),
        f"{SERVING}.compression_error": float(summary.get("compression_error") or 0.0),
    }
    return tags, metrics


def _serving_config(settings: Settings, base_model: str) -> dict[str, Any]:
    """The registered model's ``model_config``: its base by absolute path (where it loads from)."""
    base = settings.path(base_model).resolve()
    if not (base / "config.json").is_file():
        logger.warning("%s: no base model here; the registered model will not load until it exists", base)
    return {
        "base_model": str(base),
        "max_new_tokens": SERVING_MAX_NEW_TOKENS,
        "batch_size": settings.evaluation.batch_size,
        "dtype": "float32",
        "device": None,
    }


def _check_evaluated(paths: dict[str, Path], digest: str) -> None:
    """The evaluation to be logged must be of these very adapters (by content when the
    evaluate stage recorded it, else by path)."""
    comparison = paths["eval_dir"] / "comparison.json"
    info = _read_json(comparison).get("info", {}) if comparison.is_file() else {}
    evaluated = info.get("adapter_digest")
    if evaluated and evaluated != digest:
        raise RegistryError(
            f"{paths['eval_dir']} scored adapters with digest {evaluated[:12]}, but {paths['run_dir']} now "
            f"holds {digest[:12]}: the adapters changed after evaluation (rerun the evaluate stage)"
        )
    if info.get("adapter") and Path(info["adapter"]).resolve() != paths["served"].resolve():
        logger.warning("the evaluation is of %s, not of %s", info["adapter"], paths["served"])


def _rescored(folder: Path, registry: Registry) -> tuple[str, dict[str, dict[str, float]]] | None:
    """The champion comparison of this run (``tasks.champion``), if it was made against the
    champion of now: (its version, per-suite paired metrics)."""
    path = folder / PAIRED
    found = _read_json(path) if path.is_file() else {}
    version = found.get("champion_version")
    champion = registry.alias(CHAMPION)
    if not version or champion is None or champion.number != str(version):
        return None
    return str(version), found.get("suites") or {}


# --------------------------------------------------------------------------- register
def promotion_unfinished(version: Version, champion: Version | None) -> bool:
    """Whether a run stopped between registering ``version`` and finishing its promotion: no
    gate decision yet (killed after the version was created), or a decision to promote whose
    alias move never happened (a version newer than the champion, promoted, not rolled back).
    A rerun then finishes it, so tags and aliases agree."""
    decision = version.tags.get(DECISION_TAG)
    if not decision:
        return True
    if decision not in (Decision.PROMOTED, Decision.FORCED) or version.tags.get(ROLLED_BACK):
        return False
    return champion is None or int(version.number) > int(champion.number)


def registered_version(settings: Settings, lineage: Mapping[str, Any]) -> str | None:
    """The version already holding the model ``lineage`` describes and done with (its gate
    decided and acted on), if any."""
    if any(not lineage.get(key) for key in IDENTITY_KEYS):
        return None
    registry = Registry(settings)
    found = registry.find({key: str(lineage[key]) for key in IDENTITY_KEYS})
    if found is None or promotion_unfinished(found, registry.alias(CHAMPION)):
        return None
    return found.number


def _already_registered(registry: Registry, existing: Version) -> dict[str, Any]:
    """What register returns for content a version already holds (``unfinished``: its promotion
    was cut short, and the caller should finish it)."""
    unfinished = promotion_unfinished(existing, registry.alias(CHAMPION))
    if unfinished:
        logger.warning(
            "%s version %s holds this model, but its promotion never finished: finishing it",
            registry.name,
            existing.number,
        )
    else:
        logger.info("nothing new: %s version %s already holds this model", registry.name, existing.number)
    return {
        "name": registry.name,
        "run_id": existing.run_id,
        "version": existing.number,
        "new": False,
        "unfinished": unfinished,
        "metrics": registry.eval_metrics(existing.run_id),
        "store": redact(registry.uri),
    }


def register(settings: Settings, lineage: dict[str, str]) -> dict[str, Any]:
    """Log the trained, evaluated adapter as one MLflow run, then register its served adapter.

    The registry is touched only after the run is completely logged: a failure while logging
    ends the run FAILED and registers nothing. Content registered before (``IDENTITY_KEYS``)
    is not registered again (``new: False``)."""
    lineage = _check_lineage(lineage)
    paths = _inputs(settings)
    flat = flatten(_read_json(paths["eval_metrics"]))
    # The model's identity is its content, computed here from the files to be registered.
    lineage["adapter_digest"] = adapter_digest(paths["raw"], paths["served"])
    lineage["base_model"] = lineage.get("base_model") or settings.base_model
    _check_evaluated(paths, lineage["adapter_digest"])
    registry = Registry(settings)
    name = registry.name

    identity = {key: lineage[key] for key in IDENTITY_KEYS}
    existing = registry.find(identity)
    if existing is not None:
        return _already_registered(registry, existing)

    spec = settings.train.adapter_spec()
    chain_tags, serving = chain_facts(paths["run_dir"])
    flat.update(serving)
    tags = {
        **lineage,
        **chain_tags,
        "method": spec.method,
        "rank": str(spec.r),
    }
    digest = _base_digest(settings.path(settings.base_model))
    if digest:
        tags["base_model_digest"] = digest
    served_config = _read_json(paths["served"] / "adapter_config.json")
    summary_md = paths["eval_dir"] / "summary.md"
    run_tags = {**tags, "registered_model": name}
    if summary_md.is_file():
        run_tags["mlflow.note.content"] = summary_md.read_text(encoding="utf-8")
    rescored = _rescored(paths["champion"], registry)
    if rescored:
        version, paired = rescored
        flat.update(flatten(paired))
        run_tags[RESCORED_TAG] = version
        tags[RESCORED_TAG] = version
    now = int(time.time() * 1000)
    with registry.new_run(f"{spec.method}-r{spec.r}-{lineage['data_version'][:8]}", run_tags) as run:
        run.log_metrics(
            _train_metrics(paths["run_dir"] / METRICS) + [(key, value, now, 0) for key, value in flat.items()]
        )
        run.log_params(_params(settings, chain_tags))
        _log_dataset(run, settings, paths["dataset"], lineage)
        _log_artifacts(run, paths)
        _log_input_files(run, settings, paths["dataset"])
        run.log_served_model(
            adapter_files(paths["served"]), paths["served"], _serving_config(settings, tags["base_model"])
        )

    # Everything is logged: now, and only now, the registry.
    version = registry.create_version(
        run,
        {
            **tags,
            "served_adapter": f"plain LoRA r={served_config.get('r')} for the unmodified base model",
            "served_rank": str(served_config.get("r", "")),
        },
        f"{spec.method} r={spec.r} on data {lineage['data_version']} (commit {lineage['git_commit']})",
    )
    # Two runs of the same content can both pass the check above (one stalled in its upload):
    # the store's version numbers decide, the oldest stays and a younger twin removes itself.
    kept = registry.find(identity)
    if kept is not None and kept.number != version.number:
        registry.delete_version(version.number)
        registry.set_alias(CHALLENGER, kept.number)
        logger.warning(
            "%s version %s repeated version %s (another run registered this model meanwhile): removed",
            name,
            version.number,
            kept.number,
        )
        return _already_registered(registry, kept)
    return {
        "name": name,
        "run_id": run.run_id,
        "version": version.number,
        "new": True,
        "metrics": flat,
        "store": redact(registry.uri),  # which store: a record proves a champion existed there
    }


class LostChampionError(RegistryError):
    """The store has no champion, but this project's run records show it had one."""


def lost_champion(settings: Settings, registry: Registry) -> str | None:
    """Why the store cannot be taken as new: it has no champion of the model, while a run
    record of this project promoted one in the very same store (emptied, replaced, or the
    alias deleted). None when it has a champion or never had one."""
    if registry.alias(CHAMPION) is not None:
        return None
    from tasks.report import RUNS_DIR

    store = redact(registry.uri)
    for path in sorted(settings.path(RUNS_DIR).glob("*.json"), reverse=True):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        registration = record.get("registration") or {}
        if (
            record.get("status") in (RunStatus.PROMOTED, RunStatus.FORCED)
            and registration.get("store") == store
            and registration.get("name") == registry.name
        ):
            return (
                f"{store} has no champion of {registry.name}, but run record {path} promoted its version "
                f"{registration.get('version')} there: the store was emptied or replaced, or the alias "
                "deleted. Restore the store from its backup; to start a new registry on purpose, run "
                "with --new-registry (the first model is then promoted without a gate)"
            )
    return None


# --------------------------------------------------------------------------- promote, rollback
def base_tags(settings: Settings) -> dict[str, str]:
    """What a version records of its base model: the folder and, when cheap, its weights' digest."""
    digest = _base_digest(settings.path(settings.base_model))
    return {"base_model": settings.base_model, **({"base_model_digest": digest} if digest else {})}


def other_base(new: Mapping[str, str], champion: Version, what: str) -> str | None:
    """Why a model whose base is described by ``new`` (version tags or :func:`base_tags`)
    cannot be compared with ``champion`` (another base: by weights digest when both have one,
    else by folder), or None. ``what`` names the model in the message."""
    for key in ("base_model_digest", "base_model"):
        mine, theirs = new.get(key), champion.tags.get(key)
        if mine and theirs:
            if mine != theirs:
                return (
                    f"{what} is on base {new.get('base_model')} ({key} {mine[:24]}), champion "
                    f"v{champion.number} on {champion.tags.get('base_model')} ({theirs[:24]}): "
                    "their scores are not comparable"
                )
            return None
    return None


def promote(
    settings: Settings, version: str, *, force: bool = False, reason: str = "", new_registry: bool = False
) -> dict[str, Any]:
    """Run the gate for ``version`` against the champion; on a pass it becomes the champion.

    A rejection is a normal outcome (returned, not raised): the champion stays, and the
    version's tags say which condition failed by how much. The champion's scores are the
    ones re-scored on the challenger's items in the same run when there are any (the
    version's ``gate.rescored_champion`` tag names that champion), else its stored ones (said
    in the reasons). A challenger on another base model than the champion is refused.
    ``force`` (with a ``reason``) is a person's decision past the gate: recorded on the
    version and as a run in the report. A store that lost its champion
    (:func:`lost_champion`) is an error unless ``new_registry`` says it is new on purpose."""
    if force and not reason.strip():
        raise RegistryError('a forced promotion needs a reason (--reason "..."), recorded in the registry')
    started = time.perf_counter()
    registry = Registry(settings)
    candidate = registry.version(str(version))
    number = candidate.number
    current = registry.alias(CHAMPION)
    previous = current.number if current is not None else None
    lost = None if (current is not None or new_registry) else lost_champion(settings, registry)
    if lost:
        raise LostChampionError(lost)
    if current is not None and previous == number:
        return {
            "version": number,
            "decision": Decision.PROMOTED,
            "reasons": ["already the champion"],
            "champion": number,
            "previous": current.tags.get(PREVIOUS) or None,
        }
    refused = other_base(candidate.tags, current, f"version {number}") if current is not None else None
    unloadable = _unloadable(registry, candidate)
    if unloadable:
        if force:
            raise RegistryError(f"version {number} cannot be promoted, even by hand: {unloadable}")
        passed, reasons = False, [f"{unloadable}: FAILED"]
    elif refused:
        passed, reasons = False, [f"{refused}: FAILED (promote it by hand with --force --reason if intended)"]
    else:
        rescored = candidate.tags.get(RESCORED_TAG)
        champion_metrics = registry.eval_metrics(current.run_id) if current is not None else None
        result = gate(
            registry.eval_metrics(candidate.run_id),
            champion_metrics,
            settings.registry.gate,
            rescored=rescored if current is not None and rescored == previous else None,
        )
        passed, reasons = result.passed, result.reasons
    decision = Decision.PROMOTED if passed else Decision.REJECTED
    if force and not passed:
        decision, reasons = Decision.FORCED, [f"forced by hand: {reason.strip()}", *reasons]
    compared = f" (against champion v{previous})" if previous else ""
    tags = {DECISION_TAG: decision, REASONS_TAG: ("; ".join(reasons) + compared)[:5000]}
    if decision == Decision.FORCED:
        tags[OVERRIDE_TAG] = reason.strip()[:5000]
    registry.tag(number, tags)
    if decision in (Decision.PROMOTED, Decision.FORCED):
        registry.tag(number, {PREVIOUS: previous or ""})
        if candidate.tags.get(ROLLED_BACK):
            registry.untag(number, ROLLED_BACK)
        registry.set_alias(CHAMPION, number)  # the switch, last
        logger.info("%s version %s %s to %s (was %s)", registry.name, number, decision, CHAMPION, previous)
    else:
        logger.info("%s version %s rejected by the gate: %s", registry.name, number, "; ".join(reasons))
    result = {
        "version": number,
        "decision": decision,
        "reasons": reasons,
        "champion": number if decision != Decision.REJECTED else previous,
        "previous": previous,
    }
    if decision == Decision.FORCED:
        _record_run(settings, RunStatus.FORCED, time.perf_counter() - started, decision=result)
    return result


def _unloadable(registry: Registry, version: Version) -> str | None:
    """Why the version's served adapter, as the registry holds it, would not load on its base
    (None: it would): the run's copy (what the pipeline downloads) and the one inside its
    pyfunc model (what ``mlflow.pyfunc.load_model("models:/...@champion")`` reads). Checked
    before the champion alias may move to it."""
    from milora.adapter_io import loadable_problems
    from tasks.serving_model import ADAPTER_ARTIFACT

    base = version.tags.get("base_model", "")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = registry.download(version.run_id, SERVED_ADAPTER, Path(tmp) / "run")
        except Exception as error:  # MLflow's own error types for missing artifacts
            return f"its {SERVED_ADAPTER}/ artifacts cannot be read ({error})"
        problems = [
            problem.replace(str(folder), f"{SERVED_ADAPTER}/ of run {version.run_id}")
            for problem in loadable_problems(folder, base)
        ]
        if problems:
            return "not loadable: " + "; ".join(problems[:3])
        try:
            served = registry.download_model_artifact(version, ADAPTER_ARTIFACT, Path(tmp) / "pyfunc")
        except Exception as error:
            return f"its pyfunc model's files cannot be read ({error})"
        if served is not None:
            problems = [
                problem.replace(str(served), f"the pyfunc model's {ADAPTER_ARTIFACT} artifact")
                for problem in loadable_problems(served, base)
            ]
    return "pyfunc model not loadable: " + "; ".join(problems[:3]) if problems else None


def champion_problem(settings: Settings) -> str | None:
    """Why the champion, as the registry holds it, would not load (its artifacts deleted or
    damaged), or None. Checked before a run trusts it ("nothing new") or gates against it."""
    registry = Registry(settings)
    champion = registry.alias(CHAMPION)
    problem = _unloadable(registry, champion) if champion is not None else None
    if problem is None:
        return None
    return (
        f"the champion, {registry.name} version {champion.number}: {problem}. Restore its artifacts "
        "in the store, or roll back to a version that loads (python -m tasks.register rollback)"
    )


def rollback(settings: Settings) -> dict[str, Any]:
    """Put the champion alias back on the version it replaced; the demoted one is tagged, and
    the rollback is recorded as a run (its record and page in the HTML report)."""
    started = time.perf_counter()
    registry = Registry(settings)
    current = registry.alias(CHAMPION)
    if current is None:
        raise RegistryError(f"{registry.name} has no champion: nothing to roll back")
    demoted = current.number
    previous = current.tags.get(PREVIOUS)
    if not previous:
        raise RegistryError(
            f"{registry.name} version {demoted} was the first champion: there is no previous champion to roll back to"
        )
    restored = registry.version(previous)
    unloadable = _unloadable(registry, restored)
    if unloadable:
        raise RegistryError(f"cannot roll back to version {restored.number}: {unloadable}")
    registry.tag(demoted, {ROLLED_BACK: "true"})
    if restored.tags.get(ROLLED_BACK):
        registry.untag(restored.number, ROLLED_BACK)
    registry.set_alias(CHAMPION, restored.number)
    logger.warning("%s: champion rolled back from version %s to %s", registry.name, demoted, restored.number)
    result = {"champion": restored.number, "previous": demoted, "rolled_back": demoted}
    _record_run(settings, RunStatus.ROLLED_BACK, time.perf_counter() - started, rollback=result)
    return result


def _record_run(settings: Settings, status: str, seconds: float, **facts: Any) -> None:
    """A registry action as a run record with its HTML page; a record that cannot be written
    is logged, never allowed to undo the action."""
    from tasks.html_report import html_report
    from tasks.report import report

    try:
        record = report(settings, status=status, seconds=seconds, **facts)
        html_report(settings, record["record"])
    except Exception:
        logger.exception("the %s record was not written", status)


def champion_lineage(settings: Settings) -> dict[str, str] | None:
    """The champion's version tags (lineage, gate decision) plus its version and run, or None."""
    champion = Registry(settings).alias(CHAMPION)
    if champion is None:
        return None
    return {**champion.tags, "version": champion.number, "run_id": champion.run_id}


register_task = stage_task(register, "register", retry_on_registry_fault)
promote_task = stage_task(promote, "promote", retry_on_registry_fault)
rollback_task = stage_task(rollback, "rollback", retry_on_registry_fault)


# --------------------------------------------------------------------------- command
def _describe(registry: Registry, role: str) -> list[str]:
    version = registry.alias(role)
    if version is None:
        return [f"{role}: none"]
    lines = [f"{role}: version {version.number} (run {version.run_id})"]
    for suite, values in sorted(by_suite(registry.eval_metrics(version.run_id)).items()):
        shown = [f"score {values['score']:.4f}"] if "score" in values else []
        shown += [f"n {int(values['n'])}"] if "n" in values else []
        shown += [
            f"{key} {values[key]:.4f}"
            for key in ("base_score", "forgetting", "champion_score")
            if key in values
        ]
        paired = PairedDifference.from_metrics(values)
        if paired is not None:
            shown.append(f"vs champion v{version.tags.get(RESCORED_TAG)} {paired.text()}")
        lines.append(f"  {suite}: {', '.join(shown)}")
    for key in (
        *LINEAGE_KEYS,
        "method",
        "rank",
        PREVIOUS,
        ROLLED_BACK,
        DECISION_TAG,
        REASONS_TAG,
        OVERRIDE_TAG,
    ):
        if version.tags.get(key):
            lines.append(f"  {key}: {version.tags[key]}")
    return lines


def show(settings: Settings) -> str:
    """Champion and challenger with their key metrics and tags, as text."""
    registry = Registry(settings)
    lines = [f"{registry.name} ({redact(registry.uri)})"]
    for alias in (CHAMPION, CHALLENGER):
        lines += _describe(registry, alias)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.register", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    commands = parser.add_subparsers(dest="command", required=True)
    promote_cmd = commands.add_parser(
        "promote", help="run the gate; promote VERSION to champion if it passes"
    )
    promote_cmd.add_argument("version")
    promote_cmd.add_argument(
        "--force", action="store_true", help="promote even if the gate rejects it (a person's decision)"
    )
    promote_cmd.add_argument(
        "--reason", default="", help="why (required with --force; recorded in the registry)"
    )
    promote_cmd.add_argument(
        "--new-registry", action="store_true", help="the store is new on purpose (its champion is not lost)"
    )
    commands.add_parser("rollback", help="give the champion alias back to the previous champion")
    commands.add_parser("show", help="champion and challenger with metrics and tags")
    args = parser.parse_args(argv)
    settings = load_settings(args.params, parse_overrides(args.set, parser))
    try:
        if args.command == "promote":
            result = promote(
                settings, args.version, force=args.force, reason=args.reason, new_registry=args.new_registry
            )
            print(f"version {result['version']}: {result['decision']} (champion: {result['champion']})")
            for reason in result["reasons"]:
                print(f"  - {reason}")
        elif args.command == "rollback":
            result = rollback(settings)
            print(f"champion rolled back: version {result['previous']} -> {result['champion']}")
        else:
            print(show(settings))
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if is_registry_error(error) and is_transient(error):
            logger.exception("registry unavailable (exit %d: worth retrying)", TEMPFAIL)
            return TEMPFAIL
        raise
    return 0


if __name__ == "__main__":
    run_command(main)
