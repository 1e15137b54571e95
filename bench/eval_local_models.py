"""Which embedded model should be keel's default: ``local:smollm2`` or ``local:gemma3``? A small measured eval;
writes its figures into docs/benchmarks.md (between the ``eval_local_models`` markers).

Run: ``.venv/bin/python bench/eval_local_models.py`` (several minutes on 2 cores, most of it Gemma's structured
output; ``--models smollm2`` to run one, ``--no-doc`` to print without rewriting the doc).

Both models run through keel's adapter (``LocalModel``) with keel's defaults unless said otherwise.

(a) **Plans.** Ten intents, each planned the way ``keel.orchestration.planner.make_plan`` asks for a plan: the
    same system prompt (``PLANNER_PROMPT`` with ``Plan``'s JSON schema and a 4-tool catalog), the intent as the user
    message, ``Plan``'s schema as ``output_schema`` (so a llama.cpp grammar), temperature 0. First attempt only (no
    repair round). Counted: JSON-valid, schema-valid (``Plan.model_validate_json``), ``check_plan``-valid against
    the catalog, and *runnable*: check_plan-valid with at least one node and a tool node, and no reason for
    ``make_plan`` to stop for clarification (no questions, confidence >= 0.6).
(b) **Answers.** Four short business documents written for this eval, each with 3-4 planted risks; the question
    "What are the risks in this document?" (free text, temperature 0, 256 tokens at most). Score: keyword recall
    of the planted risks (a risk counts as found when the answer names any of its keywords). Because a small model
    may just copy the document back (which would "find" every keyword), the share of the answer's 6-word
    sequences copied verbatim from the document is reported beside it.
(c) **Speed.** Load time (``LocalModel.load``, file already in the page cache), free-text and grammar-constrained
    tokens/s (output tokens over the whole call, prompt evaluation included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import llama_cpp
import pydantic
from _doc import cpu_model, write_section
from pydantic import BaseModel, Field

from keel.orchestration.models import Message, ModelSettings
from keel.orchestration.models.local import LocalModel
from keel.orchestration.planner import PLANNER_PROMPT, Plan, check_plan
from keel.orchestration.tools import Tool, ToolCatalog

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- eval_local_models:start -->", "<!-- eval_local_models:end -->"
MODELS = ("smollm2", "gemma3")
MIN_CONFIDENCE = 0.6  # make_plan's default threshold

# -- (a) plans ---------------------------------------------------------------------------------------------------


class ReadPdf(BaseModel):
    path: str = Field(description="Path of the PDF file.")


class WebSearch(BaseModel):
    query: str
    max_results: int = Field(5, ge=1, le=20)


class SqlQuery(BaseModel):
    sql: str = Field(description="One read-only SELECT statement.")


class SendEmail(BaseModel):
    to: str
    subject: str
    body: str


async def _unused(_: Any) -> Any:  # the eval only plans; nothing runs
    return None


CATALOG = ToolCatalog(
    [
        Tool(name="read_pdf", description="Extract the text of a PDF document.", input_model=ReadPdf, fn=_unused),
        Tool(
            name="web_search",
            description="Search the web; returns titles, links and snippets.",
            input_model=WebSearch,
            fn=_unused,
        ),
        Tool(
            name="sql_query",
            description="Run a read-only SQL query on the sales database (tables: orders, customers, products).",
            input_model=SqlQuery,
            fn=_unused,
        ),
        Tool(
            name="send_email",
            description="Send an email.",
            input_model=SendEmail,
            fn=_unused,
            effect="write",
        ),
    ]
)

INTENTS = [
    "Analyse these 4 PDFs (q1.pdf, q2.pdf, q3.pdf, q4.pdf), compare insights, and tell me the risks.",
    "Find recent news about our competitor Northwind and summarise what threatens us.",
    "Get last month's total sales by region from the database and email the summary to ceo@acme.com.",
    "Read contract.pdf and list every penalty clause.",
    "Compare the revenue figures in report_2023.pdf and report_2024.pdf.",
    "Search the web for today's copper price and tell me whether our fixed-price supply contract is at risk.",
    "Which customers bought more than $10,000 last quarter? Send the list to sales@acme.com.",
    "Read board_minutes.pdf and draft an email to board@acme.com with the action items.",
    "Summarise the supplier contracts supplier_a.pdf, supplier_b.pdf and supplier_c.pdf and rank them by risk.",
    "Look up our top 5 products by margin in the database and search the web for competing products.",
]


def planner_messages(intent: str) -> list[Message]:
    system = PLANNER_PROMPT.format(
        schema=json.dumps(Plan.model_json_schema()), tools=json.dumps(CATALOG.describe(), indent=1)
    )
    return [Message(role="system", content=system), Message(role="user", content=intent)]


@dataclass
class PlanOutcome:
    intent: str
    text: str
    finish: str
    tokens: int
    seconds: float
    json_valid: bool = False
    schema_valid: bool = False
    plan_valid: bool = False
    runnable: bool = False
    nodes: int = 0
    problem: str = ""


def judge_plan(intent: str, text: str, finish: str, tokens: int, seconds: float) -> PlanOutcome:
    out = PlanOutcome(intent, text, finish, tokens, seconds)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        out.problem = f"not JSON ({'cut at the token limit' if finish == 'length' else exc.msg})"
        return out
    out.json_valid = True
    try:
        plan = Plan.model_validate_json(text)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        out.problem = f"schema: /{'/'.join(str(p) for p in err['loc'])}: {err['msg']}"
        return out
    out.schema_valid = True
    out.nodes = len(plan.nodes)
    issues = check_plan(plan, CATALOG)
    if issues:
        out.problem = f"check_plan: {issues[0]}" + (f" (+{len(issues) - 1} more)" if len(issues) > 1 else "")
        return out
    out.plan_valid = True
    uses_tool = any(n.kind == "tool" for n in plan.nodes)
    asks = plan.questions or plan.confidence < MIN_CONFIDENCE
    out.runnable = bool(plan.nodes) and uses_tool and not asks
    if not out.runnable:
        out.problem = (
            "no nodes"
            if not plan.nodes
            else "no tool node"
            if not uses_tool
            else f"would ask for clarification (confidence {plan.confidence}, {len(plan.questions)} question(s))"
        )
    return out


# -- (b) answers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    risks: dict[str, tuple[str, ...]]
    """Planted risk -> keywords (lower case); any one in the answer counts the risk as found."""


DOCUMENTS = [
    Document(
        "Supplier contract",
        "SUPPLY AGREEMENT between Acme Foods (the Buyer) and Northwind Packaging (the Supplier), for 24 months.\n"
        "Clause 4. The Buyer shall purchase at least 2,000,000 units per year. Any shortfall is invoiced to the "
        "Buyer at the full unit price.\n"
        "Clause 7. For each week of late delivery the Supplier pays a penalty of 5% of the order value, capped at "
        "30%. Beyond the cap the Buyer has no further remedy.\n"
        "Clause 9. The Supplier may raise its prices by up to 12% each year in line with raw-material costs.\n"
        "Clause 12. All packaging is produced at the Supplier's single plant in Rotterdam.",
        {
            "minimum purchase commitment": ("minimum", "shortfall", "2,000,000", "at least"),
            "late delivery / capped penalty": ("late", "delay", "penalty", "cap"),
            "price increases": ("price", "12%", "raise"),
            "single plant": ("single plant", "one plant", "single", "rotterdam"),
        },
    ),
    Document(
        "Financial summary",
        "Brightline Software, Q3 financial summary. Revenue grew 12% to $4.2M. Operating cash flow was negative "
        "for the third quarter in a row (-$1.8M in Q3). Cash at the end of the quarter: $1.1M; monthly burn is "
        "about $600k. A $2M bank loan falls due in March and has not been refinanced. The largest customer, "
        "Orion Retail, accounts for 45% of revenue and its contract is up for renewal in January.",
        {
            "cash flow / runway": ("cash", "burn", "runway", "liquidity"),
            "loan due": ("loan", "debt", "refinanc", "repay"),
            "customer concentration": ("45%", "largest customer", "orion", "concentration", "depend"),
        },
    ),
    Document(
        "IT incident report",
        "Incident report, Nimbus Cloud. On Tuesday a four-hour outage affected 30% of customers; the root cause "
        "was an expired TLS certificate that nobody monitored. Service credits owed to customers total $250,000. "
        "During the investigation a penetration test found an unpatched SQL injection flaw in the billing portal; "
        "the fix is scheduled after the spring release. Database backups are taken nightly but have never been "
        "restored in a test.",
        {
            "certificate outage": ("certificate", "tls", "outage", "downtime"),
            "SQL injection": ("sql", "injection", "unpatched", "vulnerab"),
            "untested backups": ("backup", "restore"),
            "service credits": ("credit", "$250,000", "250,000"),
        },
    ),
    Document(
        "Project status report",
        "ERP rollout, status report for the steering committee. The project is three months behind schedule and "
        "35% over budget. The system integrator has asked for a $600,000 change order. Two of the integrator's "
        "three senior consultants are leaving the project at the end of the month. Go-live is now planned for "
        "the first week of December, the busiest sales period of the year, and finance cannot close the books on "
        "time until the new system works.",
        {
            "schedule delay": ("behind schedule", "delay", "late", "three months"),
            "budget overrun": ("over budget", "35%", "budget", "cost", "change order", "600,000"),
            "consultants leaving": ("consultant", "leaving", "staff", "turnover", "key people"),
            "go-live in peak season": ("december", "busiest", "peak", "sales period"),
        },
    ),
]
QUESTION = "What are the risks in this document?"


@dataclass
class AnswerOutcome:
    title: str
    answer: str
    tokens: int
    seconds: float
    found: list[str]
    """Planted risks named anywhere in the answer."""
    own: list[str]
    """Planted risks named in the answer's own words (outside passages copied from the document)."""
    total: int
    copied: float
    """Share of the answer's words inside a run of 6+ words copied verbatim from the document."""


