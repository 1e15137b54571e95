"""Generated document sets with planted conflicts and risks, and a scorer, for an eval of the flagship
``document_analysis`` workflow (choosing the embedded default model by measurement).

    .venv/bin/python bench/flagship_sets.py [--n 24] [--seed 2026] [--show 0] [--pdf DIR]

prints a summary of the generated sets and the text of one of them (``--pdf DIR`` also writes its PDFs).

Each :class:`DocSet` is two short commercial agreements between one customer and two suppliers, written
independently (several phrasings per topic, random parties, filler clauses that concern no topic), and in about a
third of the sets an amendment to the first agreement that changes one of its terms. Planted in each set:

* 3 to 5 **conflicts** (``kind="conflict"``): two documents state a checklist topic with different figures, places
  or positions. An amendment's change is a conflict between the amendment and the first agreement.
* 1 or 2 single-document **risks** (``kind="risk"``): unlimited liability, an exclusivity obligation, automatic
  renewal, termination only for cause for the customer, data processed anywhere, prices raised without limit.
* **agreements** (``kind="agree"``): both agreements state a topic alike in different words, to catch false
  conflicts; and benign **singles** (``kind="single"``): a topic only one document states.

Every sentence that states a topic is on a line of its own and shorter than the PDF writer's wrap width, so the
PDF's text layer gives each one back whole; each matches its topic's cue (``Topic.concerns``), and the values of a
planted conflict differ by the workflow's own comparator (``same_position``) while those of an agreement do not.

:func:`score` compares a finished task's ``result`` with what was planted.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from keel.orchestration.workflows.document_analysis import CHECKLIST, same_position
from keel.testing.pdfs import WRAP_AT, make_pdf

__all__ = [
    "TOPICS",
    "Doc",
    "DocSet",
    "Planted",
    "Score",
    "generate",
    "pdf_bytes",
    "perfect_result",
    "score",
    "shows_value",
    "summed",
    "write_pdfs",
]

TOPICS: tuple[str, ...] = tuple(t.name for t in CHECKLIST)
PAYMENT, LIABILITY, TERMINATION, DATA, LAW, TERM, FEES, EXCLUSIVITY = TOPICS
_CUES = {t.name: t for t in CHECKLIST}

Kind = Literal["conflict", "risk", "agree", "single"]


# -- what a set is -------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class Planted:
    topic: str
    """A CHECKLIST topic name, e.g. "payment terms"."""
    kind: Kind
    """conflict and risk are scored; agree (stated alike in different words) and single (one document only,
    nothing risky) are what a model must not report as conflicts."""
    docs: tuple[int, ...]
    """0-based indexes of the documents involved (label D{i+1})."""
    values: tuple[str, ...]
    """The distinctive figure or words each involved document states, in the order of ``docs``."""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"D{i + 1}" for i in self.docs)

    def describe(self) -> str:
        said = " vs ".join(f"{label} {value!r}" for label, value in zip(self.labels, self.values, strict=True))
        return f"{self.kind} {self.topic}: {said}"


@dataclass(kw_only=True, slots=True)
class Doc:
    name: str
    """The file name, e.g. "northwind-msa.pdf"."""
    title: str
    pages: list[str]
    """Page texts; no line is longer than the PDF writer wraps."""
    statements: dict[str, str] = field(default_factory=dict)
    """Topic name to the sentence of this document that states it."""

    @property
    def text(self) -> str:
        return "\n".join(self.pages)


@dataclass(kw_only=True, slots=True)
class DocSet:
    name: str
    request: str
    documents: list[Doc]
    planted: list[Planted]
    """The conflicts, then the risks: what :func:`score` measures."""
    agreements: list[Planted] = field(default_factory=list)
    singles: list[Planted] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [f"D{i + 1}" for i in range(len(self.documents))]

    @property
    def conflicts(self) -> list[Planted]:
        return [p for p in self.planted if p.kind == "conflict"]

    @property
    def risks(self) -> list[Planted]:
        return [p for p in self.planted if p.kind == "risk"]


# -- the wording: several phrasings per position ----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class Option:
    """One position on a topic (e.g. payment within 30 days) and the sentences that state it."""

    topic: str
    value: str
    templates: tuple[str, ...]
    params: tuple[tuple[str, str], ...] = ()
    risky: bool = False

    def render(self, index: int, roles: Mapping[str, str]) -> str:
        return self.templates[index].format(**dict(self.params), **roles)


_WORDS = {15: "fifteen", 45: "forty-five"}
"""Figures also written out in words, legal style: only those whose word the workflow's comparator reads as the
same figure as the digits (its ``_numbers`` strips the trailing zeros of "30" but not of the word "thirty")."""


def _nn(n: int) -> str:
    """A legal-style figure, "fifteen (15)", where the comparator reads the word as the digits; else "30"."""
    return f"{_WORDS[n]} ({n})" if n in _WORDS else str(n)


PAY_DAYS = (
    "The {C} pays each invoice within {n} days of the invoice date.",
    "Invoices are payable within {n} days.",
    "Payment falls due {n} days after receipt of a valid invoice.",
    "The {C} shall settle every invoice no later than {nn} days after its date.",
    "Each invoice must be paid in full within {nn} days.",
)
LIAB_MONTHS = (
    "The {S}'s total liability is capped at the fees paid in the preceding {m} months.",
    "Each party's aggregate liability is limited to the amounts paid in the last {m} months.",
    "Liability under this agreement never exceeds the charges paid over the prior {m} months.",
)
LIAB_AMOUNT = (
    "The {S}'s total liability is capped at {amt}.",
    "Each party's aggregate liability is limited to {amt}.",
    "Neither party is liable for more than {amt} in total.",
)
LIAB_UNLIMITED = (
    "The {S}'s liability under this agreement is unlimited.",
    "No cap applies: the {S} accepts unlimited liability for any loss it causes.",
    "The {S} bears unlimited liability for damages arising from this agreement.",
)
TERMINATE_DAYS = (
    "Either party may terminate this agreement on {n} days written notice.",
    "Either party may end this agreement by giving {nn} days notice in writing.",
    "This agreement may be terminated by either party with {n} days prior notice.",
)
TERMINATE_CAUSE = (
    "The {C} may terminate only for cause; the {S} may terminate on {n} days notice.",
    "The {C} may end this agreement only for cause, the {S} on {n} days notice.",
    "The {C} may cancel only for cause, after a material breach left unremedied.",
)
TERM_MONTHS = (
    "This agreement runs for an initial term of {m} months.",
    "The initial period of this contract is {m} months from the effective date.",
    "The contract has a fixed duration of {m} months.",
)
TERM_AUTORENEW = (
    "The term renews automatically for {m} months unless cancelled {n} days before expiry.",
    "Renewal is automatic for successive {m}-month periods; opting out needs {n} days notice.",
    "Unless the {C} objects {n} days before expiry, the contract renews automatically.",
)
DATA_PLACE = (
    "Customer data is stored and processed in {place} only.",
    "All customer data is hosted in {place}.",
    "The {S} keeps customer data on servers located in {place}.",
)
DATA_ANYWHERE = (
    "Customer data may be processed in any country where the {S} operates.",
    "The {S} may store and process customer data in any country it chooses.",
    "Data may be transferred to and processed in any country at the {S}'s discretion.",
)
LAW_PLACE = (
    "This agreement is governed by the laws of {place}.",
    "The laws of {place} govern this contract.",
    "Any dispute is subject to the courts of {place}, whose law applies.",
)
FEES_CAP = (
    "Prices may increase by at most {p}% per year.",
    "The {S} may raise its fees once a year by no more than {p}%.",
    "Annual fee increases are capped at {p} percent.",
)
FEES_FIXED = (
    "The fees stay fixed until this agreement ends.",
    "Prices are fixed and may not be increased during this agreement.",
    "The {S} charges fixed fees, with no price increases.",
)
FEES_UNLIMITED = (
    "The {S} may increase its prices at any time and without limit.",
    "Prices may be raised without limit at each anniversary.",
    "The {S} sets its fees each year, without limit on any increase.",
)
EXCLUSIVE = (
    "For {m} months the {C} buys such services exclusively from the {S}.",
    "The {C} appoints the {S} as its sole supplier of these services for {m} months.",
    "During the first {m} months the {C} shall buy these services only from the {S}.",
)
NON_EXCLUSIVE = (
    "The appointment of the {S} is non-exclusive.",
    "This is a non-exclusive agreement; the {C} may buy the same services elsewhere.",
    "The {S} is engaged on a non-exclusive basis.",
)

DATA_PLACES = (
    "the European Union",
    "the United Kingdom",
    "the United States",
    "Germany",
    "Canada",
    "Switzerland",
    "Australia",
)
LAW_PLACES = (
    "England and Wales",
    "the State of Delaware",
    "the State of New York",
    "Scotland",
    "Ireland",
    "the Netherlands",
    "Singapore",
    "the Province of Ontario",
)
AMOUNTS = ("USD 50,000", "EUR 250,000", "GBP 2,000,000", "USD 750,000")


def _place_value(place: str) -> str:
    return place.removeprefix("the ")


def _options() -> dict[str, list[Option]]:
    """Every position each topic can take, with its phrasings."""
    o: dict[str, list[Option]] = {t: [] for t in TOPICS}
    for n in (14, 15, 30, 45, 60, 90):
        o[PAYMENT].append(Option(topic=PAYMENT, value=f"{n} days", templates=PAY_DAYS, params=_p(n=n, nn=_nn(n))))
    for m in (6, 12, 24):
        o[LIABILITY].append(Option(topic=LIABILITY, value=f"{m} months", templates=LIAB_MONTHS, params=_p(m=m)))
    for amt in AMOUNTS:
        o[LIABILITY].append(Option(topic=LIABILITY, value=amt, templates=LIAB_AMOUNT, params=_p(amt=amt)))
    o[LIABILITY].append(Option(topic=LIABILITY, value="unlimited", templates=LIAB_UNLIMITED, risky=True))
    for n in (30, 60, 90, 180):
        o[TERMINATION].append(
            Option(topic=TERMINATION, value=f"{n} days", templates=TERMINATE_DAYS, params=_p(n=n, nn=_nn(n)))
        )
        o[TERMINATION].append(
            Option(topic=TERMINATION, value="only for cause", templates=TERMINATE_CAUSE, params=_p(n=n), risky=True)
        )
    for place in DATA_PLACES:
        o[DATA].append(Option(topic=DATA, value=_place_value(place), templates=DATA_PLACE, params=_p(place=place)))
    o[DATA].append(Option(topic=DATA, value="any country", templates=DATA_ANYWHERE, risky=True))
    for place in LAW_PLACES:
        o[LAW].append(Option(topic=LAW, value=_place_value(place), templates=LAW_PLACE, params=_p(place=place)))
    for m in (12, 24, 36):
        o[TERM].append(Option(topic=TERM, value=f"{m} months", templates=TERM_MONTHS, params=_p(m=m)))
    for m, n in ((12, 90), (12, 180), (24, 180)):
        o[TERM].append(
            Option(topic=TERM, value="renews automatically", templates=TERM_AUTORENEW, params=_p(m=m, n=n), risky=True)
        )
    for p in (2, 3, 5, 8):
        o[FEES].append(Option(topic=FEES, value=f"{p}%", templates=FEES_CAP, params=_p(p=p)))
    o[FEES].append(Option(topic=FEES, value="fixed", templates=FEES_FIXED))
    o[FEES].append(Option(topic=FEES, value="without limit", templates=FEES_UNLIMITED, risky=True))
    for m in (12, 24, 36):
        o[EXCLUSIVITY].append(
            Option(topic=EXCLUSIVITY, value=f"{m} months", templates=EXCLUSIVE, params=_p(m=m), risky=True)
        )
    o[EXCLUSIVITY].append(Option(topic=EXCLUSIVITY, value="non-exclusive", templates=NON_EXCLUSIVE))
    return o


def _p(**kw: object) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(v)) for k, v in kw.items())


OPTIONS: dict[str, list[Option]] = _options()
RISKY_TOPICS: tuple[str, ...] = tuple(t for t in TOPICS if any(o.risky for o in OPTIONS[t]))
AMENDABLE: tuple[str, ...] = (PAYMENT, FEES, TERMINATION, TERM, LIABILITY)

HEADINGS: dict[str, tuple[str, ...]] = {
    PAYMENT: ("Payment", "Invoicing", "Payment terms"),
    LIABILITY: ("Liability", "Limitation of liability"),
    TERMINATION: ("Termination", "Ending the agreement"),
    DATA: ("Data", "Data location", "Hosting"),
    LAW: ("Governing law", "Law and jurisdiction"),
    TERM: ("Term", "Duration"),
    FEES: ("Fees", "Prices", "Charges"),
    EXCLUSIVITY: ("Exclusivity", "Appointment"),
}
SERVICES = (
    "The {S} provides {svc} as described in Schedule 1.",
    "The {S} supplies {svc} to the {C}.",
    "The {S} delivers {svc} under signed order forms.",
)
FILLERS: tuple[tuple[str, str], ...] = (
    ("Confidentiality", "Each party keeps the other party's confidential information secret."),
    ("Notices", "Notices must be in writing and sent to the registered office of the recipient."),
    ("Force majeure", "Neither party is responsible for delays caused by events beyond its control."),
    ("Warranty", "The {S} performs the services with reasonable skill and care."),
    ("Assignment", "Neither party may assign this agreement without the other's written consent."),
    ("Entire agreement", "This document is the entire agreement between the parties."),
    ("Subcontracting", "The {S} may use subcontractors but remains responsible for their work."),
)
SUPPLIER_FIRST = (
    "Northwind", "Fabrikam", "Tailspin", "Litware", "Proseware", "Adatum", "Woodgrove", "Wingtip",
    "Lucerne", "Relecloud", "Coho", "Alpine", "Trey", "Blueyonder",
)  # fmt: skip
SUPPLIER_SECOND = ("Analytics", "Logistics", "Systems", "Software", "Networks", "Cloud", "Solutions", "Labs")
SUFFIXES = ("Ltd", "Inc", "GmbH", "plc", "LLC", "BV")
CUSTOMERS = (
    "Contoso Retail plc",
    "Meridian Foods Ltd",
    "Harbor Health Inc",
    "Brightwater Energy plc",
    "Kestrel Insurance Ltd",
    "Oakridge Pharma GmbH",
    "Summit Bank plc",
    "Bluebird Airlines Inc",
)
SERVICE_NAMES = (
    "data analytics services",
    "warehouse management software",
    "cloud hosting and support",
    "payroll processing services",
    "network monitoring services",
    "customer support outsourcing",
    "marketing automation software",
    "document scanning services",
)
TITLES = (
    ("MASTER SERVICES AGREEMENT", "msa"),
    ("SUPPLY AGREEMENT", "supply"),
    ("SOFTWARE SUBSCRIPTION AGREEMENT", "subscription"),
    ("SERVICES AGREEMENT", "services"),
    ("LICENCE AND SUPPORT AGREEMENT", "licence"),
    ("CONSULTING AGREEMENT", "consulting"),
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "September", "October", "November")
REQUESTS_ANY = (
    "Analyse these contracts, compare insights, and tell me the risks.",
    "Analyse these {n} PDFs, compare insights, and tell me the risks.",
    "Review these supplier contracts side by side: where do they differ, and what should worry us?",
    "Please read the attached agreements, point out the terms that conflict and the risks they carry.",
    "Compare these {n} documents and tell me what is risky for us as the customer.",
)
REQUESTS_TWO = (
    "Compare these two agreements and flag the risks.",
    "We are choosing between these two vendors. Compare their terms and list the risks.",
)
REQUESTS_AMENDED = (
    "Here are two contracts and an amendment to the first. Compare them and tell me the risks.",
    "Compare these agreements, taking the amendment into account, and flag the risks.",
)


# -- generation ------------------------------------------------------------------------------------------------------


def _differs(a: Option, b: Option, roles_a: Mapping[str, str], roles_b: Mapping[str, str]) -> bool:
    """Two positions the workflow's comparator tells apart: by their values, and by the figures of every pair of
    their sentences (a value that keeps all of its sentence's figures must still differ)."""
    if a.value == b.value or same_position(a.value, b.value):
        return False
    pairs = (
        (a.render(i, roles_a), b.render(j, roles_b)) for i in range(len(a.templates)) for j in range(len(b.templates))
    )
    return all(not same_position(x, y) for x, y in pairs if re.search(r"\d", x + y))


@dataclass(kw_only=True, slots=True)
class _Party:
    company: str
    role: str
    """Supplier, Vendor or Provider."""
    slug: str
    title: str
    title_slug: str
    svc: str


@dataclass(kw_only=True, slots=True)
class _Plan:
    """Which document states which option (and in which phrasing) of each topic."""

    said: list[dict[str, tuple[Option, int]]]
    planted: list[Planted] = field(default_factory=list)
    agreements: list[Planted] = field(default_factory=list)
    singles: list[Planted] = field(default_factory=list)
    amend_topic: str | None = None


def _roles(party: _Party, customer_role: str) -> dict[str, str]:
    return {"S": party.role, "C": customer_role}


def _pick_pair(rng: random.Random, topic: str, roles: Sequence[Mapping[str, str]]) -> tuple[Option, Option]:
    """Two positions that differ; mostly ordinary ones (a quarter of the time, or for want of two ordinary
    positions, a risky one may be among them)."""
    ordinary = [o for o in OPTIONS[topic] if not o.risky]
    pool = ordinary if len(ordinary) > 1 and rng.random() >= 0.25 else OPTIONS[topic]
    for _ in range(200):
        a, b = rng.sample(pool, 2)
        if _differs(a, b, roles[0], roles[1]):
            return a, b
    raise RuntimeError(f"no differing pair of options for {topic}")


def _pick_other(
    rng: random.Random, topic: str, against: Sequence[tuple[Option, Mapping[str, str]]], roles: Mapping[str, str]
) -> Option:
    pool = [o for o in OPTIONS[topic] if not o.risky]
    rng.shuffle(pool)
    for option in pool:
        if all(_differs(option, other, roles, other_roles) for other, other_roles in against):
            return option
    raise RuntimeError(f"no option of {topic} differs from all of {[o.value for o, _ in against]}")


def _plan(rng: random.Random, amended: bool, roles: Sequence[Mapping[str, str]]) -> _Plan:
    plan = _Plan(said=[{} for _ in roles])
    risk_topics = rng.sample(RISKY_TOPICS, rng.randint(1, 2))
    left = [t for t in TOPICS if t not in risk_topics]
    conflict_topics = rng.sample(left, rng.randint(2, 4) if amended else rng.randint(3, 5))
    left = [t for t in left if t not in conflict_topics]
    for topic in conflict_topics:
        a, b = _pick_pair(rng, topic, roles)
        plan.said[0][topic] = (a, rng.randrange(len(a.templates)))
        plan.said[1][topic] = (b, rng.randrange(len(b.templates)))
        plan.planted.append(Planted(topic=topic, kind="conflict", docs=(0, 1), values=(a.value, b.value)))
    if amended:
        existing = [t for t in conflict_topics if t in AMENDABLE]
        new = [t for t in left if t in AMENDABLE]
        pool = existing if existing and (not new or rng.random() < 0.5) else new
        topic = PAYMENT if PAYMENT in pool and rng.random() < 0.5 else rng.choice(pool)
        if topic not in conflict_topics:  # a term only the first agreement states, then changed
            first = rng.choice([o for o in OPTIONS[topic] if not o.risky])
            plan.said[0][topic] = (first, rng.randrange(len(first.templates)))
            left.remove(topic)
        against = [(plan.said[d][topic][0], roles[d]) for d in (0, 1) if topic in plan.said[d]]
        change = _pick_other(rng, topic, against, roles[2])
        plan.said[2][topic] = (change, rng.randrange(len(change.templates)))
        plan.planted.append(
            Planted(topic=topic, kind="conflict", docs=(0, 2), values=(plan.said[0][topic][0].value, change.value))
        )
        plan.amend_topic = topic
    for topic in risk_topics:
        d = rng.randrange(2)
        option = rng.choice([o for o in OPTIONS[topic] if o.risky])
        plan.said[d][topic] = (option, rng.randrange(len(option.templates)))
        plan.planted.append(Planted(topic=topic, kind="risk", docs=(d,), values=(option.value,)))
    agreed = rng.sample(left, rng.randint(1, min(2, len(left))))
    for topic in agreed:
        option = rng.choice([o for o in OPTIONS[topic] if not o.risky])
        i, j = rng.sample(range(len(option.templates)), 2)
        plan.said[0][topic], plan.said[1][topic] = (option, i), (option, j)
        plan.agreements.append(Planted(topic=topic, kind="agree", docs=(0, 1), values=(option.value, option.value)))
    for topic in (t for t in left if t not in agreed):
        if rng.random() < 0.5:
            continue  # no document addresses it
        d = rng.randrange(2)
        option = rng.choice([o for o in OPTIONS[topic] if not o.risky])
        plan.said[d][topic] = (option, rng.randrange(len(option.templates)))
        plan.singles.append(Planted(topic=topic, kind="single", docs=(d,), values=(option.value,)))
    return plan


def _lines(number: int, heading: str, sentence: str) -> list[str]:
    """A numbered clause: on one line when it fits the PDF writer's wrap width, else the sentence on its own."""
    if len(sentence) > WRAP_AT:
        raise ValueError(f"a sentence longer than a PDF line: {sentence!r}")
    first = f"{number}. {heading}. {sentence}"
    return [first] if len(first) <= WRAP_AT else [f"{number}. {heading}.", sentence]


def _parties_line(party: _Party, customer: str, roles: Mapping[str, str]) -> list[str]:
    line = f"Between {party.company} (the {roles['S']}) and {customer} (the {roles['C']})."
    if len(line) <= WRAP_AT:
        return [line]
    return [f"Between {party.company} (the {roles['S']})", f"and {customer} (the {roles['C']})."]


def _agreement(
    rng: random.Random,
    party: _Party,
    customer: str,
    roles: Mapping[str, str],
    said: Mapping[str, tuple[Option, int]],
) -> tuple[Doc, dict[str, tuple[int, str]]]:
    """One agreement: services first, then the topics it states and a few fillers in random order."""
    statements = {topic: option.render(i, roles) for topic, (option, i) in said.items()}
    body: list[tuple[str, str, str | None]] = [
        (rng.choice(HEADINGS[topic]), sentence, topic) for topic, sentence in statements.items()
    ]
    target = rng.randint(max(6, len(body) + 2), 10) if len(body) + 2 <= 10 else len(body) + 1
    fillers = rng.sample(FILLERS, min(len(FILLERS), target - 1 - len(body)))
    body += [(heading, sentence.format(**roles), None) for heading, sentence in fillers]
    rng.shuffle(body)
    services = rng.choice(SERVICES).format(svc=party.svc, **roles)
    clauses: list[tuple[str, str, str | None]] = [("Services", services, None), *body]
    numbers: dict[str, tuple[int, str]] = {}
    rendered: list[list[str]] = []
    for k, (heading, sentence, topic) in enumerate(clauses, 1):
        rendered.append(_lines(k, heading, sentence))
        if topic is not None:
            numbers[topic] = (k, heading)
    day, month, year = rng.randint(1, 28), rng.choice(MONTHS), rng.choice((2025, 2026))
    head = [party.title, *_parties_line(party, customer, roles), f"Effective date: {day} {month} {year}.", ""]
    sign = ["", f"Signed for {party.company} and for {customer}."]
    if len(clauses) >= 7 and rng.random() < 0.35:
        cut = len(clauses) - rng.randint(2, 3)
        pages = [
            "\n".join(head + [line for c in rendered[:cut] for line in c]),
            "\n".join([f"{party.title} (continued)", ""] + [line for c in rendered[cut:] for line in c] + sign),
        ]
    else:
        pages = ["\n".join(head + [line for c in rendered for line in c] + sign)]
    doc = Doc(name=f"{party.slug}-{party.title_slug}.pdf", title=party.title.title(), pages=pages)
    doc.statements = statements
    return doc, numbers


def _amendment(
    rng: random.Random,
    party: _Party,
    customer: str,
    roles: Mapping[str, str],
    topic: str,
    change: tuple[Option, int],
    clause: tuple[int, str],
) -> Doc:
    option, i = change
    sentence = option.render(i, roles)
    intro = rng.choice(("Clause {k} ({h}) now reads as follows.", "Clause {k} ({h}) is replaced by the following."))
    title = f"AMENDMENT No. 1 TO THE {party.title}"
    day, month = rng.randint(1, 28), rng.choice(MONTHS)
    lines = [
        title,
        *_parties_line(party, customer, roles),
        f"Effective date: {day} {month} 2026.",
        "",
        "The parties agree as follows.",
        "1. " + intro.format(k=clause[0], h=clause[1]),
        sentence,
        "2. All other provisions of the agreement are unchanged.",
        "3. This amendment is signed in two counterparts.",
        "",
        f"Signed for {party.company} and for {customer}.",
    ]
    if any(len(line) > WRAP_AT for line in lines):
        raise ValueError(f"a line longer than a PDF line in {title}")
    return Doc(
        name=f"{party.slug}-amendment-1.pdf",
        title=title.title(),
        pages=["\n".join(lines)],
        statements={topic: sentence},
    )


def _parties(rng: random.Random) -> tuple[str, list[_Party]]:
    customer = rng.choice(CUSTOMERS)
    firsts = rng.sample(SUPPLIER_FIRST, 2)
    titles = rng.sample(TITLES, 2)
    parties = [
        _Party(
            company=f"{first} {rng.choice(SUPPLIER_SECOND)} {rng.choice(SUFFIXES)}",
            role=rng.choice(("Supplier", "Vendor", "Provider")),
            slug=first.lower(),
            title=title,
            title_slug=slug,
            svc=rng.choice(SERVICE_NAMES),
        )
        for first, (title, slug) in zip(firsts, titles, strict=True)
    ]
    return customer, parties


def _request(rng: random.Random, n_docs: int, amended: bool) -> str:
    pool = REQUESTS_ANY + (REQUESTS_AMENDED if amended else REQUESTS_TWO)
    return rng.choice(pool).format(n=n_docs)


def generate(n: int = 24, seed: int = 2026) -> list[DocSet]:
    """``n`` document sets, the same for the same ``n`` and ``seed``; about a third include an amendment."""
    rng = random.Random(seed)
    amended_flags = [i < round(n / 3) for i in range(n)]
    rng.shuffle(amended_flags)
    sets: list[DocSet] = []
    for index, amended in enumerate(amended_flags, 1):
        customer, parties = _parties(rng)
        customer_role = rng.choice(("Customer", "Client"))
        roles = [_roles(p, customer_role) for p in parties]
        if amended:
            roles.append(roles[0])
        plan = _plan(rng, amended, roles)
        docs: list[Doc] = []
        clause_of: dict[str, tuple[int, str]] = {}
        for d, party in enumerate(parties):
            doc, numbers = _agreement(rng, party, customer, roles[d], plan.said[d])
            docs.append(doc)
            if d == 0:
                clause_of = numbers
        if plan.amend_topic is not None:
            topic = plan.amend_topic
            docs.append(_amendment(rng, parties[0], customer, roles[0], topic, plan.said[2][topic], clause_of[topic]))
        conflicts = [p for p in plan.planted if p.kind == "conflict"]
        risks = [p for p in plan.planted if p.kind == "risk"]
        sets.append(
            DocSet(
                name=f"set-{index:02d}",
                request=_request(rng, len(docs), amended),
                documents=docs,
                planted=conflicts + risks,
                agreements=plan.agreements,
                singles=plan.singles,
            )
        )
    return sets


def pdf_bytes(docset: DocSet) -> list[tuple[str, bytes]]:
    """Each document of the set as (file name, PDF bytes), in label order (D1 first)."""
    return [(doc.name, make_pdf(doc.pages, metadata={"Title": doc.title})) for doc in docset.documents]


def write_pdfs(docset: DocSet, out_dir: Path | str) -> list[Path]:
    """Each document of the set as a PDF in ``out_dir`` (file names are the documents' names), in label order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, data in pdf_bytes(docset):
        path = out / name
        path.write_bytes(data)
        paths.append(path)
    return paths


# -- scoring ---------------------------------------------------------------------------------------------------------

_STOP = frozenset(
    "the a an and or of to in on at by for with from as is are be shall will may must any all each this that "
    "these those its it their per within after before under than other otherwise only not no".split()
)
_FIGURE = re.compile(r"\d+(?:[.,]\d+)*")
_FIGURE_WORDS = {
    "fourteen": "14", "fifteen": "15", "thirty": "30", "forty-five": "45", "sixty": "60", "ninety": "90",
    "six": "6", "twelve": "12", "twenty-four": "24", "thirty-six": "36",
}  # fmt: skip
TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    PAYMENT: ("pay", "invoice", "due"),
    LIABILITY: ("liab", "cap", "uncapped"),
    TERMINATION: ("terminat", "notice", "cancel"),
    DATA: ("data", "hosted", "stored", "processed", "residen"),
    LAW: ("law", "govern", "jurisdiction", "court"),
    TERM: ("renew", "term", "duration"),
    FEES: ("fee", "price", "pricing", "increase"),
    EXCLUSIVITY: ("exclusiv", "sole supplier", "only from"),
}
"""Word starts that name a topic in a risk's own words (matched at a word boundary, case-folded)."""


def _figures(text: str) -> set[str]:
    out: set[str] = set()
    for raw in _FIGURE.findall(text):
        n = raw.replace(",", "")
        if "." in n:
            n = n.rstrip("0").rstrip(".")
        out.add(n)
    words = re.findall(r"[a-z]+(?:-[a-z]+)?", text.casefold())
    return out | {_FIGURE_WORDS[w] for w in words if w in _FIGURE_WORDS}


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]+", text.casefold()) if w not in _STOP and len(w) > 2}


