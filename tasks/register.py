"""Stage "register/promote/rollback": a trained, evaluated adapter into the MLflow registry.

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
"models:/<name>@champion")`` serves it. Re-registering the same data, parameters, adapter and
commit registers nothing (``new: False``).

``promote`` is the gate: the challenger replaces the ``champion`` alias only if it is at least
as good on the primary suite, forgets no more than allowed on every retention suite, and is
not worse than the champion beyond a tolerance elsewhere. Every decision and its numbers are
recorded as version tags; the replaced champion is remembered so ``rollback`` can restore it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import LOCK_FILE, TEMPFAIL, parse_overrides, run_command, stage_task

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"
ROLLED_BACK = "rolled_back"
DECISION_TAG = "gate.decision"
REASONS_TAG = "gate.reasons"
LINEAGE_KEYS = ("data_version", "adapter_version", "git_commit", "params_hash", "raw_data_hash")
IDENTITY_KEYS = ("data_version", "params_hash", "adapter_version", "git_commit")  # same = same model
LINEAGE_ARTIFACTS = "lineage"  # run artifact folder: dvc.lock and params.yaml of the run
SERVED = "adapter_for_stock_base"  # plain LoRA for the unmodified base: what is registered
RAW = "adapter"  # the MiLoRA adapter (needs the residual base): logged, never registered
# The only files of an adapter folder that are logged: PEFT's adapter, the initial factors
# (same names under initial/), the manifest and PEFT's model card. Anything else (a merged or
# residual model, tokenizer) is left out, so no base weights ever reach the artifact store.
ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "milora.json", "README.md"}
)
SERVING_CODE = Path(__file__).with_name("serving_model.py")  # the pyfunc model, logged as code
SERVING_MODEL = "served_model"  # name of the LoggedModel a version is registered from
SERVING_ADAPTER = "adapter"  # its artifact key for the adapter (ADAPTER_ARTIFACT in serving_model.py)
SERVING_MAX_NEW_TOKENS = 128  # default answer length of the registered model (a predict param)
# What loading the registered model imports (the milora package itself is logged as code).
SERVING_REQUIREMENTS = (
    "mlflow",
    "pandas",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "accelerate",
    "tokenizers",
    "scipy",
    "numpy",
    "threadpoolctl",
    "xxhash",
    "pyyaml",
    "tqdm",
)
TRAIN_PREFIX = "train/"  # per-step training metrics; evaluation metrics are <suite>.<metric>
LOWER_IS_BETTER = frozenset({"perplexity"})  # as milora.evaluation.suites (not imported: torch)
BASE_DIGEST_MAX_BYTES = 2 << 30  # hash the base weights only when that is cheap
TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
)
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
_READY: set[tuple[str, str]] = set()  # (tracking URI, experiment) prepared in this process


class RegistryError(ValueError):
    """A registry request that cannot succeed as asked (fix the input; retrying will not help)."""


# --------------------------------------------------------------------------- connection
def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path)


def _absolute_uri(uri: str, root: Path) -> str:
    """A relative ``sqlite:///x.db`` resolved against the project root (MLflow would use the cwd)."""
    path = _sqlite_file(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{(root / path).resolve()}" + (f"?{query}" if query else "")


def _artifact_location(settings: Settings, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: a URI as given, a folder as an absolute file URI.

    A local folder means nothing to a remote tracking server (it is the client's disk): there
    the server's own default (``--artifacts-destination``) is used instead."""
    location = settings.registry.artifact_location
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return settings.path(location).resolve().as_uri()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX); elsewhere no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(uri: str) -> MlflowClient:
    """A client bound to ``uri`` (never the process-wide tracking URI, which
    ``mlflow.set_tracking_uri`` would also export as ``MLFLOW_TRACKING_URI``)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _prepare(uri: str, experiment: str, artifact_location: str | None) -> None:
    """Create (and migrate) a new SQLite store once, then the experiment if absent.

    MLflow creates a new store's tables on first use, unlocked: two processes doing it at once
    fail. Here the first use happens under a lock (a file in the temp folder named after the
    database), so one process of this machine migrates and the others wait and find the
    tables there (the repository gets no lock file). An existing store at an older
    schema is not upgraded silently: MLflow's error asks for ``mlflow db upgrade`` (after a
    backup)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    database = _sqlite_file(uri)
    if database is None:
        client = _client(uri)
    else:
        key = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
        with _file_lock(Path(tempfile.gettempdir()) / f"milora-mlflow-init-{key}.lock"):
            client = _client(uri)  # opens the store: a new database's tables are created here
            client.search_experiments(max_results=1)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            client.create_experiment(experiment, artifact_location=artifact_location)
            logger.info("created MLflow experiment %s (artifacts: %s)", experiment, artifact_location)
        except MlflowException as error:  # another process created it meanwhile
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    elif found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
        logger.warning("restored deleted MLflow experiment %s", experiment)
    elif artifact_location and found.artifact_location != artifact_location:
        logger.info(
            "experiment %s keeps its artifact location %s (registry.artifact_location only applies "
            "to a new experiment)",
            experiment,
            found.artifact_location,
        )


def configured_uri(settings: Settings) -> str:
    """The tracking/registry URI as configured, touching nothing.

    ``MLFLOW_TRACKING_URI`` wins (a shared server); otherwise ``registry.tracking_uri`` with a
    relative SQLite file taken from the project root, so every stage and the flow (whatever
    their working directory) use one database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _absolute_uri(
        settings.registry.tracking_uri, settings.root.resolve()
    )


def tracking_uri(settings: Settings) -> str:
    """The tracking/registry URI (:func:`configured_uri`), with the store migrated and the
    experiment created."""
    uri = configured_uri(settings)
    key = (uri, settings.registry.experiment)
    if key not in _READY:
        _prepare(uri, settings.registry.experiment, _artifact_location(settings, uri))
        _READY.add(key)
    return uri


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    if experiment is None:  # deleted by someone since tracking_uri() prepared it
        raise RegistryError(f"MLflow experiment {settings.registry.experiment!r} does not exist")
    return experiment.experiment_id


# --------------------------------------------------------------------------- transient faults
def _is_transient(error: BaseException | None) -> bool:
    """A registry fault worth retrying: network/disk I/O, a busy database, HTTP 429/50x."""
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RegistryError):
            return False
        if isinstance(error, OSError):  # includes ConnectionError, TimeoutError, requests' errors
            return True
        if "database is locked" in str(error):  # SQLite busy (sqlalchemy OperationalError)
            return True
        if isinstance(error, MlflowException) and (
            error.error_code in TRANSIENT_CODES or error.get_http_status_code() in TRANSIENT_STATUS
        ):
            return True
        # MLflow's REST client re-raises a connection failure as a plain MlflowException.
        error = error.__cause__ or error.__context__
    return False


def retry_on_registry_fault(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry an unreachable or busy registry, never a bad request."""
    try:
        state.result()
    except Exception as error:
        return _is_transient(error)
    return False


# --------------------------------------------------------------------------- register
def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RegistryError(f"{path}: not valid JSON ({error})") from None


def _adapter_files(folder: Path) -> list[Path]:
    """The adapter files of an adapter folder (see ``ADAPTER_FILES``), never anything else."""
    if not (folder / "adapter_config.json").is_file():
        raise RegistryError(f"{folder}: no adapter here (adapter_config.json is missing; run train first)")
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
    reports = settings.path(settings.validation.reports_dir)
    needed = {
        "train_summary": run_dir / "train_summary.json",
        "served": run_dir / SERVED,
        "raw": run_dir / RAW,
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
        "reports": reports,
        "dataset": settings.path(settings.validation.dataset_dir),
        "lock": settings.root / LOCK_FILE,
        "dvc_params": settings.root / "params.yaml",
    }


def _check_lineage(lineage: Mapping[str, Any]) -> dict[str, str]:
    missing = [key for key in LINEAGE_KEYS if not lineage.get(key)]
    if missing:
        raise RegistryError(
            f"lineage lacks {', '.join(missing)}: a version must say which data, adapter, code and "
            "parameters made it (run the stages through DVC so dvc.lock records their hashes)"
        )
    return {key: str(value) for key, value in lineage.items() if value is not None and value != ""}


def _params(settings: Settings) -> dict[str, str]:
    spec = settings.train.adapter_spec()
    targets = spec.target_modules
    params = {
        "method": spec.method,
        "rank": spec.r,
        "alpha": spec.lora_alpha,
        "targets": targets if isinstance(targets, str) else ",".join(targets),
        "dropout": spec.lora_dropout,
        "solver": spec.solver,
        "profile": settings.train.profile,
        "base_model": settings.base_model,
        **asdict(settings.train.hyperparameters()),
    }
    return {key: str(value) for key, value in params.items()}


def _train_metrics(path: Path) -> list[Any]:
    """Every numeric value of ``metrics.jsonl`` as an MLflow metric at its step and time."""
    from mlflow.entities import Metric

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
            Metric(f"{TRAIN_PREFIX}{key}", float(value), stamp, step)
            for key, value in row.items()
            if key not in ("step", "time") and _numeric(value)
        ]
    return metrics


