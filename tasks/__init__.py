"""Pipeline stages, one module each: a plain function, its Prefect task, and a command.

Every stage is ``stage(settings, ...) -> report``, runnable as ``python -m tasks.<stage>``.
The data and model stages (ingest, validate, init, train, evaluate) are the commands of
``dvc.yaml``; the flow runs them through DVC with one Prefect task, ``reproduce_task``
(:mod:`tasks.reproduce`, a task run per stage, named after it), so DVC alone decides what
reruns and versions every output. The registry and report stages are Prefect tasks of their
own (:func:`stage_task`: retried only for transient faults, never for bad data). Exit codes:
0 done, 1 bad data or a failed run (the reason is printed), 2 bad parameters or usage, 75 an
I/O error (worth retrying).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.errors import UserFacingError
from milora.offline import OFFLINE_ENV
from milora.redact import install_log_redaction, redact

if TYPE_CHECKING:
    from milora.settings import Settings

# Nothing here calls out: every tool's telemetry off and the model hub offline (a user's
# explicit setting wins).
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

logger = logging.getLogger("tasks")

IO_RETRIES = 2
IO_RETRY_DELAY_S = 5
TEMPFAIL = 75  # exit status of a stage command that hit an I/O error (sysexits EX_TEMPFAIL): retried
LOCK_FILE = "dvc.lock"  # DVC's record of every stage's deps, params and output hashes
STAGES = ("ingest", "validate", "parent", "init", "train", "evaluate")  # dvc.yaml's stages, in order
# Where a stage command writes the one message a person needs when it fails (set by the
# flow's DVC runner, which shows that message instead of the command's whole output).
ERROR_FILE_ENV = "MILORA_ERROR_FILE"


def locked_hashes(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{output path: md5}`` of every stage output recorded in ``dvc.lock``."""
    path = Path(root) / LOCK_FILE
    if not path.is_file():
        return {}
    import yaml

    lock = yaml.safe_load(path.read_text()) or {}
    return {
        out["path"]: out.get("md5", "")
        for stage in (lock.get("stages") or {}).values()
        for out in stage.get("outs", [])
    }


def claim(settings: Settings, path: str | os.PathLike[str] | None, key: str) -> Path:
    """A stage's output folder (:func:`milora.atomic.claim_output`): ``path`` when the caller
    names one (a command's ``--out``, a scratch folder: anywhere), else the setting ``key``
    (inside the project); either way holding no input, and the pipeline's own. A folder
    ``dvc.lock`` records as an output is the pipeline's even without the marker (written
    before outputs were marked)."""
    from milora.atomic import claim_output

    explicit = path is not None
    if path is None:
        section, _, name = key.partition(".")
        path = settings.path(settings.model_dump(by_alias=True)[section][name])
    resolved, root = Path(path).resolve(), settings.root.resolve()
    relative = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else None
    inputs = [
        settings.path(settings.ingest.watch),
        settings.path(settings.base_model),
        settings.root / "params.yaml",
    ]
    return claim_output(
        path, root, key, inputs=inputs, adopt=relative in locked_hashes(root), confine=not explicit
    )


def stage_task(
    fn: Callable[..., Any], name: str, retry_condition: Callable[..., bool] | None = None, **options: Any
) -> Any:
    """``fn`` as a Prefect task: retried (IO_RETRIES times) only when ``retry_condition``
    says the failure was transient (default: an I/O error, never bad data); no result
    caching, since DVC and the registry decide what is already done."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(
        name=name,
        retries=IO_RETRIES,
        retry_delay_seconds=IO_RETRY_DELAY_S,
        retry_condition_fn=retry_condition or retry_on_io_error,
        cache_policy=NO_CACHE,
        **options,
    )(redacting_errors(fn))


class RedactedError(RuntimeError):
    """An error whose message carried a credential, with it masked (the original is its cause)."""


def redacting_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, whose errors carry no credential in their message: Prefect stores a failed
    task's message in its database and shows it in the UI."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            text = f"{type(error).__name__}: {error}"
            if redact(text) == text:
                raise
            raise RedactedError(redact(text)) from error

    return call


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a flaky disk or network share, never bad data."""
    from milora.data.errors import DataValidationError

    try:
        state.result()
    except DataValidationError:
        return False
    except OSError:
        return True
    except RedactedError as error:
        return isinstance(error.__cause__, OSError)
    except Exception:
        return False
    return False


def parse_overrides(items: list[str], parser: Any) -> dict[str, Any]:
    """``KEY=VALUE`` command-line overrides of params.yaml (values parsed as YAML)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set expects KEY=VALUE (e.g. train.rank=8), got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run_command(main: Callable[[], int]) -> None:
    """Run a stage's ``main`` with logging set up and the exit codes above."""
    from milora.data.errors import DataValidationError
    from milora.settings import SettingsError

    logging.basicConfig(
        level=os.environ.get("MILORA_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("great_expectations", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()
    sys.excepthook = _redacted_traceback
    message = None
    try:
        code = main()
    except SettingsError as error:
        message, code = f"error: {error}", 2
    except DataValidationError as error:
        message, code = error.summary(), 1
    except Exception as error:
        if isinstance(error, UserFacingError):
            message, code = f"error: {error}", 1
        elif isinstance(error, OSError):
            logger.exception("I/O error (exit %d: worth retrying)", TEMPFAIL)
            message, code = f"I/O error (worth retrying): {error}", TEMPFAIL
        else:
            _tell_runner(f"{type(error).__name__}: {error}")
            raise
    if message is not None:
        message = redact(message)
        if code != TEMPFAIL:
            print(message, file=sys.stderr)
        _tell_runner(message)
    sys.exit(code)


def _redacted_traceback(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    """``sys.excepthook`` for commands: the usual traceback, credentials masked."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, error, trace))))


def _tell_runner(message: str) -> None:
    """The failure's message for whoever ran the command (``ERROR_FILE_ENV``), if anyone."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as handle:
            handle.write(redact(message).strip() + "\n")