def shows_value(value: str, text: str, others: Sequence[str] = ()) -> bool:
    """Whether ``text`` states ``value``, tolerantly: all of its figures when it has any (30 days: "30" or
    "thirty"), else one of its words (by its first five letters) that the ``others`` values do not share
    ("England and Wales" vs "the State of Delaware": england or wales)."""
    figures = _figures(value)
    if figures:
        return figures <= _figures(text)
    stems = _stems(value)
    distinctive = stems - set().union(*(_stems(o) for o in others)) or stems
    folded = text.casefold()
    return any(re.search(rf"\b{re.escape(s)}", folded) for s in distinctive)


def _names_topic(topic: str, text: str) -> bool:
    folded = text.casefold()
    words = TOPIC_KEYWORDS.get(topic) or tuple(_stems(topic))
    return any(re.search(rf"\b{re.escape(w)}", folded) for w in words)


@dataclass(kw_only=True, slots=True)
class Score:
    planted_conflicts: int = 0
    found_conflicts: int = 0
    """Planted conflicts recalled: a finding on the topic naming the documents involved and showing their values."""
    false_conflicts: int = 0
    """Reported conflicts on a topic that is not a planted conflict of the set."""
    reported_conflicts: int = 0
    planted_risks: int = 0
    found_risks: int = 0
    """Planted single-document risks worded: a risk on the topic whose evidence cites the document."""
    surfaced_risks: int = 0
    """Planted single-document risks the table shows: the topic's row has the document's value."""
    worded_conflicts: int = 0
    """Planted conflicts a risk on the same topic words in its own text (a value or a keyword of the topic)."""
    failed: int = 0
    """1 when the task had no result."""
    misses: list[str] = field(default_factory=list)

    @property
    def conflict_recall(self) -> float:
        return self.found_conflicts / self.planted_conflicts if self.planted_conflicts else 1.0

    @property
    def conflict_precision(self) -> float:
        if not self.reported_conflicts:
            return 1.0
        return (self.reported_conflicts - self.false_conflicts) / self.reported_conflicts

    @property
    def risk_recall(self) -> float:
        return self.found_risks / self.planted_risks if self.planted_risks else 1.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "misses"}
        out |= {
            "conflict_recall": round(self.conflict_recall, 3),
            "conflict_precision": round(self.conflict_precision, 3),
            "risk_recall": round(self.risk_recall, 3),
            "misses": list(self.misses),
        }
        return out