def flat_eval_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``metrics.json`` as ``{"<suite>.<metric>": value}`` (score, base_score, forgetting, ...)."""
    return {
        f"{suite}.{key}": float(value)
        for suite, entry in metrics.items()
        for key, value in entry.items()
        if _numeric(value)
    }


def _base_digest(path: Path) -> str | None:
    """The base weights' content hash (the evaluation cache's key), when reading them is cheap."""
    files = [*path.glob("*.safetensors"), *path.glob("config.json")]
    size = sum(p.stat().st_size for p in files)
    if not files or size > BASE_DIGEST_MAX_BYTES:
        logger.info("base model digest skipped (%s: %.1f GiB of weights)", path, size / (1 << 30))
        return None
    from milora.evaluation.runner import weights_digest

    return f"xxh3-128:{weights_digest(path)}"


def _log_batches(client: MlflowClient, run_id: str, metrics: list[Any], params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_dataset(
    client: MlflowClient, run_id: str, settings: Settings, dataset: Path, lineage: dict[str, str]
) -> None:
    """The training dataset as the run's input: its DVC hash as digest, where it lives, its rows."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    version = lineage["data_version"]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(dataset.resolve()))
    meta = MetaDataset(source, name=f"{settings.validation.dataset_dir}@{version}", digest=version[:36])
    profile = {}
    manifest = dataset / "manifest.json"
    if manifest.is_file():
        content = _read_json(manifest)
        profile = {"rows": content.get("rows"), "parts": len(content.get("parts", []))}
    tags = {
        MLFLOW_DATASET_CONTEXT: "training",
        "dvc_md5": version,
        "raw_data_hash": lineage["raw_data_hash"],
        "rows": str(profile.get("rows", "")),
    }
    entity = Dataset(**meta.to_dict(), profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag(k, v) for k, v in tags.items()])])


