"""General instruction data for pretraining: decoy shops and world questions as chats.

A real base LLM has seen its whole vocabulary, its chat format and plenty of
customer-support conversations; it has only never seen *our* company's facts.
The demo base model gets the same start: next to the world corpus it is
pretrained on

* decoy shops (:func:`milora.demo.company.make_decoys`): other companies from the
  same generator, every fact asked in all four phrasings (including the ones
  held out for the real company), so it learns how customers ask and how support
  answers, and that the four phrasings ask the same thing;
* world facts asked as chat turns, through corpus phrasings only (never a probe's),
  so it answers questions in the chat format as an instruction-tuned base would.

Without this, fine-tuning starts from untrained embeddings for the role tokens and
much of the support vocabulary, which LoRA-style adapters (q/k/v/up/down only)
cannot repair. The real company's names and values never appear here; the tests
check it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from milora.demo.company import decoy_records, make_company, make_decoys
from milora.demo.files import write_jsonl
from milora.demo.world import RELATIONS, World, build_corpus_and_probes, make_world

N_DECOYS = 3
"""Decoy shops in pretraining; each has all 18 product categories and six policies."""

DECOY_SYSTEM_SHARE = 0.5
"""Share of decoy chats that carry the shop's system prompt (the rest: user turn only)."""

Message = dict[str, str]


def _messages(system: str | None, user: str, assistant: str) -> list[Message]:
    head = [{"content": system, "role": "system"}] if system else []
    return [*head, {"content": user, "role": "user"}, {"content": assistant, "role": "assistant"}]


def decoy_conversations(seed: int, count: int = N_DECOYS) -> list[list[Message]]:
    """Every fact of ``count`` decoy shops, each phrasing once, as a chat."""
    rng = random.Random(f"decoy-chats-{seed}")
    conversations = []
    for decoy in make_decoys(seed, count, make_company(seed)):
        for record in decoy_records(decoy, seed):
            user = (
                f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
            )
            system = decoy.system_prompt if rng.random() < DECOY_SYSTEM_SHARE else None
            conversations.append(_messages(system, user, record["output"]))
    return conversations


def world_conversations(world: World, probes: list[dict[str, Any]], seed: int) -> list[list[Message]]:
    """One chat per world fact: a corpus question (never the probe's), a statement as answer."""
    rng = random.Random(f"world-chats-{seed}")
    probe_questions = {probe["question"] for probe in probes}
    conversations = []
    for fact in world.facts:
        relation = RELATIONS[fact.relation]
        slots = {"s": fact.subject, "a": fact.answer}
        asked = [t.format(**slots) for t in relation.questions if t.format(**slots) not in probe_questions]
        answer = rng.choice(relation.statements).format(**slots)
        conversations.append(_messages(None, rng.choice(asked), answer))
    return conversations


def build_instructions(seed: int) -> list[list[Message]]:
    """Decoy and world chats, shuffled: the chat part of the pretraining data."""
    world = make_world(seed)
    _, probes = build_corpus_and_probes(world, seed)
    conversations = decoy_conversations(seed) + world_conversations(world, probes, seed)
    random.Random(f"instructions-{seed}").shuffle(conversations)
    return conversations


def write_instructions(path: Path, seed: int) -> int:
    """Write ``{"messages": [...]}`` lines; return how many."""
    return write_jsonl(path, ({"messages": m} for m in build_instructions(seed)))
