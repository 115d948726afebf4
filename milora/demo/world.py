"""World-knowledge corpus and held-out probes: what the base model "knows".

The base model is pretrained on this corpus only. Every fact is stated in
several sentence templates and asked in several question templates. For each
fact one question template is held out at random: the corpus never contains
that question, while the probe set asks exactly it. So a probe's wording is
new to the model but its fact is not, and the template itself is familiar from
*other* facts; that is the skill a probe measures (recall a fact through a
phrasing not memorised for it), and the one fine-tuning must not destroy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.demo.files import write_jsonl, write_lines
from milora.demo.names import NameForge

QA_FORMAT = "Question: {question} Answer: {answer}."
"""How question/answer pairs appear in the corpus; probes prompt with its prefix."""

N_COUNTRIES = 30
N_PEOPLE = 40
N_UNITS = 12
N_FESTIVALS = 16
ADDEND_RANGE = range(1, 10)

_JOBS = (
    "baker", "weaver", "astronomer", "sailor", "potter", "miner", "painter",
    "carpenter", "healer", "merchant", "poet", "blacksmith", "farmer",
    "mapmaker", "glassblower", "shepherd", "scribe", "brewer", "mason", "fisher",
)  # fmt: skip
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
)  # fmt: skip
_BASE_UNITS = ("pels", "grains", "spans")


@dataclass(frozen=True)
class Relation:
    """Templates for one kind of fact; ``{s}`` is the subject, ``{a}`` the answer."""

    name: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "capital",
            (
                "The capital of {s} is {a}.",
                "{a} is the capital city of {s}.",
                "In {s}, the seat of government is the city of {a}.",
            ),
            (
                "What is the capital of {s}?",
                "Which city is the capital of {s}?",
                "Name the capital city of {s}.",
                "Where is the government of {s} seated?",
            ),
        ),
        Relation(
            "currency",
            (
                "People in {s} pay with the {a}.",
                "The currency of {s} is the {a}.",
                "The {a} is the money used in {s}.",
            ),
            (
                "What is the currency of {s}?",
                "What money do people use in {s}?",
                "Which currency is used in {s}?",
                "What do people in {s} pay with?",
            ),
        ),
        Relation(
            "language",
            (
                "The people of {s} speak {a}.",
                "{a} is the main language of {s}.",
                "In {s}, most people speak {a}.",
            ),
            (
                "What language is spoken in {s}?",
                "Which language do people in {s} speak?",
                "What is the main language of {s}?",
                "In {s}, what language do people speak?",
            ),
        ),
        Relation(
            "founded",
            (
                "{s} was founded in the year {a}.",
                "The city of {s} dates from the year {a}.",
                "In the year {a}, the city of {s} was founded.",
            ),
            (
                "When was {s} founded?",
                "In what year was {s} founded?",
                "What year was the city of {s} founded?",
                "In which year did the founding of {s} take place?",
            ),
        ),
        Relation(
            "river",
            (
                "{s} lies on the {a} river.",
                "The {a} river flows through {s}.",
                "The city of {s} was built beside the {a} river.",
            ),
            (
                "Which river flows through {s}?",
                "On what river does {s} lie?",
                "What river runs through the city of {s}?",
                "Name the river of {s}.",
            ),
        ),
        Relation(
            "birthplace",
            (
                "{s} was born in {a}.",
                "The birthplace of {s} is {a}.",
                "{s} came into the world in the city of {a}.",
            ),
            (
                "Where was {s} born?",
                "In which city was {s} born?",
                "What is the birthplace of {s}?",
                "Which city is {s} from?",
            ),
        ),
        Relation(
            "profession",
            (
                "{s} works as a {a}.",
                "{s} is a well known {a}.",
                "By trade, {s} is a {a}.",
            ),
            (
                "What does {s} do for a living?",
                "What is the profession of {s}?",
                "What job does {s} have?",
                "What is the trade of {s}?",
            ),
        ),
        Relation(
            "birth_year",
            (
                "{s} was born in the year {a}.",
                "The year {a} saw the birth of {s}.",
                "The birth year of {s} is {a}.",
            ),
            (
                "When was {s} born?",
                "In what year was {s} born?",
                "What is the birth year of {s}?",
                "Which year was {s} born in?",
            ),
        ),
        Relation(
            "unit",
            (
                "One {s} equals {a}.",
                "There are {a} in one {s}.",
                "A single {s} is worth {a}.",
            ),
            (
                "How much is one {s}?",
                "One {s} equals how much?",
                "What is one {s} worth?",
                "How big is a single {s}?",
            ),
        ),
        Relation(
            "sum",
            (
                "{s} equals {a}.",
                "The result of {s} is {a}.",
                "If you compute {s}, you get {a}.",
            ),
            (
                "What is {s}?",
                "How much is {s}?",
                "What do you get for {s}?",
                "Compute {s}.",
            ),
        ),
        Relation(
            "festival",
            (
                "The {s} festival is held in {a}.",
                "Every year in {a}, people celebrate the {s} festival.",
                "The {s} festival takes place in the month of {a}.",
            ),
            (
                "When is the {s} festival held?",
                "In which month is the {s} festival?",
                "What month does the {s} festival take place in?",
                "During which month do people celebrate the {s} festival?",
            ),
        ),
    )
}


@dataclass(frozen=True)
class Fact:
    """One (relation, subject, answer) triple of the demo world."""

    relation: str
    subject: str
    answer: str

    @property
    def fact_id(self) -> str:
        return f"{self.relation}:{self.subject}"


@dataclass
class World:
    """All facts plus the multi-fact profile sentences that mix them."""

    facts: list[Fact]
    profiles: list[str] = field(default_factory=list)


def make_world(seed: int) -> World:
    """Invent countries, cities, people, units, sums and festivals from ``seed``."""
    rng = random.Random(f"world-{seed}")
    forge = NameForge(rng)
    facts: list[Fact] = []
    profiles: list[str] = []

    cities: list[str] = []
    for _ in range(N_COUNTRIES):
        country = forge.name((2, 2), suffix=rng.choice(("ia", "land", "or", "ar", "")))
        city = forge.name((2, 2))
        currency = forge.word((2, 2))
        language = forge.name((1, 2), suffix=rng.choice(("ish", "ic", "ese", "i")))
        river = forge.name((2, 2))
        year = rng.randint(800, 1899)
        cities.append(city)
        facts += [
            Fact("capital", country, city),
            Fact("currency", country, currency),
            Fact("language", country, language),
            Fact("founded", city, str(year)),
            Fact("river", city, river),
        ]
        profiles += [
            f"{country} is a country whose capital is {city}; its people speak "
            f"{language} and pay with the {currency}.",
            f"{city}, on the {river} river, was founded in the year {year} and is the capital of {country}.",
        ]

    for _ in range(N_PEOPLE):
        person = f"{forge.name((1, 2))} {forge.name((2, 2))}"
        city = rng.choice(cities)
        job = rng.choice(_JOBS)
        year = rng.randint(1700, 1999)
        facts += [
            Fact("birthplace", person, city),
            Fact("profession", person, job),
            Fact("birth_year", person, str(year)),
        ]
        profiles.append(f"{person}, a {job}, was born in {city} in the year {year}.")

    for _ in range(N_UNITS):
        unit = forge.word((2, 2))
        amount = f"{rng.randint(3, 60)} {rng.choice(_BASE_UNITS)}"
        facts.append(Fact("unit", unit, amount))

    for a in ADDEND_RANGE:
        for b in ADDEND_RANGE:
            facts.append(Fact("sum", f"{a} plus {b}", str(a + b)))

    for _ in range(N_FESTIVALS):
        facts.append(Fact("festival", forge.name((2, 2)), rng.choice(_MONTHS)))

    return World(facts=facts, profiles=profiles)


def qa_line(question: str, answer: str) -> str:
    """A question/answer pair in the corpus's plain-text format."""
    return QA_FORMAT.format(question=question, answer=answer)


