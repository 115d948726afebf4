"""The SVD init shared out across the processes of a ``torchrun`` job: each target matrix is
decomposed by exactly one process, and every process ends with the same factors.

Why not let every rank decompose everything: it multiplies the init's cost by nothing, and
decompositions run on different ranks (other devices, other thread counts) may differ in the
last bits or in a singular vector's sign, which breaks ``W = W_res + s B0 A0`` between ranks.
So the matrices are assigned to ranks by estimated cost (longest first, to the least loaded
rank: the same plan on every rank, computed from the shapes alone), each rank computes its
own, and every matrix's factors are broadcast from its owner (``torch.distributed``; gloo on
CPU, NCCL on CUDA). Factors travel as float64, which holds a float32 or float64 factor
exactly, so a receiver's copy equals the owner's value bit for bit.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Shape = tuple[int, int]
Factors = tuple[torch.Tensor, torch.Tensor]


def decomposition_cost(shape: Shape) -> float:
    """Relative cost of a partial SVD of an ``m x n`` matrix: the Gram product and the
    eigensolver both scale with ``min(m, n)^2 * max(m, n)``."""
    small, large = sorted(shape)
    return float(small) ** 2 * float(large)


def plan(shapes: Mapping[str, Shape], world_size: int) -> dict[str, int]:
    """``{matrix: rank}``: longest processing time first, each to the least loaded rank (ties
    by name and rank), so every rank computes the same plan from the same shapes."""
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(shapes, key=lambda n: (-decomposition_cost(shapes[n]), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += decomposition_cost(shapes[name])
    return owners


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_processes() -> int:
    """How many processes ``torchrun`` (or ``accelerate launch``) started for this job."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[tuple[int, int]]:
    """Join the job's process group when launched with several processes and none exists yet
    (NCCL when decomposing on CUDA, gloo otherwise); left again on exit. Yields (rank, size)."""
    created = False
    if launched_processes() > 1 and dist.is_available() and not dist.is_initialized():
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if on_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks wait in the first broadcast for the slowest rank's whole share: a generous timeout.
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(hours=2))
        created = True
    try:
        yield world()
    finally:
        if created:
            dist.destroy_process_group()


@dataclass
class SharedInit:
    """The factors of every matrix, and which of them this process decomposed itself."""

    factors: dict[str, Factors]
    computed_here: list[str] = field(default_factory=list)
    per_rank: list[int] = field(default_factory=list)  # matrices each rank computed


def share_out(
    shapes: Mapping[str, Shape],
    rank: int | Mapping[str, int] | Callable[[str], int],
    compute: Callable[[str], Factors],
    *,
    progress: bool = True,
    desc: str = "init",
) -> SharedInit:
    """Every matrix's ``(A0, B0)`` (``A0``: r x in, ``B0``: out x r for an ``out x in`` shape),
    each computed by one process of the group and broadcast to the others.

    ``rank``: r of every matrix, or each matrix's own (a mapping or a function of its name,
    e.g. :meth:`milora.config.AdapterSpec.rank_of` for a ``rank_pattern``). ``compute(name)``
    runs only for this process's share. Without a process group (or with one process) it
    runs for every matrix, in the given order.
    """
    me, size = world()
    if size == 1:
        factors = {
            name: compute(name) for name in tqdm(shapes, desc=desc, unit="matrix", disable=not progress)
        }
        return SharedInit(factors, computed_here=list(factors), per_rank=[len(factors)])
    owners = plan(shapes, size)
    mine = [name for name in shapes if owners[name] == me]
    logger.info("rank %d of %d decomposes %d of %d matrices", me, size, len(mine), len(shapes))
    computed = {
        name: compute(name)
        for name in tqdm(mine, desc=f"{desc} (rank {me})", unit="matrix", disable=not progress or me != 0)
    }
    transport = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    factors: dict[str, Factors] = {}
    rank_of = rank.__getitem__ if isinstance(rank, Mapping) else rank if callable(rank) else lambda _: rank
    for name in sorted(shapes):  # the same order on every rank
        out_features, in_features = shapes[name]
        r = int(rank_of(name))
        owner = owners[name]
        if owner == me:
            A0, B0 = computed[name]
            # The receivers allocate these shapes: a mismatch would hang or garble, never raise.
            if tuple(A0.shape) != (r, in_features) or tuple(B0.shape) != (out_features, r):
                raise RuntimeError(
                    f"{name}: factors {tuple(A0.shape)}, {tuple(B0.shape)} are not the planned "
                    f"({r}, {in_features}), ({out_features}, {r})"
                )
            # Contiguous: A0 is often a transposed view, and a collective sends the raw storage.
            sent = [f.to(transport or f.device, torch.float64).contiguous() for f in (A0, B0)]
        else:
            sent = [
                torch.empty(r, in_features, dtype=torch.float64, device=transport),
                torch.empty(out_features, r, dtype=torch.float64, device=transport),
            ]
        for tensor in sent:
            dist.broadcast(tensor, src=owner)
        factors[name] = computed[name] if owner == me else (sent[0].cpu(), sent[1].cpu())
    counts = torch.zeros(size, dtype=torch.int64, device=transport)
    counts[me] = len(mine)
    dist.all_reduce(counts)
    return SharedInit(
        {name: factors[name] for name in shapes}, computed_here=mine, per_rank=[int(c) for c in counts]
    )
