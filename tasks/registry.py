"""The MLflow seam: the one module that talks to the tracking store and model registry.

Everything else sees a :class:`Registry` bound to the project's settings, and plain values
(:class:`Version`, metric dicts, paths), never an MLflow client or entity:

* reads: :meth:`~Registry.version` (by number or alias), :meth:`~Registry.alias`,
  :meth:`~Registry.versions`, :meth:`~Registry.find`, :meth:`~Registry.eval_metrics`,
  :meth:`~Registry.metric_history`, :meth:`~Registry.download`;
* writes: :meth:`~Registry.new_run` (a run logged completely or ended FAILED),
  :meth:`~Registry.create_version`, :meth:`~Registry.set_alias`, :meth:`~Registry.tag`,
  :meth:`~Registry.untag`.

Where the store is: ``MLFLOW_TRACKING_URI`` wins (a shared server), otherwise
``registry.tracking_uri`` with a relative SQLite file taken from the project root, so every
stage and the flow use one database whatever their working directory. A new SQLite store is
created under a lock; :meth:`Registry.existing` opens one only if it is there (reports never
create a store). :func:`is_transient` tells a fault worth retrying (unreachable, busy) from a
request that cannot succeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

# Aliases and version tags: the registry's own vocabulary.
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"  # on a promoted version: the champion it replaced
ROLLED_BACK = "rolled_back"  # on a version demoted by a rollback
DECISION_TAG = "gate.decision"
REASONS_TAG = "gate.reasons"
RESCORED_TAG = "gate.rescored_champion"  # the champion re-scored on this version's items
OVERRIDE_TAG = "gate.override"  # why a person promoted this version past the gate
TRAIN_PREFIX = "train/"  # per-step training metrics; evaluation metrics are <suite>.<metric>

SERVING_CODE = Path(__file__).with_name("serving_model.py")  # the pyfunc model, logged as code
SERVING_MODEL = "served_model"  # name of the LoggedModel a version is registered from
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
TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
)
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
_READY: set[tuple[str, str]] = set()  # (tracking URI, experiment) prepared in this process


class RegistryError(ValueError):
    """A registry request that cannot succeed as asked (fix the input; retrying will not help)."""


@dataclass(frozen=True)
class Version:
    """A registered model version, as the pipeline needs it."""

    number: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    created: float | None = None  # seconds since the epoch
    description: str = ""
    source: str = ""

    @classmethod
    def of(cls, found: ModelVersion) -> Version:
        return cls(
            number=str(found.version),
            run_id=found.run_id or "",
            tags=dict(found.tags or {}),
            created=found.creation_timestamp / 1000 if found.creation_timestamp else None,
            description=found.description or "",
            source=found.source or "",
        )


# --------------------------------------------------------------------------- where the store is
def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path)


def _absolute_uri(uri: str, root: Path) -> str:
    """A relative ``sqlite:///x.db`` resolved against the project root (MLflow would use the cwd)."""
    path = sqlite_file(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{(root / path).resolve()}" + (f"?{query}" if query else "")


def configured_uri(settings: Settings) -> str:
    """The tracking/registry URI as configured, touching nothing."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _absolute_uri(
        settings.registry.tracking_uri, settings.root.resolve()
    )


def artifact_location(settings: Settings, uri: str) -> str | None:
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


def prepare_store(uri: str, experiment: str, location: str | None) -> None:
    """Create (and migrate) a new SQLite store once, then the experiment if absent.

    MLflow creates a new store's tables on first use, unlocked: two processes doing it at once
    fail. Here the first use happens under a lock (a file in the temp folder named after the
    database), so one process of this machine migrates and the others wait and find the
    tables there (the repository gets no lock file). An existing store at an older
    schema is not upgraded silently: MLflow's error asks for ``mlflow db upgrade`` (after a
    backup)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    database = sqlite_file(uri)
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
            client.create_experiment(experiment, artifact_location=location)
            logger.info("created MLflow experiment %s (artifacts: %s)", experiment, location)
        except MlflowException as error:  # another process created it meanwhile
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    elif found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
        logger.warning("restored deleted MLflow experiment %s", experiment)
    elif location and found.artifact_location != location:
        logger.info(
            "experiment %s keeps its artifact location %s (registry.artifact_location only applies "
            "to a new experiment)",
            experiment,
            found.artifact_location,
        )


def tracking_uri(settings: Settings) -> str:
    """The tracking/registry URI (:func:`configured_uri`), with the store migrated and the
    experiment created."""
    uri = configured_uri(settings)
    key = (uri, settings.registry.experiment)
    if key not in _READY:
        prepare_store(uri, settings.registry.experiment, artifact_location(settings, uri))
        _READY.add(key)
    return uri