def _log_artifacts(client: MlflowClient, run_id: str, paths: dict[str, Path]) -> None:
    """Reports, evaluation and adapters (adapter files only) under fixed artifact paths."""
    run_dir, eval_dir, reports = paths["run_dir"], paths["eval_dir"], paths["reports"]
    for name in ("loss_curve.png", "train_summary.json", "metrics.jsonl", "loss.csv", "run_key.json"):
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name), "train")
    for path in [*sorted(eval_dir.glob("*.json")), eval_dir / "summary.md"]:
        if path.is_file():
            client.log_artifact(run_id, str(path), "eval")
    for path in sorted((eval_dir / "base").glob("*.json")):
        client.log_artifact(run_id, str(path), "eval/base")
    # The validation summary and Data Docs; never quarantine.jsonl (rows set aside for PII).
    if (reports / "summary.json").is_file():
        client.log_artifact(run_id, str(reports / "summary.json"), "validation")
    else:
        logger.warning("%s: no validation summary.json to log", reports)
    docs = reports / "gx" / "data_docs"
    if docs.is_dir():
        client.log_artifacts(run_id, str(docs), "validation/data_docs")
    # What `python -m tasks.rebuild` needs besides the commit: the stage hashes DVC recorded
    # (dvc.lock, not committed by the flow) and the parameters file DVC read.
    for key in ("lock", "dvc_params"):
        if paths[key].is_file():
            client.log_artifact(run_id, str(paths[key]), LINEAGE_ARTIFACTS)
    for folder in (paths["raw"], paths["served"]):
        for path in _adapter_files(folder):
            parent = path.parent.relative_to(folder)
            target = folder.name if str(parent) == "." else f"{folder.name}/{parent.as_posix()}"
            client.log_artifact(run_id, str(path), target)