def summed(scores: Sequence[Score]) -> Score:
    """The counts of several sets added up (misses concatenated)."""
    total = Score()
    for s in scores:
        for f in fields(Score):
            if f.name == "misses":
                total.misses.extend(s.misses)
            else:
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total


def _by_topic(items: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in items or []:
        if isinstance(item, dict):
            out.setdefault(str(item.get("topic", "")).casefold().strip(), []).append(item)
    return out


def _detail_for(detail: str, label: str) -> str:
    """The parts of a finding's detail ("D1 (a.pdf): 30 days; D2 (b.pdf): 60 days") about one label."""
    return " ".join(part for part in detail.split("; ") if re.match(rf"\s*{re.escape(label)}\b", part))


def _cell_text(rows: Sequence[dict[str, Any]], label: str) -> str:
    return " ".join(
        f"{c.get('value', '')} {c.get('quote', '')}"
        for row in rows
        for c in row.get("cells") or []
        if isinstance(c, dict) and c.get("label") == label
    )


def _score_conflict(p: Planted, findings: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], out: Score) -> None:
    name = p.describe()
    if not findings:
        out.misses.append(f"{name}: not reported")
        return
    for f in findings:
        labels = {str(x) for x in f.get("labels") or []}
        if not set(p.labels) <= labels:
            continue
        unshown = [
            f"{label}'s {value!r}"
            for label, value in zip(p.labels, p.values, strict=True)
            if not shows_value(
                value,
                _detail_for(str(f.get("detail", "")), label) + " " + _cell_text(rows, label),
                [v for v in p.values if v != value],
            )
        ]
        if not unshown:
            out.found_conflicts += 1
            return
        out.misses.append(f"{name}: reported, but {' and '.join(unshown)} not shown")
        return
    out.misses.append(f"{name}: reported without {'/'.join(p.labels)}")


