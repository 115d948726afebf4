"""Seeded invented names, so the demo world shares nothing with real data.

Names are built from syllables with a caller-owned :class:`random.Random`;
the forge remembers every word it handed out, so entities never share a name
and a tiny model can tell them apart.
"""

from __future__ import annotations

import random

_ONSETS = (
    "b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n",
    "p", "pr", "r", "s", "st", "t", "tr", "v", "z", "th", "sh", "h",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "k")


class NameForge:
    """Hands out unique pronounceable names drawn from one seeded RNG."""

    def __init__(self, rng: random.Random, reserved: set[str] | None = None) -> None:
        """``reserved`` words (lower case) are never handed out, e.g. another company's names."""
        self._rng = rng
        self._used: set[str] = set(reserved or ())

    def _syllable(self) -> str:
        rng = self._rng
        return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)

    def word(self, syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
        """A fresh lowercase word of 2-3 syllables (plus ``suffix``) never returned before."""
        for _ in range(10_000):
            count = self._rng.randint(*syllables)
            word = "".join(self._syllable() for _ in range(count)) + suffix
            if 4 <= len(word) <= 12 and word not in self._used:
                self._used.add(word)
                return word
        raise RuntimeError("name space exhausted; lower the number of entities")

    def name(self, syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
        """A fresh capitalised proper name."""
        return self.word(syllables, suffix).capitalize()