def _serving_requirements() -> list[str]:
    """``SERVING_REQUIREMENTS`` pinned to the installed versions, so MLflow infers nothing
    (its inference would load and run the model)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in SERVING_REQUIREMENTS:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


def _log_served_model(
    client: MlflowClient, run_id: str, experiment_id: str, settings: Settings, served: Path, base_model: str
) -> tuple[str, str]:
    """Log the served adapter as a loadable pyfunc model (models from code) of run ``run_id``;
    returns its model id and artifact location.

    This is what ``mlflow.pyfunc.log_model`` does, through this client: ``log_model`` would
    use the process-wide tracking URI and active run, and log ``model_config`` as run params.
    Nothing is loaded or run: the signature is given, there is no input example, and the
    requirements are pinned by hand."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import save_model
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import milora

    base = settings.path(base_model).resolve()
    if not (base / "config.json").is_file():
        logger.warning("%s: no base model here; the registered model will not load until it exists", base)
    logged = client.create_logged_model(experiment_id, name=SERVING_MODEL, source_run_id=run_id)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="milora-served-") as scratch:
            adapter = Path(scratch) / SERVED
            for path in _adapter_files(served):
                target = adapter / path.relative_to(served)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            signature = ModelSignature(
                inputs=Schema([ColSpec("string", "prompt")]),
                outputs=Schema([ColSpec("string")]),
                params=ParamSchema([ParamSpec("max_new_tokens", "long", SERVING_MAX_NEW_TOKENS)]),
            )
            with warnings.catch_warnings():  # deliberately none: an example would run the model
                warnings.filterwarnings("ignore", ".*input example was not provided", UserWarning)
                save_model(
                    path=str(Path(scratch) / "model"),
                    python_model=str(SERVING_CODE),
                    artifacts={SERVING_ADAPTER: str(adapter)},
                    model_config={
                        "base_model": str(base),
                        "max_new_tokens": SERVING_MAX_NEW_TOKENS,
                        "batch_size": settings.evaluation.batch_size,
                        "dtype": "float32",
                        "device": None,
                    },
                    code_paths=[str(Path(milora.__file__).parent)],
                    pip_requirements=_serving_requirements(),
                    signature=signature,
                    mlflow_model=Model(
                        artifact_path=logged.artifact_location,
                        model_uuid=logged.model_id,
                        run_id=run_id,
                        model_id=logged.model_id,
                    ),
                )
            client.log_model_artifacts(logged.model_id, str(Path(scratch) / "model"))
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    logger.info("logged the served model %s (base %s) in run %s", logged.model_id, base, run_id)
    return logged.model_id, logged.artifact_location