def score(docset: DocSet, result: dict[str, Any] | None) -> Score:
    """How much of what was planted in ``docset`` a finished document_analysis ``result`` shows (``None``: the
    task failed)."""
    conflicts, risks = docset.conflicts, docset.risks
    out = Score(planted_conflicts=len(conflicts), planted_risks=len(risks))
    if result is None:
        out.failed = 1
        out.misses.append("the task failed: no result")
        return out
    comparison = result.get("comparison") or {}
    findings = _by_topic(comparison.get("conflicts"))
    rows = _by_topic(comparison.get("table"))
    worded = _by_topic(result.get("risks"))
    out.reported_conflicts = sum(len(f) for f in findings.values())

    for p in conflicts:
        topic = p.topic.casefold()
        _score_conflict(p, findings.get(topic, []), rows.get(topic, []), out)
        texts = [f"{r.get('risk', '')} {r.get('rationale', '')}" for r in worded.get(topic, [])]
        if any(any(shows_value(v, t, p.values) for v in p.values) or _names_topic(p.topic, t) for t in texts):
            out.worded_conflicts += 1
        else:
            out.misses.append(f"{p.describe()}: no risk words it")

    planted_topics = {p.topic.casefold() for p in conflicts}
    kinds = {p.topic.casefold(): p.kind for p in docset.agreements + docset.singles + risks}
    for topic, found in findings.items():
        if topic not in planted_topics:
            out.false_conflicts += len(found)
            why = {"agree": "planted agreement", "single": "one document only", "risk": "one document only"}
            out.misses.append(f"false conflict on {topic!r} ({why.get(kinds.get(topic, ''), 'not planted')})")

    for p in risks:
        topic, label = p.topic.casefold(), p.labels[0]
        cited = any(
            any(isinstance(e, dict) and e.get("label") == label for e in r.get("evidence") or [])
            for r in worded.get(topic, [])
        )
        surfaced = shows_value(p.values[0], _cell_text(rows.get(topic, []), label))
        out.found_risks += cited
        out.surfaced_risks += surfaced
        if not cited:
            out.misses.append(f"{p.describe()}: not worded{' (the table shows it)' if surfaced else ''}")
    return out


