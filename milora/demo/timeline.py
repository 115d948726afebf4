"""The demo company's year: monthly drops in which facts are added, changed, corrected, retired.

A company's knowledge base changes month to month, and so does what fine-tuning must teach.
:data:`MONTHS` scripts six monthly drops of the company of :mod:`milora.demo.company`:

* ``drop_2026_10`` the catalogue and policies; ``drop_2026_11`` new products and two policy
  changes (both committed under ``company/``: what ``make run`` trains on);
* ``drop_2026_12`` new products, price changes, holiday support hours, and one new product
  published with a typo in its article number;
* ``drop_2027_01`` the typo corrected, a new reply time, a product discontinued (its questions
  listed under ``retire`` in the drop's ``drop.yaml``);
* ``drop_2027_02`` a full *snapshot* of the knowledge base (``kind: snapshot``): unchanged rows
  repeat the earlier ones byte for byte, two prices and a warranty change, and a product
  left out of it is retired;
* ``drop_2027_03`` new products and two policy changes.

The later four lie under ``later_drops/`` for the year simulation
(``benchmarks/year_simulation.py``) to land one by one.

Each fact's training records depend on the fact and the seed only, not on the month: a fact
stated again (a snapshot) is the same record, and a changed value keeps its questions, so
the validation gate's exact-key rule supersedes the old records. Every new, changed or
retired fact has held-out items in its drop (``retired: true`` for a withdrawn one). New
names avoid every word of the decoy shops the base model was pretrained on, and new policy
values every value a decoy shop has, so the base knows none of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from milora.demo.company import (
    _CATEGORIES,
    _POLICY_LABELS,
    DROPS,
    POLICY_FACTS,
    PRODUCT_FACTS,
    FactKind,
    Product,
    _catalogue,
    _company_words,
    _describe,
    _record,
    make_company,
    make_decoys,
    to_chat,
)
from milora.demo.files import write_json, write_jsonl
from milora.demo.names import NameForge

COMPANY_DIR, LATER_DIR = "company", "later_drops"
"""Where the committed drops (``make run``'s) and the later months of the year are written."""

N_DECOYS = 3
"""Decoy shops in the base model's pretraining (:mod:`milora.demo.instructions` makes them)."""


@dataclass(frozen=True)
class Month:
    """What one monthly drop changes in the knowledge base."""

    drop: str
    kind: str = "delta"  # delta: what is new or changed; snapshot: the whole knowledge base
    new_products: int = 0
    price_changes: int = 0
    warranty_changes: int = 0
    policies: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> candidate values
    typo: bool = False  # one new product's article number published with two digits swapped
    correct_typo: bool = False
    retire: int = 0  # products discontinued, listed in drop.yaml
    leave_out: int = 0  # products discontinued by leaving them out of a snapshot


MONTHS: tuple[Month, ...] = (
    Month(DROPS[0]),
    Month(DROPS[1]),
    Month(
        "drop_2026_12",
        new_products=3,
        price_changes=3,
        policies={"support_hours": ("8am to 10pm", "7am to 9pm", "9am to 8pm")},
        typo=True,
    ),
    Month(
        "drop_2027_01",
        new_products=2,
        policies={"reply_time": ("12 hours", "8 hours", "4 hours")},
        correct_typo=True,
        retire=1,
    ),
    Month("drop_2027_02", kind="snapshot", price_changes=2, warranty_changes=1, leave_out=1),
    Month(
        "drop_2027_03",
        new_products=3,
        policies={"restocking_fee": ("8%", "18%", "30%"), "free_shipping": ("$45", "$55", "$65")},
    ),
)
"""The year, in arrival order; the first two are :data:`milora.demo.company.DROPS`."""

DESCRIBE = "Describe the {p} in two sentences."
CHANGELOG = "What changed this month?"


@dataclass(frozen=True)
class Fact:
    """One fact of the knowledge base: what is asked (``kind``), about what, its value."""

    id: str
    kind: str
    template: FactKind
    slots: dict[str, str]

    @property
    def value(self) -> str:
        return self.slots["a"]


def fact_records(fact: Fact, seed: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The fact's training records (three phrasings) and its held-out item (the fourth).

    Seeded by the fact and its phrasing only: a fact stated again gives the same records, a
    changed value the same questions with the new value."""
    held = random.Random(f"{fact.kind}-{seed}").randrange(len(fact.template.questions))
    records, item = [], {}
    for index, template in enumerate(fact.template.questions):
        question = template.format(**fact.slots)
        if index == held:
            item = {"answer": fact.value, "id": fact.id, "kind": fact.kind, "question": question}
            continue
        rng = random.Random(f"{fact.id}-{index}-{seed}")
        records.append(_record(rng, question, rng.choice(fact.template.answers).format(**fact.slots)))
    return records, item


def product_facts(product: Product) -> list[Fact]:
    return [
        Fact(f"{kind}:{product.name}", kind, template, {"p": product.name, "a": product.fact(kind)})
        for kind, template in PRODUCT_FACTS.items()
    ]


@dataclass
class KnowledgeBase:
    """The company's facts as of a month: products by name and policies."""

    company: str
    products: dict[str, Product] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)

    def facts(self) -> dict[str, Fact]:
        found = {f.id: f for p in self.products.values() for f in product_facts(p)}
        for key, value in self.policies.items():
            fact = Fact(f"{key}:{self.company}", key, POLICY_FACTS[key], {"a": value})
            found[fact.id] = fact
        return found


@dataclass
class Drop:
    """One month as files: records, held-out items, the drop.yaml fields."""

    name: str
    kind: str
    records: list[dict[str, str]]
    heldout: list[dict[str, Any]]
    retire: list[str]
    changes: list[str]


class Year:
    """Plays :data:`MONTHS` on the company of ``seed``; see the module docstring."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.company = make_company(seed)
        decoys = make_decoys(seed, N_DECOYS, self.company)
        self.rng = random.Random(f"year-{seed}")
        reserved = set().union(*(_company_words(c) for c in (self.company, *decoys)))
        self.forge = NameForge(self.rng, reserved=reserved)
        self.taken: dict[str, set[str]] = {}
        for shop in (self.company, *decoys):
            for values in shop.policies.values():
                for key, value in values.items():
                    self.taken.setdefault(key, set()).add(value)
        self.prefix = self.company.products[DROPS[0]][0].sku.split("-")[0]
        self.kb = KnowledgeBase(self.company.name)
        self.typo: tuple[str, str] | None = None  # product name, correct SKU

    def _new_products(self, count: int) -> list[Product]:
        categories = list(_CATEGORIES)
        self.rng.shuffle(categories)
        return _catalogue(self.rng, self.forge, self.prefix, categories, count)

    def _pick(self, count: int) -> list[str]:
        """``count`` products of the catalogue, never the one awaiting its typo fix."""
        names = sorted(n for n in self.kb.products if not (self.typo and n == self.typo[0]))
        return self.rng.sample(names, count)

    def _policy(self, key: str, candidates: tuple[str, ...]) -> str:
        """The first candidate no decoy shop (nor this company before) uses for ``key``."""
        value = next(v for v in candidates if v not in self.taken.get(key, set()))
        self.taken.setdefault(key, set()).add(value)
        return value

    def play(self, month: Month) -> Drop:
        """Apply ``month`` to the knowledge base; the drop it publishes."""
        before = self.kb.facts()
        changes: list[str] = []
        if month.drop in DROPS:  # the committed months: the company's own catalogue and policies
            added = self.company.products[month.drop]
            self.kb.policies.update(self.company.policies[month.drop])
            if month.drop != DROPS[0]:
                changes += [
                    f"{_POLICY_LABELS[k]} is now {v}" for k, v in self.company.policies[month.drop].items()
                ]
        else:
            added = self._new_products(month.new_products)
        gone = self._pick(month.retire + month.leave_out)
        for name in gone:
            del self.kb.products[name]
            changes.append(f"the {name} is discontinued")
        for name in self._pick(month.price_changes):
            old = int(self.kb.products[name].price.lstrip("$"))
            new = max(9, round(old * self.rng.choice((0.8, 0.85, 1.1, 1.15, 1.2))))
            self.kb.products[name] = replace(self.kb.products[name], price=f"${new}")
            changes.append(f"the {name} now costs ${new}")
        for name in self._pick(month.warranty_changes):
            current = self.kb.products[name].warranty
            warranty = self.rng.choice(
                [f"{m} months" for m in (12, 18, 24, 36, 48) if f"{m} months" != current]
            )
            self.kb.products[name] = replace(self.kb.products[name], warranty=warranty)
            changes.append(f"the {name} now has a {warranty} warranty")
        for key, candidates in month.policies.items():
            self.kb.policies[key] = self._policy(key, candidates)
            changes.append(f"{_POLICY_LABELS[key]} is now {self.kb.policies[key]}")
        if month.correct_typo and self.typo:
            name, sku = self.typo
            self.kb.products[name] = replace(self.kb.products[name], sku=sku)
            changes.append(f"the product code of the {name} is {sku} (corrected)")
            self.typo = None
        for product in added:
            self.kb.products[product.name] = product
        if month.typo and added:
            product = added[0]
            digits = product.sku.split("-")[1]
            swapped = digits[:2] + digits[3] + digits[2] if digits[2] != digits[3] else digits[::-1]
            self.typo = (product.name, product.sku)
            self.kb.products[product.name] = replace(product, sku=f"{self.prefix}-{swapped}")
        if added and month.drop != DROPS[0]:
            changes.insert(0, "new products: " + ", ".join(p.name for p in added))
        return self._publish(month, before, gone, changes)

    def _publish(self, month: Month, before: dict[str, Fact], gone: list[str], changes: list[str]) -> Drop:
        now = self.kb.facts()
        stated = [f for f in now.values() if month.kind == "snapshot" or before.get(f.id) != f]
        touched = {f.slots["p"] for f in stated if "p" in f.slots}
        records: list[dict[str, str]] = []
        heldout: list[dict[str, Any]] = []
        for fact in stated:
            rows, item = fact_records(fact, self.seed)
            records += rows
            if before.get(fact.id) != fact:
                heldout.append({**item, "drop": month.drop})
        retire: list[str] = []
        for fact in (f for f in before.values() if f.id not in now):
            rows, item = fact_records(fact, self.seed)
            heldout.append({**item, "drop": month.drop, "retired": True})
            if month.retire and fact.slots.get("p") in gone[: month.retire]:
                retire += [f"{r['instruction']} {r['input']}".strip() for r in rows]  # as asked
        for name in sorted(gone[: month.retire]):
            retire.append(DESCRIBE.format(p=name))
        records += [_describe(self.company, p) for p in self.kb.products.values() if p.name in touched]
        if changes:
            text = "; ".join(changes)
            records.append({"instruction": CHANGELOG, "input": "", "output": f"{text[0].upper()}{text[1:]}."})
        random.Random(f"{month.drop}-{self.seed}").shuffle(records)
        heldout.sort(key=lambda item: (item["kind"], item["id"]))
        return Drop(month.drop, month.kind, records, heldout, retire, changes)


def write_drop(folder: Path, drop: Drop, system_prompt: str) -> dict[str, int]:
    """A drop folder: train_alpaca.jsonl, train_chat.jsonl, heldout.jsonl, and a drop.yaml
    when the drop is a snapshot or retires facts."""
    counts = {
        "train": write_jsonl(folder / "train_alpaca.jsonl", drop.records),
        "heldout": write_jsonl(folder / "heldout.jsonl", drop.heldout),
    }
    write_jsonl(folder / "train_chat.jsonl", (to_chat(r, system_prompt) for r in drop.records))
    manifest = folder / "drop.yaml"
    if drop.kind != "delta" or drop.retire:
        import yaml

        fields = {"kind": drop.kind, **({"retire": drop.retire} if drop.retire else {})}
        text = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True, width=200)
        manifest.write_text(text, encoding="utf-8", newline="\n")
    else:
        manifest.unlink(missing_ok=True)
    return counts


def write_year(out: Path, seed: int) -> dict[str, int]:
    """Every month of :data:`MONTHS`: the committed ones under ``out/company``, the later ones
    under ``out/later_drops``; ``company.json`` names the company."""
    year = Year(seed)
    counts: dict[str, int] = {}
    for month in MONTHS:
        drop = year.play(month)
        folder = out / (COMPANY_DIR if month.drop in DROPS else LATER_DIR) / month.drop
        for name, count in write_drop(folder, drop, year.company.system_prompt).items():
            counts[f"{month.drop}/{name}"] = count
    write_json(
        out / COMPANY_DIR / "company.json",
        {"drops": list(DROPS), "name": year.company.name, "system_prompt": year.company.system_prompt},
    )
    return counts