def _link_model_version(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Record the version on its logged model (the ``mlflow.modelVersions`` tag the UI follows).

    A tracking server does this itself when a version is created; a local store does not (it
    keeps no model id on the version), so it is added here unless already there."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    existing = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    linked = json.loads(existing) if existing else []
    entry = {"name": name, "version": version}
    if not any(str(e.get("name")) == name and str(e.get("version")) == version for e in linked):
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def _find_version(client: MlflowClient, name: str, lineage: Mapping[str, str]) -> ModelVersion | None:
    """A registered version of the very same model (data, parameters, adapter, commit)."""
    clauses = [f"name = '{name}'"] + [f"tags.`{key}` = '{lineage[key]}'" for key in IDENTITY_KEYS]
    found = client.search_model_versions(" and ".join(clauses), max_results=10)
    same = [v for v in found if all(v.tags.get(key) == lineage[key] for key in IDENTITY_KEYS)]
    return max(same, key=lambda v: int(v.version)) if same else None


def registered_version(settings: Settings, lineage: Mapping[str, Any]) -> str | None:
    """The version already holding the model ``lineage`` describes, if any."""
    if any(not lineage.get(key) for key in IDENTITY_KEYS):
        return None
    found = _find_version(_client(tracking_uri(settings)), settings.registry.model_name, lineage)
    return str(found.version) if found is not None else None


def _eval_metrics_of_run(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    metrics = client.get_run(run_id).data.metrics
    return {key: value for key, value in metrics.items() if not key.startswith(TRAIN_PREFIX)}


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(
            name,
            description=(
                "Company assistant adapters: plain LoRA (rank 2r, converted from MiLoRA) for the "
                "unmodified base model named in each version's base_model tag, each a pyfunc model "
                "(mlflow.pyfunc.load_model). Aliases: champion "
                "(served), challenger (latest registered)."
            ),
        )
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def register(settings: Settings, lineage: dict[str, str]) -> dict[str, Any]:
    """Log the trained, evaluated adapter as one MLflow run, then register its served adapter.

    The registry is touched only after the run is completely logged: a failure while logging
    ends the run FAILED and registers nothing. The same data, parameters, adapter and commit
    registered before are not registered again (``new: False``)."""
    from mlflow.entities import Metric

    lineage = _check_lineage(lineage)
    paths = _inputs(settings)
    eval_metrics = _read_json(paths["eval_metrics"])
    flat = flat_eval_metrics(eval_metrics)
    uri = tracking_uri(settings)
    client = _client(uri)
    name = settings.registry.model_name

    existing = _find_version(client, name, lineage)
    if existing is not None:
        logger.info("nothing new: %s version %s already holds this model", name, existing.version)
        return {
            "name": name,
            "run_id": existing.run_id,
            "version": str(existing.version),
            "new": False,
            "metrics": _eval_metrics_of_run(client, existing.run_id),
        }

    comparison = paths["eval_dir"] / "comparison.json"
    if comparison.is_file():
        evaluated = _read_json(comparison).get("info", {}).get("adapter")
        if evaluated and Path(evaluated).resolve() != paths["raw"].resolve():
            logger.warning("the evaluation is of %s, not of %s", evaluated, paths["raw"])
    spec = settings.train.adapter_spec()
    tags = {
        **lineage,
        "base_model": lineage.get("base_model") or settings.base_model,
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
    experiment_id = _experiment_id(client, settings)
    run = client.create_run(
        experiment_id,
        run_name=f"{spec.method}-r{spec.r}-{lineage['data_version'][:8]}",
        tags=run_tags,
    )
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = _train_metrics(paths["run_dir"] / "metrics.jsonl")
        metrics += [Metric(key, value, now, 0) for key, value in flat.items()]
        _log_batches(client, run_id, metrics, _params(settings))
        _log_dataset(client, run_id, settings, paths["dataset"], lineage)
        _log_artifacts(client, run_id, paths)
        model_id, model_source = _log_served_model(
            client, run_id, experiment_id, settings, paths["served"], tags["base_model"]
        )
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            client.set_terminated(run_id, status)
        except Exception:  # report the original error, not the follow-up one
            logger.exception("could not mark run %s %s", run_id, status)
        logger.error("logging run %s failed; nothing registered: %s", run_id, error)
        raise
    client.set_terminated(run_id, "FINISHED")

    # Everything is logged: now, and only now, the registry.
    _ensure_registered_model(client, name)
    version_tags = {
        **tags,
        "served_adapter": f"plain LoRA r={served_config.get('r')} for the unmodified base model",
        "served_rank": str(served_config.get("r", "")),
    }
    version = client.create_model_version(
        name,
        source=model_source,  # the logged model's artifacts (a models:/ source needs the global URI)
        run_id=run_id,
        tags=version_tags,
        description=f"{spec.method} r={spec.r} on data {lineage['data_version']} (commit {lineage['git_commit']})",
        model_id=model_id,
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    logger.info("registered %s version %s (run %s) as %s", name, version.version, run_id, CHALLENGER)
    try:
        _link_model_version(client, model_id, name, str(version.version))
    except Exception:  # a missing cross-link in the UI; the version itself is complete
        logger.warning("could not tag model %s with version %s", model_id, version.version, exc_info=True)
    return {"name": name, "run_id": run_id, "version": str(version.version), "new": True, "metrics": flat}


# --------------------------------------------------------------------------- gate
def _suites(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"<suite>.<metric>": v}`` back to ``{suite: {metric: v}}`` (suite names may hold dots)."""
    suites: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        suite, _, metric = key.rpartition(".")
        if suite and not (isinstance(value, float) and math.isnan(value)):
            suites.setdefault(suite, {})[metric] = value
    return suites


def gate(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, settings: Settings
) -> tuple[bool, list[str]]:
    """Whether ``challenger``'s evaluation metrics may replace ``champion``'s, and why (each
    condition with its numbers). ``None`` for the champion: the first model passes."""
    if champion is None:
        return True, ["first model: no champion yet"]
    cfg = settings.registry.gate
    new, old = _suites(challenger), _suites(champion)
    passed, reasons = True, []

    def check(ok: bool, text: str) -> None:
        nonlocal passed
        passed &= ok
        reasons.append(f"{text}: {'ok' if ok else 'FAILED'}")

    primary = cfg.primary_suite
    if "score" not in new.get(primary, {}):
        check(False, f"{primary} (primary suite): not evaluated for the challenger")
    elif "score" not in old.get(primary, {}):
        reasons.append(f"{primary} (primary suite): champion has no score; not compared")
    else:
        score, floor = new[primary]["score"], old[primary]["score"] + cfg.min_primary_gain
        check(
            score >= floor,
            f"{primary} score {score:.4f} >= champion {old[primary]['score']:.4f} "
            f"+ min gain {cfg.min_primary_gain:.4f} = {floor:.4f}",
        )
    for suite, values in sorted(new.items()):
        if "forgetting" in values:
            check(
                values["forgetting"] <= cfg.max_forgetting,
                f"{suite} forgetting {values['forgetting']:.4f} <= max {cfg.max_forgetting:.4f}",
            )
    for suite in sorted(set(new) | set(old)):
        if suite == primary:
            continue
        if "score" not in new.get(suite, {}):
            reasons.append(f"{suite}: not evaluated for the challenger; not compared")
            continue
        if "score" not in old.get(suite, {}):
            reasons.append(f"{suite}: champion has no score; not compared")
            continue
        score, before = new[suite]["score"], old[suite]["score"]
        if LOWER_IS_BETTER & (set(new[suite]) | set(old[suite])):
            limit = before + cfg.tolerance
            check(
                score <= limit,
                f"{suite} perplexity {score:.4f} <= champion {before:.4f} + tolerance "
                f"{cfg.tolerance:.4f} = {limit:.4f} (lower is better)",
            )
        else:
            limit = before - cfg.tolerance
            check(
                score >= limit,
                f"{suite} score {score:.4f} >= champion {before:.4f} - tolerance {cfg.tolerance:.4f} = {limit:.4f}",
            )
    return passed, reasons


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        absent = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
        if error.error_code in absent:
            return None
        raise


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise RegistryError(f"{name} has no version {version}") from None
        raise


def promote(settings: Settings, version: str) -> dict[str, Any]:
    """Run the gate for ``version`` against the champion; on a pass it becomes the champion.

    A rejection is a normal outcome (returned, not raised): the champion stays, and the
    version's tags say which condition failed by how much."""
    client = _client(tracking_uri(settings))
    name = settings.registry.model_name
    candidate = _version(client, name, str(version))
    number = str(candidate.version)
    current = _alias(client, name, CHAMPION)
    previous = str(current.version) if current is not None else None
    if current is not None and previous == number:
        return {
            "version": number,
            "decision": "promoted",
            "reasons": ["already the champion"],
            "champion": number,
            "previous": current.tags.get(PREVIOUS) or None,
        }
    challenger_metrics = _eval_metrics_of_run(client, candidate.run_id)
    champion_metrics = _eval_metrics_of_run(client, current.run_id) if current is not None else None
    passed, reasons = gate(challenger_metrics, champion_metrics, settings)
    decision = "promoted" if passed else "rejected"
    compared = f" (against champion v{previous})" if previous else ""
    client.set_model_version_tag(name, number, DECISION_TAG, decision)
    client.set_model_version_tag(name, number, REASONS_TAG, ("; ".join(reasons) + compared)[:5000])
    if passed:
        client.set_model_version_tag(name, number, PREVIOUS, previous or "")
        if candidate.tags.get(ROLLED_BACK):
            client.delete_model_version_tag(name, number, ROLLED_BACK)
        client.set_registered_model_alias(name, CHAMPION, number)  # the switch, last
        logger.info("%s version %s promoted to %s (was %s)", name, number, CHAMPION, previous)
    else:
        logger.info("%s version %s rejected by the gate: %s", name, number, "; ".join(reasons))
    return {
        "version": number,
        "decision": decision,
        "reasons": reasons,
        "champion": number if passed else previous,
        "previous": previous,
    }


def rollback(settings: Settings) -> dict[str, Any]:
    """Put the champion alias back on the version it replaced; the demoted one is tagged."""
    client = _client(tracking_uri(settings))
    name = settings.registry.model_name
    current = _alias(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion: nothing to roll back")
    demoted = str(current.version)
    previous = current.tags.get(PREVIOUS)
    if not previous:
        raise RegistryError(
            f"{name} version {demoted} was the first champion: there is no previous champion to roll back to"
        )
    restored = _version(client, name, previous)
    client.set_model_version_tag(name, demoted, ROLLED_BACK, "true")
    if restored.tags.get(ROLLED_BACK):
        client.delete_model_version_tag(name, str(restored.version), ROLLED_BACK)
    client.set_registered_model_alias(name, CHAMPION, str(restored.version))
    logger.warning("%s: champion rolled back from version %s to %s", name, demoted, restored.version)
    return {"champion": str(restored.version), "previous": demoted, "rolled_back": demoted}


def model_version(settings: Settings, ref: str) -> ModelVersion:
    """A version of the registered model by number (``3``) or alias (``champion``)."""
    client = _client(tracking_uri(settings))
    name = settings.registry.model_name
    if ref.isdigit():
        return _version(client, name, ref)
    found = _alias(client, name, ref)
    if found is None:
        raise RegistryError(f"{name} has no version with alias {ref!r}")
    return found


def champion_lineage(settings: Settings) -> dict[str, str] | None:
    """The champion's version tags (lineage, gate decision) plus its version and run, or None."""
    client = _client(tracking_uri(settings))
    champion = _alias(client, settings.registry.model_name, CHAMPION)
    if champion is None:
        return None
    return {**champion.tags, "version": str(champion.version), "run_id": champion.run_id or ""}


register_task = stage_task(register, "register", retry_on_registry_fault)
promote_task = stage_task(promote, "promote", retry_on_registry_fault)
rollback_task = stage_task(rollback, "rollback", retry_on_registry_fault)


# --------------------------------------------------------------------------- command
def _describe(client: MlflowClient, role: str, version: ModelVersion | None) -> list[str]:
    if version is None:
        return [f"{role}: none"]
    lines = [f"{role}: version {version.version} (run {version.run_id})"]
    suites = _suites(_eval_metrics_of_run(client, version.run_id))
    for suite, values in sorted(suites.items()):
        shown = [f"score {values['score']:.4f}"] if "score" in values else []
        shown += [f"{key} {values[key]:.4f}" for key in ("base_score", "forgetting") if key in values]
        lines.append(f"  {suite}: {', '.join(shown)}")
    for key in (
        *LINEAGE_KEYS,
        "base_model",
        "method",
        "rank",
        PREVIOUS,
        ROLLED_BACK,
        DECISION_TAG,
        REASONS_TAG,
    ):
        if version.tags.get(key):
            lines.append(f"  {key}: {version.tags[key]}")
    return lines


def show(settings: Settings) -> str:
    """Champion and challenger with their key metrics and tags, as text."""
    client = _client(tracking_uri(settings))
    name = settings.registry.model_name
    lines = [f"{name} ({tracking_uri(settings)})"]
    for alias in (CHAMPION, CHALLENGER):
        lines += _describe(client, alias, _alias(client, name, alias))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    parser = argparse.ArgumentParser(prog="python -m tasks.register", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    commands = parser.add_subparsers(dest="command", required=True)
    promote_cmd = commands.add_parser(
        "promote", help="run the gate; promote VERSION to champion if it passes"
    )
    promote_cmd.add_argument("version")
    commands.add_parser("rollback", help="give the champion alias back to the previous champion")
    commands.add_parser("show", help="champion and challenger with metrics and tags")
    args = parser.parse_args(argv)
    settings = load_settings(args.params, parse_overrides(args.set, parser))
    try:
        if args.command == "promote":
            result = promote(settings, args.version)
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
    except MlflowException as error:
        if _is_transient(error):
            logger.exception("registry unavailable (exit %d: worth retrying)", TEMPFAIL)
            return TEMPFAIL
        raise
    return 0


if __name__ == "__main__":
    run_command(main)