def check_registry(settings: Settings) -> str:
    """Reach the configured store before any stage runs (a wrong URI or login fails in
    seconds, not after training); returns the URI. The error never shows a credential."""
    from milora.redact import redact

    try:
        uri = tracking_uri(settings)
        _client(uri).search_registered_models(max_results=1)  # a store emptied while open: no tables
        return uri
    except Exception as error:  # MLflow, SQLAlchemy and requests each raise their own types
        if "no such table" in str(error):
            raise RegistryError(
                f"the MLflow store at {redact(configured_uri(settings))} has lost its tables (emptied "
                "while this process had it open): restore it from its backup, or start again with "
                "--new-registry in a new process"
            ) from None
        raise RegistryError(
            f"the MLflow registry at {redact(configured_uri(settings))} cannot be used: "
            f"{redact(str(error)).strip().splitlines()[0] if str(error).strip() else type(error).__name__} "
            "(check MLFLOW_TRACKING_URI or registry.tracking_uri, the server and the login)"
        ) from None


# --------------------------------------------------------------------------- transient faults
def is_transient(error: BaseException | None) -> bool:
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


def is_registry_error(error: BaseException) -> bool:
    """An error raised by the registry itself (MLflow's own, or :class:`RegistryError`)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, RegistryError | MlflowException)


def retry_on_registry_fault(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry an unreachable or busy registry, never a bad request."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


# --------------------------------------------------------------------------- one run being logged
@dataclass
class RunWriter:
    """An MLflow run being logged; :meth:`Registry.new_run` ends it FINISHED or FAILED."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    model_id: str | None = None
    model_source: str | None = None

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Sequence[tuple[str, float, int, int]]) -> None:
        """``(key, value, timestamp in ms, step)`` each, in batches."""
        from mlflow.entities import Metric

        items = [Metric(key, float(value), stamp, step) for key, value, stamp, step in metrics]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_dataset(
        self, path: Path, name: str, digest: str, tags: Mapping[str, str], profile: Mapping[str, Any]
    ) -> None:
        """``path`` as the run's training input, named and digested as the caller says."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path.resolve()))
        meta = MetaDataset(source, name=name, digest=digest)
        entity = Dataset(**meta.to_dict(), profile=json.dumps(dict(profile)))
        input_tags = {MLFLOW_DATASET_CONTEXT: "training", **tags}
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(entity, [InputTag(k, v) for k, v in input_tags.items()])]
        )

    def log_file(self, path: Path, artifact_dir: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_folder(self, folder: Path, artifact_dir: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_dir)

    def log_served_model(
        self, adapter_files: Sequence[Path], adapter_root: Path, config: Mapping[str, Any]
    ) -> None:
        """The served adapter as a loadable pyfunc model of this run (models from code:
        ``serving_model.py`` and the milora package, nothing pickled); ``config`` is its
        ``model_config``, ``adapter_files`` (under ``adapter_root``) its adapter artifact.

        This is what ``mlflow.pyfunc.log_model`` does, through this client: ``log_model`` would
        use the process-wide tracking URI and active run, and log ``model_config`` as run params.
        Nothing is loaded or run: the signature is given, there is no input example, and the
        requirements are pinned by hand."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.pyfunc import save_model
        from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
        from mlflow.types.schema import Array

        import milora
        from tasks.serving_model import ADAPTER_ARTIFACT, IMAGES_COLUMN, PROMPT_COLUMN

        logged = self.client.create_logged_model(
            self.experiment_id, name=SERVING_MODEL, source_run_id=self.run_id
        )
        try:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
            with tempfile.TemporaryDirectory(prefix="milora-served-") as scratch:
                adapter = Path(scratch) / adapter_root.name
                for path in adapter_files:
                    target = adapter / path.relative_to(adapter_root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                signature = ModelSignature(
                    inputs=Schema(
                        [
                            ColSpec("string", PROMPT_COLUMN),
                            # base64 pictures, read by a vision-language base only
                            ColSpec(Array(DataType.string), IMAGES_COLUMN, required=False),
                        ]
                    ),
                    outputs=Schema([ColSpec("string")]),
                    params=ParamSchema(
                        [
                            ParamSpec(
                                "max_new_tokens", "long", config.get("max_new_tokens", SERVING_MAX_NEW_TOKENS)
                            )
                        ]
                    ),
                )
                with warnings.catch_warnings():  # deliberately none: an example would run the model
                    warnings.filterwarnings("ignore", ".*input example was not provided", UserWarning)
                    save_model(
                        path=str(Path(scratch) / "model"),
                        python_model=str(SERVING_CODE),
                        artifacts={ADAPTER_ARTIFACT: str(adapter)},
                        model_config=dict(config),
                        code_paths=[str(Path(milora.__file__).parent)],
                        pip_requirements=_serving_requirements(),
                        signature=signature,
                        mlflow_model=Model(
                            artifact_path=logged.artifact_location,
                            model_uuid=logged.model_id,
                            run_id=self.run_id,
                            model_id=logged.model_id,
                        ),
                    )
                self.client.log_model_artifacts(logged.model_id, str(Path(scratch) / "model"))
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.model_id, self.model_source = logged.model_id, logged.artifact_location
        logger.info("logged the served model %s in run %s", logged.model_id, self.run_id)


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


# --------------------------------------------------------------------------- the registry
OWNER_TAG = "milora.owner"  # host:pid of the process logging a run
INTERRUPTED_TAG = "milora.interrupted"
INTERRUPTED_AFTER_H = 24  # a RUNNING run of another host this old is taken as dead


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Registry:
    """The project's tracking store and registered model (``registry.model_name``)."""

    def __init__(self, settings: Settings, uri: str | None = None) -> None:
        """Open the configured store, creating it (and the experiment) when new; ``uri``: an
        already prepared store (:meth:`existing`)."""
        self.settings = settings
        self.uri = uri or tracking_uri(settings)
        self.name = settings.registry.model_name
        self.client = _client(self.uri)

    @classmethod
    def existing(cls, settings: Settings) -> tuple[Registry | None, str | None]:
        """The configured registry if its store exists, else None and why (creates nothing)."""
        uri = configured_uri(settings)
        database = sqlite_file(uri)
        if database is not None and not database.is_file():
            return None, f"no MLflow registry yet ({database} does not exist)"
        return cls(settings, uri), None

    # ----------------------------------------------------------------------- reads
    def alias(self, alias: str) -> Version | None:
        """The version holding ``alias``, or None."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            return Version.of(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as error:
            absent = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
            if error.error_code in absent:
                return None
            raise

    def version(self, ref: str) -> Version:
        """A version by number (``3``) or alias (``champion``); an error names what is missing."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        ref = str(ref)
        if not ref.isdigit():
            found = self.alias(ref)
            if found is None:
                raise RegistryError(f"{self.name} has no version with alias {ref!r}")
            return found
        try:
            return Version.of(self.client.get_model_version(self.name, ref))
        except MlflowException as error:
            if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise RegistryError(f"{self.name} has no version {ref}") from None
            raise

    def versions(self) -> list[Version]:
        """Every version of the registered model, oldest first."""
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted((Version.of(v) for v in found), key=lambda v: int(v.number))

    def find(self, tags: Mapping[str, str]) -> Version | None:
        """The oldest version carrying every one of ``tags`` (the one that stays when two runs
        raced to register the same content), or None."""
        clauses = [f"name = '{self.name}'"] + [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        found = self.client.search_model_versions(" and ".join(clauses), max_results=10)
        same = [Version.of(v) for v in found if all(v.tags.get(k) == value for k, value in tags.items())]
        return min(same, key=lambda v: int(v.number)) if same else None

    def eval_metrics(self, run_id: str | None) -> dict[str, float]:
        """A run's evaluation metrics (``<suite>.<metric>``), without the per-step training ones."""
        if not run_id:
            return {}
        metrics = self.client.get_run(run_id).data.metrics
        return {key: value for key, value in metrics.items() if not key.startswith(TRAIN_PREFIX)}

    def metric_history(self, run_id: str, key: str) -> list[tuple[float, float]]:
        """``(step, value)`` of one metric of a run, by step."""
        history = self.client.get_metric_history(run_id, key)
        return [(float(m.step), float(m.value)) for m in sorted(history, key=lambda m: m.step)]

    def download(self, run_id: str, artifact_path: str, into: str | os.PathLike[str]) -> Path:
        """One artifact (file or folder) of a run into ``into``; returns its local path."""
        from mlflow.artifacts import download_artifacts

        return Path(
            download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(into), tracking_uri=self.uri
            )
        )

    def download_model_artifact(
        self, version: Version, name: str, into: str | os.PathLike[str]
    ) -> Path | None:
        """Artifact ``name`` of the version's pyfunc model, where ``mlflow.pyfunc.load_model``
        would read it (the path its ``MLmodel`` gives); None for a version registered without
        a logged model. Raises when the model's files cannot be read."""
        from mlflow.artifacts import download_artifacts
        from mlflow.models import Model

        if not version.source or version.source.startswith("runs:/"):
            return None
        source = version.source.rstrip("/")
        mlmodel = download_artifacts(
            artifact_uri=f"{source}/MLmodel", dst_path=str(Path(into) / "meta"), tracking_uri=self.uri
        )
        flavor = Model.load(mlmodel).flavors.get("python_function") or {}
        relative = (flavor.get("artifacts") or {}).get(name, {}).get("path")
        if not relative:
            raise RegistryError(f"the MLmodel of version {version.number} names no {name!r} artifact")
        return Path(
            download_artifacts(
                artifact_uri=f"{source}/{relative}", dst_path=str(Path(into) / "model"), tracking_uri=self.uri
            )
        )

    # ----------------------------------------------------------------------- writes
    @contextlib.contextmanager
    def new_run(self, run_name: str, tags: Mapping[str, str]) -> Iterator[RunWriter]:
        """A new run of the experiment: ended FINISHED when the block completes, FAILED (KILLED
        on Ctrl-C) when it raises, so a half-logged run is never mistaken for a whole one."""
        experiment = self.client.get_experiment_by_name(self.settings.registry.experiment)
        if experiment is None:  # deleted by someone since the store was prepared
            raise RegistryError(f"MLflow experiment {self.settings.registry.experiment!r} does not exist")
        self.fail_interrupted(experiment.experiment_id)
        owner = {OWNER_TAG: f"{socket.gethostname()}:{os.getpid()}"}
        run = self.client.create_run(experiment.experiment_id, run_name=run_name, tags={**tags, **owner})
        writer = RunWriter(self.client, run.info.run_id, experiment.experiment_id)
        try:
            yield writer
        except BaseException as error:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            try:
                self.client.set_terminated(writer.run_id, status)
            except Exception:  # report the original error, not the follow-up one
                logger.exception("could not mark run %s %s", writer.run_id, status)
            logger.error("logging run %s failed; nothing registered: %s", writer.run_id, error)
            raise
        self.client.set_terminated(writer.run_id, "FINISHED")

    def fail_interrupted(self, experiment_id: str) -> list[str]:
        """Mark FAILED the runs (and their PENDING logged models) whose logging process died: a
        kill mid-upload would otherwise leave them RUNNING and PENDING for ever. A run is dead
        when its owner process (``OWNER_TAG``) on this host is gone, or it has run for more than
        ``INTERRUPTED_AFTER_H`` hours (an owner on another host). Returns their ids."""
        running = self.client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=500)
        now_ms, host = time.time() * 1000, socket.gethostname()
        dead = []
        for run in running:
            owner_host, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
            gone = owner_host == host and pid.isdigit() and not _process_alive(int(pid))
            if gone or now_ms - run.info.start_time > INTERRUPTED_AFTER_H * 3.6e6:
                dead.append(run.info.run_id)
        if not dead:
            return []
        for model in self.client.search_logged_models([experiment_id], max_results=1000):
            if model.source_run_id in dead and str(model.status).endswith("PENDING"):
                self.client.finalize_logged_model(model.model_id, "FAILED")
        for run_id in dead:
            self.client.set_tag(run_id, INTERRUPTED_TAG, "its process ended while logging: marked failed")
            self.client.set_terminated(run_id, "FAILED")
            logger.warning("MLflow run %s was left RUNNING by a process that died: marked FAILED", run_id)
        return dead

    def create_version(self, run: RunWriter, tags: Mapping[str, str], description: str) -> Version:
        """Register ``run``'s served model as a new version (the model is created on first use)
        and give it the ``challenger`` alias."""
        if run.model_id is None or run.model_source is None:
            raise RegistryError(f"run {run.run_id} logged no served model: nothing to register")
        self._ensure_model()
        created = self.client.create_model_version(
            self.name,
            source=run.model_source,  # the logged model's artifacts (a models:/ source needs the global URI)
            run_id=run.run_id,
            tags=dict(tags),
            description=description,
            model_id=run.model_id,
        )
        number = str(created.version)
        self.set_alias(CHALLENGER, number)
        logger.info("registered %s version %s (run %s) as %s", self.name, number, run.run_id, CHALLENGER)
        try:
            self._link(run.model_id, number)
        except Exception:  # a missing cross-link in the UI; the version itself is complete
            logger.warning("could not tag model %s with version %s", run.model_id, number, exc_info=True)
        return Version.of(created)

    def set_alias(self, alias: str, number: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(number))

    def tag(self, number: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(number), key, value)

    def delete_version(self, number: str) -> None:
        self.client.delete_model_version(self.name, str(number))

    def untag(self, number: str, key: str) -> None:
        self.client.delete_model_version_tag(self.name, str(number), key)

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        try:
            self.client.create_registered_model(
                self.name,
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

    def _link(self, model_id: str, number: str) -> None:
        """Record the version on its logged model (the ``mlflow.modelVersions`` tag the UI follows).

        A tracking server does this itself when a version is created; a local store does not (it
        keeps no model id on the version), so it is added here unless already there."""
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        existing = self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        linked = json.loads(existing) if existing else []
        entry = {"name": self.name, "version": number}
        if not any(str(e.get("name")) == self.name and str(e.get("version")) == number for e in linked):
            self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})