def perfect_result(docset: DocSet) -> dict[str, Any]:
    """The ``result`` a perfect analysis gives (the parts :func:`score` reads): every stated topic in the table
    with the planted value and the document's own sentence, a conflict per differing row, and a risk per planted
    conflict and risk. For tests and as the scorer's ceiling."""
    labels = docset.labels
    planted = {p.topic: p for p in docset.planted + docset.agreements + docset.singles}
    value_of: dict[tuple[str, str], str] = {}
    for p in planted.values():
        for label, value in zip(p.labels, p.values, strict=True):
            value_of[(p.topic, label)] = value
    for p in docset.conflicts:  # the first agreement's value on an amended topic
        for label, value in zip(p.labels, p.values, strict=True):
            value_of[(p.topic, label)] = value
    table: list[dict[str, Any]] = []
    conflicts: list[dict[str, Any]] = []
    for topic in TOPICS:
        cells = [
            {"document": label, "label": label, "value": value_of[(topic, label)], "quote": doc.statements[topic]}
            for label, doc in zip(labels, docset.documents, strict=True)
            if topic in doc.statements
        ]
        distinct = {c["value"] for c in cells}
        status = "absent" if not cells else "single" if len(cells) == 1 else "differ" if len(distinct) > 1 else "agree"
        table.append({"topic": topic, "status": status, "cells": cells})
        if status == "differ":
            detail = "; ".join(
                f"{c['label']} ({docset.documents[labels.index(c['label'])].name}): {c['value']}" for c in cells
            )
            conflicts.append({"topic": topic, "labels": [c["label"] for c in cells], "detail": detail})
    risks: list[dict[str, Any]] = []
    rows = {row["topic"]: row for row in table}
    for topic in dict.fromkeys(p.topic for p in docset.planted):  # one risk per topic, as the workflow words them
        cells = rows[topic]["cells"]
        risks.append(
            {
                "topic": topic,
                "risk": f"The {topic} terms expose the customer to a risk.",
                "severity": "high",
                "rationale": "; ".join(f"{c['label']} says {c['value']}" for c in cells) + ".",
                "evidence": [{"label": c["label"], "quote": c["quote"]} for c in cells],
            }
        )
    return {"comparison": {"table": table, "conflicts": conflicts}, "risks": risks}


