"""Held-out questions against the current truth: a fact asked in several drops is scored once,
against its newest answer, and an answer that gives an older value is *stale*.

A company's held-out set grows with its drops, and facts change between them: October's
items expect "30 days", November's "45 days" for the same question. Scored as given, no
model can pass both, and the score cannot say whether the model knows the *current* policy.
Items name their fact by ``id`` (or ``key``; else the normalised question) and their drop by
``drop`` (drop names sort by date; items without one keep file order). An item with
``"retired": true`` says its drop withdrew the fact (a discontinued product): unless a later
drop states it again, the fact is no longer asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from milora.data.facts import fact_key, normalised


def item_key(item: dict[str, Any]) -> str:
    """The fact an evaluation item asks about; an item about images asks about those images
    (by path: "What colour is this product?" of red.png and of blue.png are two facts)."""
    named = item.get("id") or item.get("key")
    images = item.get("images") or ()
    images = (images,) if isinstance(images, str) else tuple(images)
    return fact_key(str(item.get("question", "")), key=str(named) if named else None, images=images)


def current_truth(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One item per fact: the newest drop's item (its question and answer), with
    ``stale_answers``, the different answers earlier drops gave (empty when it never changed);
    none for a fact whose newest item retires it. Facts keep the order of their first
    appearance."""
    groups: dict[str, list[tuple[str, int, dict[str, Any]]]] = {}
    for position, item in enumerate(items):
        groups.setdefault(item_key(item), []).append((str(item.get("drop") or ""), position, item))
    current = []
    for found in groups.values():
        newest = max(found, key=lambda entry: (entry[0], entry[1]))[2]
        if newest.get("retired"):
            continue
        answer = normalised(str(newest["answer"]))
        stale = list(
            dict.fromkeys(
                str(item["answer"])
                for _, _, item in found
                if not item.get("retired") and normalised(str(item["answer"])) != answer
            )
        )
        current.append({**newest, "stale_answers": stale})
    return current
