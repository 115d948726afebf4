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
from safetensors.torch import save_file

from milora.atomic import follow_umask
from milora.decomposition import Components

logger = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # 2: entries carry a checksum of their tensors (1 had none: recomputed)
TENSORS = ("U", "S", "V")


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 of the entry's tensors (names, dtypes, shapes and bytes): a flipped bit in a
    stored singular vector is found on read instead of initialising a wrong adapter."""
    digest = xxhash.xxh3_128()
    for name in TENSORS:
        data = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}:".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


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
        tensors = self._read(path) if path.is_file() else None
        if tensors is not None:
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
        metadata = {
            "format": CACHE_FORMAT,
            "side": components.side,
            "rank": str(components.rank),
            "checksum": tensors_checksum(tensors),
        }
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
    def _read(path: Path) -> dict[str, torch.Tensor] | None:
        """The entry's tensors if it is whole and of this format; a damaged or stale entry is
        reported by path, removed (to be recomputed) and None returned."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in TENSORS}
        except Exception as error:  # safetensors' own error type for a bad header or a short file
            problem = f"unreadable ({type(error).__name__}: {error})"
        else:
            if metadata.get("format") != CACHE_FORMAT:
                problem = f"of format {metadata.get('format')!r}, not {CACHE_FORMAT!r} (no checksum)"
            elif metadata.get("checksum") != tensors_checksum(tensors):
                problem = "corrupt (its tensors do not match the checksum written with them)"
            else:
                return tensors
        logger.warning("decomposition cache entry %s is %s: removed, recomputing it", path, problem)
        path.unlink(missing_ok=True)
        return None

    @staticmethod
    def _stored_rank(path: Path) -> int:
        """The rank an entry holds; 0 for one that cannot be read (it is then replaced)."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return int((handle.metadata() or {}).get("rank", 0))
        except Exception:  # a damaged entry: put() writes a whole one over it
            return 0
