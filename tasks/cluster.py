"""GPUs shared between flow runs: a Prefect global concurrency limit with one slot per GPU.

The retrain flow holds ``MILORA_GPUS`` slots (default 1; the cluster work pools' job
templates set it from the run's ``gpu_count``) of the limit named ``GPU_LIMIT`` while its
GPU stages run (SVD init, training, evaluation), so two trainings never share a GPU: a run
that finds every slot taken waits for one (on Kubernetes, where the scheduler places each
job on GPUs of its own; a Docker device request for N GPUs gives every container GPUs 0 to
N-1 of its host, so a Docker host needs a limit of its own with one slot). Create the limit
once on the Prefect server, with as many slots as the GPUs its workers run on::

    prefect gcl create milora-gpu --limit 4

Where no such limit exists (``make run``'s temporary Prefect, a server without it) nothing
is acquired and the run goes on, with one line in its log saying so. ``MILORA_GPU_LIMIT``
names another limit; set to an empty value it turns the guard off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

GPU_LIMIT = "milora-gpu"  # the global concurrency limit's name (prefect gcl create milora-gpu ...)
GPU_LIMIT_ENV = "MILORA_GPU_LIMIT"  # another limit's name; empty: no guard
GPUS_ENV = "MILORA_GPUS"  # GPUs (slots) one run holds; 0: a run that uses none


def gpu_limit_name() -> str:
    return os.environ.get(GPU_LIMIT_ENV, GPU_LIMIT).strip()


def gpus_per_run() -> int:
    value = os.environ.get(GPUS_ENV, "").strip() or "1"
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{GPUS_ENV}={value!r}: expected a whole number of GPUs") from None
    if count < 0:
        raise ValueError(f"{GPUS_ENV}={value!r}: expected 0 or more GPUs")
    return count


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger(__name__)


@contextmanager
def gpu_slots() -> Iterator[int]:
    """Hold this run's GPU slots of the limit for the block (waits while they are taken);
    yields the slots held (0 when there is no limit or the run uses no GPU)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    name, count = gpu_limit_name(), gpus_per_run()
    log = _logger()
    if not name or count == 0:
        yield 0
        return
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            limit = None
    if limit is None:
        log.info(
            "no global concurrency limit %r on this Prefect server: GPUs not guarded between runs "
            "(prefect gcl create %s --limit <number of GPUs>)",
            name,
            name,
        )
        yield 0
        return
    if count > limit.limit:
        raise ValueError(
            f"this run takes {count} GPUs ({GPUS_ENV}) but the limit {name!r} has {limit.limit} slots: "
            "it would wait forever"
        )
    log.info("waiting for %d of %d slots of %r (one per GPU)", count, limit.limit, name)
    # A lease renewal that fails (the API unreachable for a while) must not kill hours of
    # training: the slots are then freed by the lease's expiry, the run goes on.
    with concurrency(name, occupy=count, strict=True, raise_on_lease_renewal_failure=False):
        log.info("holding %d slot(s) of %r", count, name)
        yield count