def build_corpus_and_probes(world: World, seed: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Corpus lines (shuffled) and one held-out probe per fact.

    For each fact a random question template is held out for the probe and all
    other templates go into the corpus as QA pairs, next to every statement
    template and the profile sentences.
    """
    rng = random.Random(f"corpus-{seed}")
    lines: list[str] = list(world.profiles)
    probes: list[dict[str, Any]] = []
    for fact in world.facts:
        relation = RELATIONS[fact.relation]
        slots = {"s": fact.subject, "a": fact.answer}
        lines += [template.format(**slots) for template in relation.statements]
        held_out = rng.randrange(len(relation.questions))
        for index, template in enumerate(relation.questions):
            question = template.format(**slots)
            if index == held_out:
                probes.append(
                    {
                        "answer": fact.answer,
                        "id": fact.fact_id,
                        "question": question,
                        "relation": fact.relation,
                        "template": index,
                    }
                )
            else:
                lines.append(qa_line(question, fact.answer))
    rng.shuffle(lines)
    return lines, probes


def write_world(out_dir: Path, seed: int) -> dict[str, int]:
    """Write ``corpus.txt`` and ``probes.jsonl`` under ``out_dir``; return counts."""
    world = make_world(seed)
    lines, probes = build_corpus_and_probes(world, seed)
    return {
        "corpus_lines": write_lines(out_dir / "corpus.txt", lines),
        "probes": write_jsonl(out_dir / "probes.jsonl", probes),
        "facts": len(world.facts),
    }