# -- eyeballing -------------------------------------------------------------------------------------------------------


def summary(docsets: Sequence[DocSet]) -> str:
    lines = []
    for s in docsets:
        lines.append(f"{s.name}: {len(s.documents)} documents ({', '.join(d.name for d in s.documents)})")
        lines.append(f"  request: {s.request}")
        for p in s.planted + s.agreements + s.singles:
            lines.append(f"  {p.describe()}")
    n_conflicts = sum(len(s.conflicts) for s in docsets)
    n_risks = sum(len(s.risks) for s in docsets)
    amended = sum(len(s.documents) == 3 for s in docsets)
    lines.append(
        f"{len(docsets)} sets ({amended} with an amendment): {n_conflicts} planted conflicts, {n_risks} planted "
        f"risks, {sum(len(s.agreements) for s in docsets)} agreements"
    )
    return "\n".join(lines)


def show(docset: DocSet) -> str:
    lines = [f"== {docset.name}: {docset.request}"]
    for label, doc in zip(docset.labels, docset.documents, strict=True):
        lines.append(f"\n--- {label}: {doc.name}")
        for n, page in enumerate(doc.pages, 1):
            lines.append(f"[page {n}]\n{page}")
    lines.append("\nplanted:")
    lines += [f"  {p.describe()}" for p in docset.planted + docset.agreements + docset.singles]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--show", type=int, default=0, help="which set to print in full (0-based)")
    parser.add_argument("--pdf", type=Path, default=None, help="write the shown set's PDFs into this folder")
    args = parser.parse_args(argv)
    docsets = generate(args.n, args.seed)
    print(summary(docsets))
    print()
    chosen = docsets[args.show]
    print(show(chosen))
    if args.pdf is not None:
        for path in write_pdfs(chosen, args.pdf):
            print(path)


if __name__ == "__main__":
    main()