WORD = re.compile(r"[a-z0-9$%,.'-]+")
RUN = 6


def own_words(answer: str, document: str) -> tuple[str, float]:
    """The answer without the runs of ``RUN``+ words it copied from the document, and the copied share."""
    words = [w.strip(",.") for w in WORD.findall(answer.lower())]
    doc_words = [w.strip(",.") for w in WORD.findall(document.lower())]
    doc_runs = {tuple(doc_words[i : i + RUN]) for i in range(len(doc_words) - RUN + 1)}
    copied = [False] * len(words)
    for i in range(len(words) - RUN + 1):
        if tuple(words[i : i + RUN]) in doc_runs:
            copied[i : i + RUN] = [True] * RUN
    kept = " ".join(w for w, c in zip(words, copied, strict=True) if not c)
    return kept, (sum(copied) / len(words) if words else 0.0)


def judge_answer(doc: Document, answer: str, tokens: int, seconds: float) -> AnswerOutcome:
    low = answer.lower()
    kept, copied = own_words(answer, doc.text)
    found = [risk for risk, words in doc.risks.items() if any(w in low for w in words)]
    own = [risk for risk, words in doc.risks.items() if any(w in kept for w in words)]
    return AnswerOutcome(doc.title, answer, tokens, seconds, found, own, len(doc.risks), copied)


