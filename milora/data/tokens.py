"""Token counts with the base model's own tokenizer, fast enough for every row.

Rendering the chat template per row is slow (Jinja per record), so a record's count is the
tokens of each turn's content (one batched call into the Rust tokenizer) plus the
template's fixed cost per turn, measured once on probe conversations. Rows that come within
10% of the limit are re-counted exactly through the template, so the ``max_tokens`` verdict
is exact where it matters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_CHUNK = 4096
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model_dir: Path) -> int | None:
    """The model's context window from its ``config.json`` (None when it does not say)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    for key in _CONTEXT_KEYS:
        value = data.get(key) or data.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def image_tokens(model_dir: Path) -> int:
    """Tokens one image takes in the model's input: ``image_seq_length`` of its ``config.json``
    (top level, as LLaVA-style configs state it); 0 when it does not say (a text model)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return 0
    value = json.loads(config.read_text(encoding="utf-8")).get("image_seq_length")
    return value if isinstance(value, int) and value > 0 else 0


def special_tokens_of(tokenizer: Any) -> tuple[str, ...]:
    """The texts ``tokenizer`` reads as special tokens rather than as text: its named ones
    (BOS, EOS, padding, ...) and every added token marked special (a chat template's turn
    markers, a vision model's image placeholder)."""
    found = set(tokenizer.all_special_tokens)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(token.content for token in added.values() if token.special)
    return tuple(sorted(found))


class TokenCounter:
    """Counts the tokens a record costs in training, with the tokenizer at ``path``."""

    def __init__(self, path: Path | str):
        from transformers import AutoTokenizer

        from milora.modeling import is_vision_language, text_as_parts

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {self.path} does not exist (set base_model or validate.tokenizer)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(self.path), local_files_only=True, trust_remote_code=False
        )
        if is_vision_language(self.path):  # its template may render plain-text turns as nothing
            text_as_parts(self.tokenizer)
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.special_tokens = special_tokens_of(self.tokenizer)
        self.per_turn, self.fixed = self._template_cost()
        logger.info("tokenizer %s: %d tokens per turn, %d per record", self.path, self.per_turn, self.fixed)

    def count_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens of each text without special tokens."""
        counts = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), _CHUNK):
            chunk = list(texts[start : start + _CHUNK])
            if self._backend is not None:
                encodings = self._backend.encode_batch(chunk, add_special_tokens=False)
                counts[start : start + len(chunk)] = [len(e) for e in encodings]
            else:
                ids = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
                counts[start : start + len(chunk)] = [len(i) for i in ids]
        return counts

    def _render_count(self, messages: Sequence[dict[str, str]]) -> int:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False)
        return int(self.count_texts([text])[0])

    def _template_cost(self) -> tuple[int, int]:
        """(tokens per turn, tokens per record) the template adds around the contents."""
        if not getattr(self.tokenizer, "chat_template", None):
            # No template: training adds its own prompt; count BOS/EOS only.
            return 0, len(self.tokenizer("x")["input_ids"]) - int(self.count_texts(["x"])[0]) + 1
        probes = [
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
            [
                {"role": "system", "content": "note"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"},
            ],
        ]
        overhead = []
        for probe in probes:
            try:
                content = int(self.count_texts([m["content"] for m in probe]).sum())
                overhead.append(self._render_count(probe) - content)
            except Exception:  # a template that rejects a probe (e.g. no system role)
                overhead.append(None)
        two, three = overhead
        if two is None:
            raise ValueError(f"the chat template of {self.path} rejects a plain user/assistant conversation")
        per_turn = max(0, three - two) if three is not None else max(0, two // 2)
        return per_turn, max(0, two - 2 * per_turn)

    def count(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        limit: int | None = None,
        extra: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Tokens of each conversation as training will see it (see the module docstring).

        ``extra``: tokens each conversation takes beyond its text (its images), added before
        the rows near ``limit`` are re-counted, so they are judged on their whole length."""
        lengths = np.fromiter((len(c) for c in conversations), dtype=np.int64, count=len(conversations))
        # Repeated texts (a system prompt on every record) are counted once.
        unique: dict[str, int] = {}
        slots = [unique.setdefault(m["content"], len(unique)) for c in conversations for m in c]
        per_content = self.count_texts(list(unique))[np.asarray(slots, dtype=np.int64)]
        owner = np.repeat(np.arange(len(conversations)), lengths)
        totals = np.bincount(owner, weights=per_content, minlength=len(conversations)).astype(np.int64)
        totals += self.fixed + self.per_turn * lengths
        totals[lengths == 0] = 0
        added = np.zeros(len(conversations), dtype=np.int64) if extra is None else np.asarray(extra, np.int64)
        totals += added
        if limit is not None and getattr(self.tokenizer, "chat_template", None):
            for index in np.flatnonzero(totals >= 0.9 * limit):
                try:
                    totals[index] = self._render_count(conversations[index]) + added[index]
                except Exception:  # roles the template refuses are reported by chat_roles
                    continue
        return totals
