"""A content-addressed store of singular triplets, so no base weight is decomposed twice.

A company fine-tunes the same base again and again; its SVD never changes. Entries are
keyed by a hash of the weight's bytes (plus shape and dtype) and the side of the spectrum,
and hold the largest rank computed so far: any request of that rank or lower is served
from disk. Files are safetensors, written atomically.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file

from milora.atomic import follow_umask
from milora.decomposition import Components

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A 128-bit content hash of a weight as it is stored (dtype, shape and bytes)."""
    data = weight.detach().contiguous().cpu()
    digest = xxhash.xxh3_128()
    digest.update(f"{data.dtype}:{tuple(data.shape)}:".encode())
    digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


class DecompositionCache:
    """Singular triplets on disk under ``root``, one file per (weight, side)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # initialisation decomposes in worker threads

    def _path(self, fingerprint: str, side: str) -> Path:
        return self.root / fingerprint[:2] / f"{fingerprint}-{side}.safetensors"

    def get(self, fingerprint: str, side: str, rank: int) -> Components | None:
        """Cached components of at least ``rank``, truncated to ``rank``; None on a miss."""
        path = self._path(fingerprint, side)
        if path.is_file():
            tensors = load_file(path)
            cached = Components(tensors["U"], tensors["S"], tensors["V"], side)
            if cached.rank >= rank:
                with self._lock:
                    self.hits += 1
                return cached.truncate(rank)
        with self._lock:
            self.misses += 1
        return None

    def put(self, fingerprint: str, components: Components) -> None:
        """Store components unless an entry of equal or larger rank is already there."""
        path = self._path(fingerprint, components.side)
        if path.is_file() and self._stored_rank(path) >= components.rank:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "U": components.U.contiguous(),
            "S": components.S.contiguous(),
            "V": components.V.contiguous(),
        }
        metadata = {"format": CACHE_FORMAT, "side": components.side, "rank": str(components.rank)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            follow_umask(tmp)  # mkstemp's 0600 would hide the entry from other users
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @staticmethod
    def _stored_rank(path: Path) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return int(handle.metadata().get("rank", 0))