# -- running -----------------------------------------------------------------------------------------------------


@dataclass
class ModelResult:
    name: str
    model_id: str = ""
    load_s: float = 0.0
    plans: list[PlanOutcome] = field(default_factory=list)
    answers: list[AnswerOutcome] = field(default_factory=list)

    def count(self, attr: str) -> int:
        return sum(1 for p in self.plans if getattr(p, attr))

    @property
    def recall(self) -> float:
        return sum(len(a.found) for a in self.answers) / max(1, sum(a.total for a in self.answers))

    @property
    def own_recall(self) -> float:
        return sum(len(a.own) for a in self.answers) / max(1, sum(a.total for a in self.answers))

    @property
    def with_nodes(self) -> int:
        return sum(1 for p in self.plans if p.nodes)

    @property
    def copied(self) -> float:
        return statistics.mean(a.copied for a in self.answers) if self.answers else 0.0

    @property
    def text_rate(self) -> float:
        return sum(a.tokens for a in self.answers) / max(1e-9, sum(a.seconds for a in self.answers))

    @property
    def structured_rate(self) -> float:
        return sum(p.tokens for p in self.plans) / max(1e-9, sum(p.seconds for p in self.plans))


def say(msg: str) -> None:
    print(f"[eval_local_models] {msg}", file=sys.stderr, flush=True)


