"""Benchmark contamination: training text copied from an evaluation set.

Two signals, both on text lower-cased and reduced to its words:

* exact match of a whole prompt field (instruction, input, instruction + input, a user
  turn) with a benchmark prompt (``instruction`` + ``input``, ``question``, ``prompt``);
* any shared word n-gram (13 by default, the GPT-3 paper's choice) with a benchmark item's
  prompt or answer. N-grams found in more than ``max_item_frequency`` benchmark items are
  templates ("Please answer the following question with true or false..."), not leakage,
  and are dropped, so training data written in a benchmark's format is not flagged.

The index (about 1 M n-grams for the ~13 k items of ``shared/benchmarks``) is built once,
vectorised with numpy, and cached on disk keyed by the benchmark files' content hashes.
Checking a drop is one dictionary lookup per word plus numpy work per n-gram.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milora.data.dataset import display_path
from milora.digests import file_sha256

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
PROMPT_FIELDS = ("instruction", "input", "question", "prompt")
ANSWER_FIELDS = ("output", "answer", "completion")
# Punctuation (ASCII and the common typographic marks) becomes space; str.split does the rest.
_PUNCT = {
    ord(c): " "
    for c in string.punctuation
    + "\u2018\u2019\u201a\u201c\u201d\u201e\u2013\u2014\u2026\u00ab\u00bb\u00bf\u00a1"
}
_PRIME = np.uint64(0x100000001B3)
_SUFFIXES = (".json", ".jsonl")
# Separator words: control characters that punctuation-stripping keeps, spaced so that
# str.split leaves them alone; texts holding them get them blanked first.
_TEXT_SEP, _ROW_SEP = " \x00 ", " \x01 "
_ROW_ID = np.uint64(2)  # word ids are odd, so 0 and 2 are free for the separators
_FILTER_MASK = np.uint64((1 << 22) - 1)


def _lines(text: str) -> list[str]:
    return text.split("\n") if text else []


def _blank_separators(text: str) -> str:
    if "\x00" in text or "\x01" in text:
        return text.replace("\x00", " ").replace("\x01", " ")
    return text


class _Lookup(dict):
    """Word -> id, 0 for words no benchmark uses (a window holding one cannot match)."""

    def __init__(self, vocab: dict[str, int]):
        super().__init__(vocab)
        self["\x00"] = 0
        self["\x01"] = int(_ROW_ID)

    def __missing__(self, word: str) -> int:
        return 0


def words(text: str) -> list[str]:
    """Lower-cased word tokens: punctuation, spacing and case do not hide a copy."""
    return text.lower().translate(_PUNCT).split()


def _key_hash(tokens: Sequence[str]) -> int:
    digest = hashlib.blake2b(" ".join(tokens).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _word_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never 0: 0 marks unknown words and gaps


def _rolling(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every window of ``n`` ids (wrapping uint64 arithmetic)."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(n):
        hashes = hashes * _PRIME + ids[offset : offset + count]
    return hashes


def benchmark_files(entries: Sequence[str | Path], root: Path, *, required: bool = True) -> list[Path]:
    """Benchmark files named by ``entries`` (files, folders, globs), sorted within each; a
    missing named path is an error, or with ``required=False`` a warning."""
    import glob

    files: list[Path] = []
    for entry in entries:
        path = Path(entry) if Path(entry).is_absolute() else Path(root) / entry
        if glob.has_magic(str(entry)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                logger.warning("contamination: no benchmark file matches %s", entry)
            files += [p for p in matches if p.suffix in _SUFFIXES]
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES)
        elif path.is_file():
            files.append(path)
        elif not required:
            logger.warning("contamination: optional benchmark path %s is absent, not checked", entry)
        else:
            raise FileNotFoundError(
                f"benchmark path {entry} does not exist (validate.contamination.benchmarks in params.yaml)"
            )
    return list(dict.fromkeys(p.resolve() for p in files))


def _items(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from data if isinstance(data, list) else []


@dataclass
class Match:
    """Which benchmark item a row overlaps, and how."""

    file: str
    item: int
    how: str

    def __str__(self) -> str:
        return f"{self.file} item {self.item} ({self.how})"


class BenchmarkIndex:
    """Exact prompt hashes and n-gram hashes of every benchmark item."""

    def __init__(
        self,
        files: list[str],
        vocab: dict[str, int],
        exact: dict[int, tuple[int, int]],
        ngram_hashes: np.ndarray,
        ngram_refs: np.ndarray,
        n: int,
    ):
        self.files, self.vocab, self.exact, self.n = files, vocab, exact, n
        self.ngram_hashes, self.ngram_refs = ngram_hashes, ngram_refs
        self._lookup = _Lookup(vocab)
        # A bitmap on the low hash bits rejects almost every window before the binary search.
        self._filter = np.zeros(_FILTER_MASK + 1, dtype=bool)
        self._filter[ngram_hashes & _FILTER_MASK] = True

    @property
    def items(self) -> int:
        return len(self.exact)

    @classmethod
    def build(
        cls, paths: Sequence[Path], root: Path, n: int = 13, max_item_frequency: int = 10
    ) -> BenchmarkIndex:
        """Read the benchmark files and index them (see the module docstring)."""
        names = [display_path(p, root) for p in paths]
        vocab: dict[str, int] = {}
        exact: dict[int, tuple[int, int]] = {}
        hash_parts: list[np.ndarray] = []
        item_parts: list[np.ndarray] = []
        item_refs: list[tuple[int, int]] = []
        for file_index, path in enumerate(paths):
            for item_index, item in enumerate(_items(path), start=1):
                if not isinstance(item, dict):
                    continue
                prompts = [item[f] for f in PROMPT_FIELDS if isinstance(item.get(f), str) and item[f].strip()]
                answers = [item[f] for f in ANSWER_FIELDS if isinstance(item.get(f), str) and item[f].strip()]
                ref = (file_index, item_index)
                for tokens in [words(t) for t in prompts] + [words("\n".join(prompts))]:
                    if tokens:
                        exact.setdefault(_key_hash(tokens), ref)
                number = len(item_refs)
                item_refs.append(ref)
                for text in prompts + answers:
                    tokens = words(text)
                    if len(tokens) < n:
                        continue
                    ids = np.fromiter(
                        (vocab[w] if w in vocab else vocab.setdefault(w, _word_id(w)) for w in tokens),
                        dtype=np.uint64,
                        count=len(tokens),
                    )
                    hashes = _rolling(ids, n)
                    hash_parts.append(hashes)
                    item_parts.append(np.full(len(hashes), number, dtype=np.int64))
        hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, dtype=np.uint64)
        owners = np.concatenate(item_parts) if item_parts else np.zeros(0, dtype=np.int64)
        # Count each n-gram once per item, then drop those shared by many items (templates).
        pairs = (
            np.unique(np.stack([hashes, owners.astype(np.uint64)]), axis=1)
            if len(hashes)
            else np.zeros((2, 0))
        )
        unique, first, counts = np.unique(pairs[0], return_index=True, return_counts=True)
        keep = counts <= max_item_frequency
        refs = np.asarray(item_refs, dtype=np.int64).reshape(-1, 2)
        ngram_refs = (
            refs[pairs[1][first[keep]].astype(np.int64)] if keep.any() else np.zeros((0, 2), np.int64)
        )
        logger.info(
            "benchmark index: %d items, %d exact prompts, %d %d-grams (%d template n-grams dropped)",
            len(item_refs), len(exact), int(keep.sum()), n, int((~keep).sum()),
        )  # fmt: skip
        return cls(names, vocab, exact, unique[keep].astype(np.uint64), ngram_refs, n)

    @classmethod
    def load_or_build(
        cls,
        paths: Sequence[Path],
        root: Path,
        cache_dir: Path | None,
        n: int = 13,
        max_item_frequency: int = 10,
    ) -> BenchmarkIndex:
        """The index from the cache when the benchmark files are unchanged, else built (and cached)."""
        if cache_dir is None:
            return cls.build(paths, root, n, max_item_frequency)
        key_source = json.dumps(
            [INDEX_VERSION, n, max_item_frequency, [[display_path(p, root), file_sha256(p)] for p in paths]]
        )
        key = hashlib.sha256(key_source.encode()).hexdigest()[:24]
        cache = Path(cache_dir) / f"benchmark-index-{key}.npz"
        if cache.is_file():
            try:
                return cls._load(cache, n)
            except (OSError, ValueError, KeyError) as error:
                logger.warning("ignoring unreadable index cache %s: %s", cache, error)
        index = cls.build(paths, root, n, max_item_frequency)
        index._save(cache)
        return index

    def _save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        exact_keys = np.fromiter(self.exact.keys(), dtype=np.uint64, count=len(self.exact))
        exact_refs = np.asarray(list(self.exact.values()), dtype=np.int64).reshape(-1, 2)
        scratch = path.with_name(path.name + ".tmp.npz")
        np.savez(
            scratch,
            files=np.frombuffer("\n".join(self.files).encode(), dtype=np.uint8),
            words=np.frombuffer("\n".join(self.vocab).encode("utf-8", "surrogatepass"), dtype=np.uint8),
            word_ids=np.fromiter(self.vocab.values(), dtype=np.uint64, count=len(self.vocab)),
            exact_keys=exact_keys,
            exact_refs=exact_refs,
            ngram_hashes=self.ngram_hashes,
            ngram_refs=self.ngram_refs,
        )
        scratch.replace(path)

    @classmethod
    def _load(cls, path: Path, n: int) -> BenchmarkIndex:
        with np.load(path, allow_pickle=False) as data:
            files = _lines(data["files"].tobytes().decode())
            vocab_words = _lines(data["words"].tobytes().decode("utf-8", "surrogatepass"))
            vocab = dict(zip(vocab_words, data["word_ids"].tolist(), strict=True))
            exact = {
                int(k): (int(a), int(b))
                for k, (a, b) in zip(data["exact_keys"], data["exact_refs"], strict=True)
            }
            return cls(files, vocab, exact, data["ngram_hashes"].copy(), data["ngram_refs"].copy(), n)

    def _match(self, ref: Sequence[int], how: str) -> Match:
        return Match(self.files[int(ref[0])], int(ref[1]), how)

    def check(self, rows: Sequence[tuple[Sequence[str], Sequence[str]]]) -> list[Match | None]:
        """For each row, given as (prompt texts, all texts), the first benchmark it overlaps."""
        found: list[Match | None] = [None] * len(rows)
        for index, (prompts, _) in enumerate(rows):
            keys = [words(t) for t in prompts]
            if len(prompts) > 1:
                keys.append(words("\n".join(prompts)))
            for tokens in keys:
                ref = self.exact.get(_key_hash(tokens)) if tokens else None
                if ref is not None:
                    found[index] = self._match(ref, "exact prompt")
                    break
        pending = [i for i, match in enumerate(found) if match is None]
        if len(self.ngram_hashes) == 0 or not pending:
            return found
        # One string, one regex pass, one lookup per word: texts separated by _TEXT_SEP
        # (id 0, so no window spans two texts), rows by _ROW_SEP (marks where rows start).
        text = _ROW_SEP.join(_TEXT_SEP.join(map(_blank_separators, rows[i][1])) for i in pending)
        tokens = words(text)
        ids = np.fromiter(map(self._lookup.__getitem__, tokens), dtype=np.uint64, count=len(tokens))
        hashes = _rolling(ids, self.n)
        if len(hashes) == 0:
            return found
        gaps = np.concatenate([[0], np.cumsum((ids == 0) | (ids == _ROW_ID))])
        clean = gaps[self.n : self.n + len(hashes)] == gaps[: len(hashes)]
        candidates = np.flatnonzero(clean & self._filter[hashes & _FILTER_MASK])
        if len(candidates) == 0:
            return found
        where = np.minimum(np.searchsorted(self.ngram_hashes, hashes[candidates]), len(self.ngram_hashes) - 1)
        hit = self.ngram_hashes[where] == hashes[candidates]
        row_of = np.cumsum(ids == _ROW_ID)
        for position, slot in zip(candidates[hit], where[hit], strict=True):
            row = pending[int(row_of[position])]
            if found[row] is None:
                found[row] = self._match(self.ngram_refs[slot], f"shares a {self.n}-word passage")
        return found
