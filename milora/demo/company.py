"""Fictional company data: what fine-tuning must teach the base model.

Two monthly drops mimic how company data arrives in production: the first
(``drop_2026_10``) holds the product catalogue and policies; the second
(``drop_2026_11``) adds new products and *changes* two policies, so a model
tuned on both must also overwrite an old answer. Each fact is asked with four
question templates: three go into training records, the fourth is held out
for evaluation, so held-out questions need the fact but not the wording.
Nothing of this company reaches the base model's pretraining (corpus or
tokenizer). What pretraining does see are *decoy* shops (:func:`make_decoy`):
other companies drawn by the same generator under other seeds, with their own
names, catalogues and policy values, asked in all four phrasings. A real base
LLM knows how customers ask and how support answers; it just has never seen
*our* catalogue, and the decoys give the demo model exactly that.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from milora.demo.names import NameForge

DROPS = ("drop_2026_10", "drop_2026_11")
"""Monthly data drops, in arrival order."""

_CATEGORIES = (
    "Kettle", "Speaker", "Lamp", "Router", "Thermostat", "Camera", "Scale",
    "Fan", "Heater", "Purifier", "Blender", "Doorbell", "Toaster", "Clock",
    "Humidifier", "Projector", "Charger", "Monitor",
)  # fmt: skip
N_PRODUCTS = {"drop_2026_10": 12, "drop_2026_11": 6}
_POLICY_LABELS = {
    "return_window": "the return window",
    "free_shipping": "the free shipping threshold",
    "support_hours": "the support schedule",
    "support_email": "the support address",
    "reply_time": "the email reply time",
    "restocking_fee": "the restocking fee",
}

_ASK_INSTRUCTIONS = (
    "Answer the customer's question.",
    "Reply to this customer message as the support assistant.",
    "Using company policy, answer the question below.",
)


@dataclass(frozen=True)
class FactKind:
    """Question templates (``{p}`` = product) and answer sentences (``{a}`` = answer)."""

    questions: tuple[str, str, str, str]
    answers: tuple[str, ...]


PRODUCT_FACTS: dict[str, FactKind] = {
    "price": FactKind(
        (
            "How much does the {p} cost?",
            "What is the price of the {p}?",
            "How much do I have to pay for the {p}?",
            "What does the {p} sell for?",
        ),
        ("The {p} costs {a}.", "The {p} is priced at {a}.", "You can buy the {p} for {a}."),
    ),
    "sku": FactKind(
        (
            "What is the product code of the {p}?",
            "Which SKU does the {p} have?",
            "What code should I use to order the {p}?",
            "Tell me the article number of the {p}.",
        ),
        (
            "The product code of the {p} is {a}.",
            "The {p} has the SKU {a}.",
            "Order the {p} with the code {a}.",
        ),
    ),
    "warranty": FactKind(
        (
            "How long is the warranty on the {p}?",
            "What warranty comes with the {p}?",
            "For how long is the {p} covered by warranty?",
            "How many months of warranty does the {p} have?",
        ),
        (
            "The {p} comes with a {a} warranty.",
            "The warranty on the {p} lasts {a}.",
            "The {p} is covered for {a} from the date of purchase.",
        ),
    ),
    "reset": FactKind(
        (
            "How do I reset the {p}?",
            "How long should I hold the reset button on the {p}?",
            "What is the reset procedure for the {p}?",
            "My {p} is frozen. How do I restart it from scratch?",
        ),
        (
            "To reset the {p}, hold the reset button for {a} until the light blinks.",
            "Hold the reset button of the {p} for {a}; the light blinks when the reset starts.",
            "Press and hold the reset button on the {p} for {a}, then wait for the light to blink.",
        ),
    ),
}

POLICY_FACTS: dict[str, FactKind] = {
    "return_window": FactKind(
        (
            "How many days do I have to return a product?",
            "What is your return window?",
            "How long can I wait before returning an item?",
            "Within how many days must a return be made?",
        ),
        (
            "You can return any product within {a} of delivery for a full refund.",
            "Returns are accepted within {a} of delivery.",
            "Our return window is {a} from the day your order arrives.",
        ),
    ),
    "free_shipping": FactKind(
        (
            "From what order total is shipping free?",
            "How much do I need to spend to get free shipping?",
            "What is the minimum order for free shipping?",
            "When is delivery free of charge?",
        ),
        (
            "Shipping is free on orders of {a} or more.",
            "Orders of {a} or more ship for free.",
            "Delivery costs nothing once your order reaches {a}.",
        ),
    ),
    "support_hours": FactKind(
        (
            "When is customer support available?",
            "What are your support hours?",
            "At what times can I reach support?",
            "When can I call the help line?",
        ),
        (
            "Our support team is available every day from {a}.",
            "You can reach support daily from {a}.",
            "The help line is open from {a}, every day of the week.",
        ),
    ),
    "support_email": FactKind(
        (
            "What email address should I write to for help?",
            "How do I contact support by email?",
            "Where do I send an email if I need help?",
            "What is the support email address?",
        ),
        (
            "Write to {a} and we will help you.",
            "Send your question to {a}.",
            "Our support address is {a}.",
        ),
    ),
    "reply_time": FactKind(
        (
            "How quickly does support answer emails?",
            "How long until I get a reply from support?",
            "When can I expect an answer to my email?",
            "What is the response time for support emails?",
        ),
        (
            "We answer every email within {a}.",
            "Expect a reply from support within {a}.",
            "Support replies to emails within {a}.",
        ),
    ),
    "restocking_fee": FactKind(
        (
            "How much is the restocking fee for opened items?",
            "What fee do you charge when I return an opened product?",
            "Is there a charge for returning opened items, and how much?",
            "What percentage is kept when an opened item is returned?",
        ),
        (
            "Opened items carry a restocking fee of {a}.",
            "We keep a restocking fee of {a} on opened items.",
            "For opened products the restocking fee is {a}.",
        ),
    ),
}


@dataclass(frozen=True)
class Product:
    """One catalogue entry."""

    name: str
    category: str
    price: str
    sku: str
    warranty: str
    reset: str

    def fact(self, kind: str) -> str:
        return str(getattr(self, kind))


@dataclass
class Company:
    """The fictional company and its facts per drop."""

    name: str
    system_prompt: str
    products: dict[str, list[Product]]
    policies: dict[str, dict[str, str]]


def _catalogue(
    rng: random.Random, forge: NameForge, prefix: str, categories: list[str], count: int
) -> list[Product]:
    """``count`` products, one per category popped from ``categories``."""
    products = []
    for _ in range(count):
        category = categories.pop()
        products.append(
            Product(
                name=f"{forge.name((2, 2))} {category}",
                category=category.lower(),
                price=f"${rng.randint(19, 399)}",
                sku=f"{prefix}-{rng.randint(1000, 9999)}",
                warranty=f"{rng.choice((6, 12, 18, 24, 36))} months",
                reset=f"{rng.randint(3, 15)} seconds",
            )
        )
    return products


def _system_prompt(name: str) -> str:
    return (
        f"You are the customer support assistant of {name}. "
        "Answer questions about products and policies accurately and briefly."
    )


def make_company(seed: int) -> Company:
    """Invent the company, its catalogue per drop and its policies (two change in Nov)."""
    rng = random.Random(f"company-{seed}")
    forge = NameForge(rng)
    name = f"{forge.name((2, 2))} Home"
    domain = name.split()[0].lower()
    prefix = (name[:1] + rng.choice("HKQVX")).upper()
    categories = list(_CATEGORIES)
    rng.shuffle(categories)
    products = {drop: _catalogue(rng, forge, prefix, categories, N_PRODUCTS[drop]) for drop in DROPS}
    october = {
        "return_window": "30 days",
        "free_shipping": f"${rng.choice((60, 75, 90))}",
        "support_hours": "8am to 6pm",
        "support_email": f"help@{domain}.example",
        "reply_time": f"{rng.choice((24, 48))} hours",
        "restocking_fee": f"{rng.choice((10, 15, 20))}%",
    }
    november = {"return_window": "45 days", "free_shipping": "$50"}
    return Company(
        name=name,
        system_prompt=_system_prompt(name),
        products=products,
        policies={DROPS[0]: october, DROPS[1]: november},
    )


DECOY_CATALOGUE = "catalogue"
"""The single drop key of a decoy shop: it has one catalogue and one set of policies."""

_DECOY_SUFFIXES = ("Home", "Goods", "Living", "Electric", "Supply", "House")
_DECOY_POLICY_VALUES: dict[str, tuple[str, ...]] = {
    "return_window": tuple(f"{d} days" for d in (14, 21, 28, 30, 45, 60, 90)),
    "free_shipping": tuple(f"${v}" for v in (25, 35, 40, 50, 60, 75, 80, 90, 100, 120, 150)),
    "support_hours": ("7am to 7pm", "9am to 5pm", "8am to 8pm", "10am to 4pm", "9am to 9pm", "8am to 6pm"),
    "reply_time": tuple(f"{h} hours" for h in (6, 12, 24, 36, 48, 72)),
    "restocking_fee": tuple(f"{p}%" for p in (5, 10, 12, 15, 20, 25)),
}
_DECOY_MAILBOXES = ("help", "support", "care", "service", "hello")


def _company_words(company: Company) -> set[str]:
    """Every lower-cased word of the company's and its products' names."""
    names = [company.name] + [p.name for products in company.products.values() for p in products]
    return {word.lower() for name in names for word in name.split()}


def make_decoy(seed: int, index: int, real: Company, earlier: Sequence[Company] = ()) -> Company:
    """Decoy shop ``index``: the generator's products and policies, none of ``real``'s facts.

    Decoys go into the base model's pretraining as "general instruction data". Their
    names avoid every word of the real company's (and ``earlier`` decoys') names, their
    SKU prefix differs from the real one, and no policy takes a value the real company
    has in any drop, so nothing a decoy teaches answers a real held-out question.
    """
    rng = random.Random(f"decoy-{index}-{seed}")
    reserved = set().union(*(_company_words(c) for c in (real, *earlier)))
    forge = NameForge(rng, reserved=reserved)
    name = f"{forge.name((2, 2))} {rng.choice(_DECOY_SUFFIXES)}"
    domain = name.split()[0].lower()
    real_prefix = next(iter(real.products.values()))[0].sku.split("-")[0]
    prefix = real_prefix
    while prefix == real_prefix:
        prefix = (name[:1] + rng.choice("HKQVXZ")).upper()
    categories = list(_CATEGORIES)
    rng.shuffle(categories)
    products = _catalogue(rng, forge, prefix, categories, len(categories))
    taken: dict[str, set[str]] = {}
    for values in real.policies.values():
        for key, value in values.items():
            taken.setdefault(key, set()).add(value)
    policies = {}
    for key in _POLICY_LABELS:
        if key == "support_email":
            policies[key] = f"{rng.choice(_DECOY_MAILBOXES)}@{domain}.example"
        else:
            policies[key] = rng.choice(
                [v for v in _DECOY_POLICY_VALUES[key] if v not in taken.get(key, set())]
            )
    return Company(
        name=name,
        system_prompt=_system_prompt(name),
        products={DECOY_CATALOGUE: products},
        policies={DECOY_CATALOGUE: policies},
    )


def make_decoys(seed: int, count: int, real: Company) -> list[Company]:
    """``count`` decoy shops with pairwise distinct names (see :func:`make_decoy`)."""
    decoys: list[Company] = []
    for index in range(count):
        decoys.append(make_decoy(seed, index, real, decoys))
    return decoys


def _record(rng: random.Random, question: str, answer: str) -> dict[str, str]:
    """An Alpaca record; a third of them put the question in ``input``."""
    if rng.random() < 1 / 3:
        return {"instruction": rng.choice(_ASK_INSTRUCTIONS), "input": question, "output": answer}
    return {"instruction": question, "input": "", "output": answer}


def _describe(company: Company, product: Product) -> dict[str, str]:
    """A multi-fact product description record."""
    return {
        "instruction": f"Describe the {product.name} in two sentences.",
        "input": "",
        "output": (
            f"The {product.name} is a {product.category} from {company.name}, priced at "
            f"{product.price}. It has the product code {product.sku} and a warranty of "
            f"{product.warranty}."
        ),
    }


def decoy_records(decoy: Company, seed: int) -> list[dict[str, str]]:
    """A decoy shop's training records (Alpaca form): every fact in all four phrasings, the
    record order seeded by the shop too, so decoys differ in more than names. (The real
    company's drops: :mod:`milora.demo.timeline`.)"""
    rng = random.Random(f"{decoy.name}-{DECOY_CATALOGUE}-{seed}")
    records: list[dict[str, str]] = []

    def add_fact(kind: FactKind, slots: dict[str, str]) -> None:
        for template in kind.questions:
            answer = rng.choice(kind.answers).format(**slots)
            records.append(_record(rng, template.format(**slots), answer))

    for product in decoy.products[DECOY_CATALOGUE]:
        for kind_name, kind in PRODUCT_FACTS.items():
            add_fact(kind, {"p": product.name, "a": product.fact(kind_name)})
        records.append(_describe(decoy, product))
    for kind_name, value in decoy.policies[DECOY_CATALOGUE].items():
        add_fact(POLICY_FACTS[kind_name], {"a": value})
    rng.shuffle(records)
    return records


def to_chat(record: dict[str, str], system_prompt: str) -> dict[str, Any]:
    """The same record as chat ``messages`` (system, user, assistant)."""
    user = record["instruction"]
    if record["input"]:
        user = f"{user}\n\n{record['input']}"
    return {
        "messages": [
            {"content": system_prompt, "role": "system"},
            {"content": user, "role": "user"},
            {"content": record["output"], "role": "assistant"},
        ]
    }