async def evaluate(name: str) -> ModelResult:
    result = ModelResult(name)
    started = time.perf_counter()
    model = LocalModel.load(name)
    result.load_s = time.perf_counter() - started
    result.model_id = model.model_id
    say(f"{name}: loaded {model.model_id} in {result.load_s:.2f} s")
    schema = Plan.model_json_schema()
    for i, intent in enumerate(INTENTS):
        t0 = time.perf_counter()
        resp = await model.request(
            planner_messages(intent), output_schema=schema, settings=ModelSettings(temperature=0.0)
        )
        outcome = judge_plan(intent, resp.text, resp.finish_reason, resp.output_tokens, time.perf_counter() - t0)
        result.plans.append(outcome)
        say(
            f"{name}: plan {i + 1}/{len(INTENTS)}: {outcome.tokens} tokens in {outcome.seconds:.1f} s, "
            f"runnable={outcome.runnable} {outcome.problem}"
        )
    for doc in DOCUMENTS:
        t0 = time.perf_counter()
        resp = await model.request(
            [Message(role="user", content=f"{doc.text}\n\n{QUESTION}")],
            settings=ModelSettings(temperature=0.0, max_tokens=256),
        )
        outcome_a = judge_answer(doc, resp.text, resp.output_tokens, time.perf_counter() - t0)
        result.answers.append(outcome_a)
        say(
            f"{name}: {doc.title}: found {len(outcome_a.found)}/{len(doc.risks)}, in its own words "
            f"{len(outcome_a.own)}, copied {outcome_a.copied:.0%}"
        )
    return result


# -- the report --------------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = cpu_model()
    return (
        f"nproc={os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu}; Python {platform.python_version()}; "
        f"llama-cpp-python {llama_cpp.__version__}"
    )


def clip(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def pick(results: list[ModelResult]) -> tuple[ModelResult, str]:
    """Runnable plans first (what ctx.plan needs), then risks found in the model's own words, then schema-valid
    plans, then structured-output speed."""
    ranked = sorted(
        results,
        key=lambda r: (r.count("runnable"), round(r.own_recall, 2), r.count("schema_valid"), r.structured_rate),
        reverse=True,
    )
    best = ranked[0]
    if len(ranked) == 1:
        return best, "only one model was evaluated"
    other = ranked[1]
    n = len(INTENTS)
    why = (
        f"runnable plans {best.count('runnable')}/{n} vs {other.count('runnable')}/{n}; planted risks found in "
        f"the model's own words {best.own_recall:.0%} vs {other.own_recall:.0%} (anywhere in the answer "
        f"{best.recall:.0%} vs {other.recall:.0%}, with {best.copied:.0%} vs {other.copied:.0%} of the answer "
        f"copied from the document); schema-valid plans {best.count('schema_valid')}/{n} vs "
        f"{other.count('schema_valid')}/{n}; structured output {best.structured_rate:.1f} vs "
        f"{other.structured_rate:.1f} tokens/s, free text {best.text_rate:.1f} vs {other.text_rate:.1f}; "
        f"load {best.load_s:.2f} s vs {other.load_s:.2f} s"
    )
    return best, why


def caveats(results: list[ModelResult]) -> list[str]:
    if any(r.count("runnable") for r in results):
        return []
    return [
        "**Neither model plans.** No plan from either is runnable on the first attempt with keel's planner prompt "
        "(schema, catalog and rules, ~1,200 tokens): the grammar makes the JSON valid, but the nodes lack tools, "
        "arguments or prompts, or there are none. `ctx.plan` needs a hosted model or a larger GGUF "
        "(`local:/path/to/model.gguf`); the embedded default is for `ctx.generate`, tests and offline demos.",
        "",
    ]


def render(results: list[ModelResult], elapsed: float) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    n = len(INTENTS)
    best, why = pick(results)
    summary = table(
        [
            "model",
            "JSON-valid plans",
            "schema-valid",
            "check_plan-valid",
            "with nodes",
            "runnable",
            "risks found (own words)",
            "risks found (anywhere)",
            "answer copied from doc",
            "free text tok/s",
            "structured tok/s",
            "load",
        ],
        [
            [
                f"`local:{r.name}` (`{r.model_id}`)",
                f"{r.count('json_valid')}/{n}",
                f"{r.count('schema_valid')}/{n}",
                f"{r.count('plan_valid')}/{n}",
                f"{r.with_nodes}/{n}",
                f"**{r.count('runnable')}/{n}**",
                f"**{r.own_recall:.0%}**",
                f"{r.recall:.0%}",
                f"{r.copied:.0%}",
                f"{r.text_rate:.1f}",
                f"{r.structured_rate:.1f}",
                f"{r.load_s:.2f} s",
            ]
            for r in results
        ],
    )
    plan_rows = []
    for i, intent in enumerate(INTENTS):
        row = [clip(intent, 70)]
        for r in results:
            p = r.plans[i]
            verdict = "runnable" if p.runnable else p.problem
            row.append(f"{verdict}; {p.nodes} node(s), {p.tokens} tok, {p.seconds:.1f} s")
        plan_rows.append(row)
    answer_rows = []
    for j, doc in enumerate(DOCUMENTS):
        row = [doc.title]
        for r in results:
            a = r.answers[j]
            missed = [risk for risk in doc.risks if risk not in a.own]
            row.append(
                f"{len(a.own)}/{a.total} in own words, {len(a.found)}/{a.total} anywhere; copied {a.copied:.0%}; "
                f"not in own words: {', '.join(missed) or '—'}"
            )
        answer_rows.append(row)
    samples = []
    for r in results:
        if r.answers:
            samples.append(f"- `{r.name}` on “{r.answers[1].title}”: “{clip(r.answers[1].answer, 300)}”")
        runnable = next((p for p in r.plans if p.runnable), None)
        shown = runnable or (r.plans[0] if r.plans else None)
        if shown is not None:
            samples.append(f"- `{r.name}` plan for “{clip(shown.intent, 60)}”: `{clip(shown.text, 300)}`")
    heads = [f"`{r.name}`" for r in results]
    parts = [
        START_MARK,
        "## Embedded model: SmolLM2-135M vs Gemma 3 270M (`bench/eval_local_models.py`)",
        "",
        f"Generated by `.venv/bin/python bench/eval_local_models.py` on {stamp} in {elapsed:.0f} s. "
        f"**Machine:** {machine()}.",
        "",
        f"**Recommendation: `local:{best.name}` as the embedded default** — {why}.",
        "",
        *caveats(results),
        summary,
        "",
        "- *Runnable*: schema-valid, `check_plan`-valid against the 4-tool catalog, at least one node and a tool "
        "node, no questions and confidence ≥ 0.6 (what `make_plan` needs to go on without asking). First attempt "
        "only; `make_plan` would also get up to 2 repair rounds.",
        "- *Risks found*: planted risks named in the answer, by keyword, over "
        f"{sum(len(d.risks) for d in DOCUMENTS)} risks in {len(DOCUMENTS)} documents; *own words* leaves out "
        f"every run of {RUN}+ words copied verbatim from the document (a model that repeats its input names every "
        "keyword without having found anything). *Copied*: share of the answer's words inside such runs.",
        "- Speeds are output tokens over whole calls (prompt evaluation included): free text from the four "
        "answers, structured from the ten plans (a JSON-schema grammar checks every candidate token, so its cost "
        "grows with the vocabulary: 49k tokens for SmolLM2, 262k for Gemma 3).",
        "- `local:gemma3` is the *pretrained* Gemma 3 270M (the package ships no instruction-tuned weights and no "
        "chat template); keel lays its prompt out in Gemma's turn format, but it was not trained to follow it.",
        "",
        "### Plans, per intent",
        "",
        table(["intent", *heads], plan_rows),
        "",
        "### Answers, per document",
        "",
        table(["document", *heads], answer_rows),
        "",
        "### Samples",
        "",
        *samples,
        END_MARK,
    ]
    return "\n".join(parts)


def write_doc(section: str) -> None:
    write_section(section, START_MARK, END_MARK, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: smollm2,gemma3")
    parser.add_argument("--no-doc", action="store_true", help=f"print the section, do not rewrite {DOC.name}")
    args = parser.parse_args()
    started = time.monotonic()
    results = [asyncio.run(evaluate(name)) for name in args.models.split(",") if name]
    section = render(results, time.monotonic() - started)
    print(section)
    if not args.no_doc:
        write_doc(section)
        say(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
