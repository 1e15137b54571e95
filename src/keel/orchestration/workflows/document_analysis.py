"""The flagship workflow: "Analyse these N PDFs, compare insights, and tell me the risks".

The work is cut into steps a small local model does well, and everything that can be decided in code is:

* **plan**: the model restates the request with a confidence and names any topics the request itself asks
  about. A confidence under ``min_confidence`` ends the task as ``needs_clarification``, with the planner's
  questions, before a document is read. The topics are the caller's (``topics``), or a checklist of the terms
  where commercial documents most often differ (payment, liability, termination, data location, governing law,
  term, fees, exclusivity) plus the request's own. The graph is recorded in ``metadata.plan`` and announced as a
  ``plan`` event.
* **ingest**: each document is its own durable step. An encrypted one is skipped with a warning; a corrupt,
  unreachable or hostile one becomes an envelope error. The others go on.
* **extract**: every document at once, each with its own timeout: one structured call per document gives, per
  topic, ``{quote, value}``, the quote narrowed by the JSON schema to the document's own sentences (or empty). A
  document longer than the context window is read in windows (map) and merged per topic (reduce), never
  truncated. A quote that is not in the document is flagged ``hallucination_suspected`` and left out. At least
  ``min_success`` documents must be read; each one is kept as a partial result as soon as it exists.
* **compare**: an aligned table, topic by document, computed in code: documents differ on a topic when the
  figures (30 days, USD 50,000) or the content words of their values differ.
* **risks**: the model words only what the table shows: one small call per topic the documents differ on (then
  per topic only one document addresses), giving a risk, a severity and a rationale; the evidence is the
  table's verified quotes. A worded risk that is junk (a number or a bare label for a title, a duplicate, a
  rationale citing nothing) is dropped with a ``low_quality_output`` warning saying how many.
* **corroborate**: each risk is looked up in the documents' passages with the ``search_memory`` tool (vector
  memory, the same search an agent uses): the best passage per document, its page and cosine score, and the
  retrieval's confidence become the risk's ``support``. It is a second reader beside the table: a document the
  table shows silent on the topic but with a strong passage is worth a look. Without the tool (a task allowlist
  without it, no vector memory) the risks come back without ``support`` and a warning says why.
* **validate**: the result is checked against its schema, and every quote is looked up in the source again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from keel.errors import ClarificationNeeded, InputError, StepFailed, WorkflowError
from keel.memory.types import ChunkRecord, DocumentStatus
from keel.netguard import AllowList
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Admission, Workflow
from keel.orchestration.llm.models import Message, Model, ModelSettings
from keel.orchestration.tools.fetch import FetchLimits, probe_document
from keel.orchestration.workflows.memory import ingest_one, memory_of, report_documents, unknown_documents

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

__all__ = ["DOCUMENT_ANALYSIS", "DocumentAnalysisInput", "DocumentAnalysisResult", "find_quote"]

DocumentRef = Annotated[
    str,
    Field(
        min_length=5,
        max_length=2048,
        pattern=r"^(doc_[A-Za-z0-9_-]{1,128}|https?://\S+)$",
        description="A document id from `POST /v1/documents`, or an http(s) URL to fetch (SSRF-guarded).",
    ),
]


class DocumentAnalysisInput(BaseModel):
    """Input of the ``document_analysis`` workflow."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "request": "Analyse these 4 PDFs, compare insights, and tell me the risks.",
                    "documents": ["doc_3f2a…", "doc_9b41…", "https://example.com/contract.pdf", "doc_77c0…"],
                }
            ]
        },
    )

    request: str = Field(
        "Analyse these documents, compare insights, and tell me the risks.",
        min_length=1,
        max_length=4000,
        description="What the caller wants, in their words. When omitted: analyse, compare, and report the risks.",
    )
    documents: list[DocumentRef] = Field(min_length=1, max_length=20)
    model: str | None = Field(None, max_length=500, description="A model spec; KEEL_DEFAULT_MODEL when omitted.")
    min_success: int | None = Field(
        None, ge=1, le=20, description="Fewest documents that must be read (default: half, rounded up)."
    )
    summary_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Time limit of reading each document (its extraction calls)."
    )
    step_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Time limit of the plan and of each risk's wording."
    )
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="Below this planning confidence the task asks for clarification instead."
    )
    max_risks: int = Field(8, ge=1, le=10, description="Most risks worded (differences first).")
    topics: list[Annotated[str, Field(min_length=2, max_length=60)]] | None = Field(
        None,
        max_length=10,
        description="The topics to compare the documents on (e.g. payment terms, warranty). Default: a checklist "
        "of commercial terms plus the topics the request names.",
    )


# -- what the model is asked for (bounded, so a small model's grammar ends every list and string) ----------------

Short = Annotated[str, Field(max_length=300)]


class Intent(BaseModel):
    goal: str = Field(max_length=300, description="The request restated in one sentence.")
    confidence: float = Field(ge=0, le=1, description="How sure you are what the user wants, 0 to 1.")
    questions: list[Short] = Field(
        default_factory=list, max_length=3, description="What you must ask first; empty when clear."
    )
    focus: list[Annotated[str, Field(max_length=60)]] = Field(
        max_length=4, description="Topics the request itself names, if any (e.g. warranty, uptime)."
    )


class Extracted(BaseModel):
    quote: str = Field(max_length=400, description="The document's sentence that states the topic, or empty.")
    value: str = Field(max_length=120, description="What it says about the topic, in a few words, or empty.")


class Wording(BaseModel):
    risk: str = Field(min_length=12, max_length=160, description="The risk in one short sentence.")
    severity: Literal["low", "medium", "high", "critical"]
    rationale: str = Field(max_length=500, description="Why, naming what each document says.")


# -- what the caller gets (checked before delivery) ----------------------------------------------------------------


class Evidence(BaseModel):
    document: str = Field(description="The document id.")
    label: str
    source: str
    page: int
    quote: str
    verified: bool = Field(description="The quote was found in the document's text (see `found_on_page`).")
    found_on_page: int | None = None


class Passage(BaseModel):
    document: str = Field(description="The document id.")
    label: str
    page: int
    score: float = Field(description="Cosine similarity of the passage to the risk, as vector memory scored it.")
    text: str = Field(description="The passage's opening, for a reader to check.")


class Support(BaseModel):
    confidence: float = Field(ge=0, le=1, description="The retrieval's confidence (see `level`).")
    level: Literal["high", "medium", "low", "none"] = Field(
        description="How strongly the documents' passages match the risk: says that similar text was found, "
        "not that the risk is right (its evidence is the verified quotes)."
    )
    passages: list[Passage] = Field(description="The best passage of each document, best first.")


class Risk(BaseModel):
    risk: str
    severity: Literal["low", "medium", "high", "critical"]
    rationale: str
    topic: str = Field(description="The row of the comparison table this risk words.")
    evidence: list[Evidence]
    supported: bool = Field(description="At least one piece of its evidence was found in the sources.")
    support: Support | None = Field(
        None, description="The documents' passages nearest the risk (vector memory); null when not looked up."
    )


class KeyPoint(BaseModel):
    topic: str
    point: str = Field(description="What the document says about the topic, in a few words.")
    quote: str = Field(description="The document's own sentence, word for word (checked against its text).")
    page: int = Field(description="The page the quote is on.")


class Insight(BaseModel):
    document: str
    label: str
    source: str
    summary: str = Field(description="The document's position on each topic it addresses.")
    key_points: list[KeyPoint]
    condensed: bool = Field(description="The document was too long for one call and was read in windows.")
    windows: int = Field(description="The windows the document was read in (map), merged per topic (reduce).")
    mismatched: int = Field(
        0, description="Extractions left out because the sentence quoted does not concern its topic."
    )


class Cell(BaseModel):
    document: str
    label: str
    value: str
    quote: str
    page: int


class TableRow(BaseModel):
    topic: str
    status: Literal["differ", "agree", "single", "absent"] = Field(
        description="differ: two or more documents state it differently; agree: they state it alike; single: only "
        "one document addresses it; absent: none does."
    )
    cells: list[Cell]


class ComparisonFinding(BaseModel):
    topic: str
    documents: list[str]
    labels: list[str]
    detail: str


class ComparisonResult(BaseModel):
    table: list[TableRow] = Field(description="Each topic, aligned across the documents, compared in code.")
    overlaps: list[ComparisonFinding]
    conflicts: list[ComparisonFinding]
    summary: str


class DocumentEntry(BaseModel):
    document: str
    label: str | None
    source: str
    status: str
    pages: int
    summarised: bool = Field(description="The document's topics were extracted.")


Component = Literal["ok", "partial", "failed", "skipped"]


class DocumentAnalysisResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request: str
    goal: str
    topics: list[str]
    documents: list[DocumentEntry]
    insights: list[Insight]
    comparison: ComparisonResult | None
    risks: list[Risk] | None
    components: dict[str, Component]


_RESULT = TypeAdapter(DocumentAnalysisResult)

# -- topics --------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class Topic:
    key: str
    name: str
    hint: str
    cue: str
    """A pattern a sentence about the topic matches (case-folded): an extraction quoting a sentence that does not
    is a small model's mismatch, and is left out rather than compared."""

    @classmethod
    def named(cls, name: str) -> Topic:
        stems = sorted({w[:5] for w in re.findall(r"[^\W\d_]{3,}", name.casefold())}) or [name.casefold()]
        return cls(key=_slug(name), name=name.strip(), hint=name.strip(), cue="|".join(map(re.escape, stems)))

    def concerns(self, sentence: str) -> bool:
        return re.search(self.cue, sentence.casefold()) is not None


CHECKLIST: tuple[Topic, ...] = (
    Topic(
        key="payment_terms",
        name="payment terms",
        hint="when invoices must be paid",
        cue=r"\bpa(y|ie|id)|invoice|\bdue\b|settle|remit|\bbill",
    ),
    Topic(key="liability", name="liability", hint="caps or limits on liability", cue=r"liab|indemn|damages"),
    Topic(
        key="termination",
        name="termination",
        hint="notice period and who may end the contract",
        cue=r"terminat|cancel|\bend (this|the)\b|notice period|days'? (written )?notice",
    ),
    Topic(
        key="data_location",
        name="data location",
        hint="where data is stored or processed",
        cue=r"\bdata\b|\bstored\b|hosted|processed|residen",
    ),
    Topic(
        key="governing_law",
        name="governing law",
        hint="which country's or state's law governs",
        cue=r"govern|\blaws?\b|jurisdiction|courts?\b",
    ),
    Topic(
        key="term",
        name="term and renewal",
        hint="how long the contract runs and whether it renews",
        cue=r"renew|\bruns?\b|expir|duration|initial (term|period)|\bterm of\b|\bperiod of\b",
    ),
    Topic(
        key="fees",
        name="fees and price changes",
        hint="prices, fees or increases",
        cue=r"\bfees?\b|\bprices?\b|pricing|increase|\bcosts?\b|\brate\b",
    ),
    Topic(
        key="exclusivity",
        name="exclusivity",
        hint="exclusive dealing obligations",
        cue=r"exclusiv|sole (supplier|provider|source)|only from",
    ),
)
"""What a document analysis looks at when the caller names no topics: the terms where commercial documents most
often disagree and where their risks sit. The plan adds the topics the request itself names."""

MAX_TOPICS = 10
_GENERIC = frozenset(
    w[:5]
    for w in "pdf pdfs document documents file files analysis analyse analyze risk risks insight insights compare "
    "comparison summary assessment review content contents contract contracts agreement agreements key "
    "points terms".split()
)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.casefold()).strip("_")[:40] or "topic"


def _topics(inp: DocumentAnalysisInput, focus: Sequence[str]) -> list[Topic]:
    """The caller's topics if given; else the checklist plus the request's own topics that it does not cover."""
    if inp.topics:
        named = [Topic.named(t) for t in inp.topics]
        return list({t.key: t for t in named}.values())[:MAX_TOPICS]
    topics = list(CHECKLIST)
    for name in focus:
        words = _words(name)
        if not {w[:5] for w in words} - _GENERIC:
            continue  # "PDF analysis", "risk assessment": the request's own words, not a topic to look for
        if any(words & (_words(t.name) | _words(t.hint)) for t in topics):
            continue  # the checklist covers it already
        topics.append(Topic.named(name))
    return list({t.key: t for t in topics}.values())[:MAX_TOPICS]


# -- prompts ---------------------------------------------------------------------------------------------------------

PLAN_SYSTEM = (
    "You plan a document analysis. The user attached {n} document(s) and wrote a request. Decide whether the "
    "request says clearly enough what to do with the documents. Answer in JSON: goal (the request in one "
    "sentence), confidence (0 to 1, how sure you are what the user wants), questions (what you must ask the user "
    "first; empty when the request is clear) and focus (the topics the request itself names, if any)."
)
EXTRACT_SYSTEM = (
    "You extract facts from one document. For each topic, copy the one sentence of the document that states it, "
    "exactly as written, as quote; then write what that sentence says about the topic, in a few of its own words, "
    'as value. If no sentence states a topic, give "" as quote and "" as value. Answer in JSON.'
)
WORD_SYSTEM = (
    "You are a contract reviewer. You are shown what several documents say on one topic. Write the risk this "
    "creates for the reader. Answer in JSON: risk (one short sentence naming the risk), severity (low, medium, "
    "high or critical) and rationale (one or two sentences: what each document says, by its label, and why it "
    "matters)."
)


@dataclass(kw_only=True, slots=True)
class _Doc:
    id: str
    label: str
    source: str
    pages: int
    space: str | None

    @property
    def name(self) -> str:
        return self.source.removeprefix("upload:").rsplit("/", 1)[-1]


@dataclass(kw_only=True, slots=True)
class _Run:
    ctx: WorkflowContext
    inp: DocumentAnalysisInput
    model: Model
    docs: list[_Doc] = field(default_factory=list)
    texts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Document id to its pages (``{"page", "text"}``), rebuilt from its chunks."""
    topics: list[Topic] = field(default_factory=list)

    def by_label(self, label: str) -> _Doc | None:
        return next((d for d in self.docs if d.label == label), None)


# -- the workflow ------------------------------------------------------------------------------------------------------


async def document_analysis(ctx: WorkflowContext, inp: DocumentAnalysisInput) -> dict[str, Any]:
    run = _Run(ctx=ctx, inp=inp, model=ctx.model(inp.model))
    refs = list(dict.fromkeys(inp.documents))
    intent = await _plan(run, refs)
    run.topics = _topics(inp, intent.focus)
    _record_graph(ctx, intent, refs, run.topics)
    await ctx.emit("plan", {"plan": ctx.metadata["plan"], "attempts": 1})
    await ctx.progress(0.05, "plan")

    entries = await _ingest(run, refs)
    await ctx.progress(0.35, "ingest")

    insights, flagged = await _extract(run)
    extracted = {i.document for i in insights}
    for entry in entries:
        entry.summarised = entry.document in extracted

    await ctx.emit("stage", {"stage": "compare", "documents": len(insights)})
    comparison = _compare(run, insights)
    await ctx.partial_result("comparison", comparison.model_dump())
    await ctx.progress(0.75, "compare")

    drafts, risk_state = await _word(run, comparison)
    await ctx.progress(0.9, "risks")
    support, corroboration = await _corroborate(run, drafts)
    await ctx.progress(0.95, "corroborate")

    await ctx.emit("stage", {"stage": "validate"})
    risks, validation_state = _validate_evidence(run, drafts, support)
    components: dict[str, Component] = {
        "ingest": "ok" if all(e.status == DocumentStatus.ingested.value for e in entries) else "partial",
        "extraction": "ok" if len(insights) == len(run.docs) else "partial",
        "comparison": "ok" if len(insights) > 1 else "skipped",
        "risks": risk_state,
        "corroboration": corroboration,
        "validation": "partial" if flagged or validation_state == "partial" else validation_state,
    }
    result = DocumentAnalysisResult(
        request=inp.request,
        goal=intent.goal,
        topics=[t.name for t in run.topics],
        documents=entries,
        insights=insights,
        comparison=comparison if len(insights) > 1 else None,
        risks=risks,
        components=components,
    )
    out = _checked(ctx, result)
    await ctx.progress(1.0, "validate")
    return out


async def _plan(run: _Run, refs: list[str]) -> Intent:
    ctx, inp = run.ctx, run.inp
    await ctx.emit("stage", {"stage": "plan"})
    messages = [
        Message(role="system", content=PLAN_SYSTEM.format(n=len(refs))),
        Message(role="user", content=f"Request: {inp.request}\nDocuments attached: {len(refs)}"),
    ]
    try:
        intent: Intent = await ctx.generate(
            "plan",
            run.model,
            messages,
            output_type=Intent,
            settings=ModelSettings(temperature=0.0, max_tokens=300),
            timeout=inp.step_timeout_s,
        )
    except StepFailed as exc:
        raise WorkflowError(
            f"could not plan the analysis: {exc.message}", type=exc.type, step=exc.step, recovery_suggested=True
        ) from None
    # The gate is the confidence: a planner sure of the request may still list questions (small models always
    # do); they are kept in the plan's metadata as open questions, not asked.
    if intent.confidence < inp.min_confidence:
        questions = [q for q in intent.questions if q.strip()] or [
            "What should the analysis of these documents look for? Say which insights, comparisons or risks you want."
        ]
        ctx.metadata["plan"] = {"goal": intent.goal, "confidence": intent.confidence, "questions": questions}
        raise ClarificationNeeded(
            f"the request needs clarification before any document is analysed (confidence "
            f"{intent.confidence:.2f}, threshold {inp.min_confidence:.2f})",
            questions=questions,
            confidence=intent.confidence,
        )
    return intent


def _record_graph(ctx: WorkflowContext, intent: Intent, refs: list[str], topics: list[Topic]) -> None:
    """The task graph this run executes: one ingest and one extraction node per document, then the joins."""
    nodes: list[dict[str, Any]] = []
    for i, ref in enumerate(refs, 1):
        nodes.append({"id": f"ingest-{i}", "kind": "ingest", "document": ref, "depends_on": []})
        nodes.append(
            {"id": f"extract-{i}", "kind": "model", "depends_on": [f"ingest-{i}"], "map_reduce": "when over the window"}
        )
    extractions = [f"extract-{i}" for i in range(1, len(refs) + 1)]
    nodes += [
        {"id": "compare", "kind": "code", "depends_on": extractions},
        {"id": "risks", "kind": "model", "depends_on": ["compare"], "one_call_per": "differing or single topic"},
        {"id": "corroborate", "kind": "tool", "depends_on": ["risks"], "tool": "search_memory", "one_call_per": "risk"},
        {"id": "aggregate", "kind": "join", "depends_on": [*extractions, "compare", "risks", "corroborate"]},
        {"id": "validate", "kind": "check", "depends_on": ["aggregate"]},
    ]
    ctx.metadata["plan"] = {
        "goal": intent.goal,
        "confidence": intent.confidence,
        "questions": [],
        "open_questions": intent.questions,
        "focus": intent.focus,
        "topics": [t.name for t in topics],
        "nodes": nodes,
        "output": "validate",
    }


async def _ingest(run: _Run, refs: list[str]) -> list[DocumentEntry]:
    ctx = run.ctx
    await ctx.emit("stage", {"stage": "ingest", "done": 0, "total": len(refs)})
    done = 0

    async def one(ref: str) -> dict[str, Any]:
        nonlocal done
        out = await ingest_one(ctx, ref)
        done += 1
        await ctx.emit("stage", {"stage": "ingest", "done": done, "total": len(refs)})
        await ctx.progress(0.05 + 0.3 * done / len(refs), f"ingest {done}/{len(refs)}")
        return out

    mapped = await ctx.map(one, refs, name="ingest", min_success=0)
    records = [r for r in mapped.results if isinstance(r, dict)]
    report_documents(ctx, records)
    entries: list[DocumentEntry] = []
    for ref, rec in zip(refs, mapped.results, strict=True):
        if rec is None:  # the step itself failed; its error is already in the envelope
            entries.append(
                DocumentEntry(document=ref, label=None, source=ref, status="failed", pages=0, summarised=False)
            )
            continue
        label = None
        if rec["status"] == DocumentStatus.ingested.value and rec["chunks"] > 0:
            label = f"D{len(run.docs) + 1}"
            run.docs.append(
                _Doc(id=rec["id"], label=label, source=rec["source"], pages=rec["pages"], space=rec["space"])
            )
        elif rec["status"] == DocumentStatus.ingested.value:
            ctx.error("document_empty", f"{rec['source']} ({rec['id']}) has no readable text", step="ingest")
        entries.append(
            DocumentEntry(
                document=rec["id"],
                label=label,
                source=rec["source"],
                status=rec["status"],
                pages=rec["pages"],
                summarised=False,
            )
        )
    await ctx.partial_result("documents", [e.model_dump() for e in entries])
    if not run.docs:
        raise WorkflowError(
            f"none of the {len(refs)} documents could be read; see errors[] for each one",
            type="min_success_not_met",
            step="ingest",
        )
    return entries


# -- extraction: per document, per topic, {quote, value} -------------------------------------------------------------


def _pages(chunks: Sequence[ChunkRecord]) -> list[dict[str, Any]]:
    """A document's page texts, rebuilt from its overlapping chunks by their character offsets."""
    pages: dict[int, str] = {}
    for c in sorted(chunks, key=lambda c: (c.page, c.start)):
        text = pages.get(c.page, "")
        if c.start >= len(text):
            text += (" " if text else "") + c.text
        elif c.end > len(text):
            text += c.text[len(text) - c.start :]
        pages[c.page] = text
    return [{"page": p, "text": t} for p, t in sorted(pages.items())]


async def _read(run: _Run, doc: _Doc) -> list[dict[str, Any]]:
    memory = memory_of(run.ctx)
    space = doc.space or memory.embedder.space.key

    async def read(document_id: str) -> list[dict[str, Any]]:
        return _pages(await memory.vectors.document_chunks(run.ctx.tenant, document_id, space, memory.clock()))

    pages: list[dict[str, Any]] = await run.ctx.step(f"read[{doc.label}]", read, doc.id)
    run.texts[doc.id] = pages
    return pages


_SPLIT = re.compile(r"(?<=[.!?;])\s+(?=\S)|\n\s*\n")
MAX_SENTENCE = 300


def sentences(pages: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """The pages cut into sentences (page, sentence), each once, in reading order: at sentence ends and blank lines,
    not at the line breaks a PDF wraps its text with. A sentence longer than MAX_SENTENCE characters is cut there:
    a prefix of a sentence is still a verbatim quote."""
    seen: set[str] = set()
    out: list[tuple[int, str]] = []
    for p in pages:
        for raw in _SPLIT.split(str(p["text"])):
            sentence = " ".join(raw.split())[:MAX_SENTENCE].strip()
            if len(sentence) >= 20 and sentence not in seen:
                seen.add(sentence)
                out.append((int(p["page"]), sentence))
    return out


def _extraction_schema(candidates: dict[str, list[str]]) -> dict[str, Any]:
    """One property per topic asked, each ``{quote, value}`` with the quote narrowed to that topic's candidate
    sentences (or empty), so a provider that enforces schemas (llama.cpp's grammar, OpenAI's strict mode) can only
    quote the document, and only a sentence that can be about the topic. The quote comes first: the value is then
    read off the sentence just copied."""

    def cell(quotes: list[str]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "quote": {"type": "string", "enum": ["", *quotes]},
                "value": {"type": "string", "maxLength": 80},
            },
            "required": ["quote", "value"],
            "additionalProperties": False,
        }

    return {
        "type": "object",
        "properties": {key: cell(quotes) for key, quotes in candidates.items()},
        "required": list(candidates),
        "additionalProperties": False,
    }


def candidates_of(topics: Sequence[Topic], window: Sequence[tuple[int, str]]) -> dict[str, list[str]]:
    """Per topic, the window's sentences that can be about it (its cue), in order; topics with none are left out
    and not asked. Measured on Qwen2.5-Coder-1.5B: asked every topic over every sentence, it filled topics the
    document does not address with other topics' sentences; narrowed like this, it only chooses among sentences
    that can be right, or none."""
    out: dict[str, list[str]] = {}
    for t in topics:
        found = [sentence for _, sentence in window if t.concerns(sentence)]
        if found:
            out[t.key] = found
    return out


def _extraction_prompt(doc: _Doc, topics: Sequence[Topic], window: Sequence[tuple[int, str]], part: str) -> str:
    lines: list[str] = [f"Document {doc.label} ({doc.name}){part}:"]
    page = None
    for p, sentence in window:
        if p != page:
            lines.append(f"[page {p}]")
            page = p
        lines.append(sentence)
    lines.append("\nTopics:")
    lines += [f"- {t.key}: {t.name} ({t.hint})" for t in topics]
    lines.append(f"\nFor each topic, the sentence of {doc.label} that states it, and its value.")
    return "\n".join(lines)


def _out_tokens(topics: Sequence[Topic]) -> int:
    return 40 + 110 * len(topics)


def _windows(run: _Run, doc: _Doc, all_sentences: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The document's sentences in windows that fit the model's context with room for the answer: one window
    when it fits whole, else as many as it takes (map), merged per topic afterwards (reduce). Never truncated."""
    model, topics = run.model, run.topics
    budget = model.context_window - _out_tokens(topics) - 64
    budget -= model.count_tokens(EXTRACT_SYSTEM + _extraction_prompt(doc, topics, [], " (part 10 of 10)"))
    windows: list[list[tuple[int, str]]] = [[]]
    used = 0
    for page, sentence in all_sentences:
        # The sentence is in the prompt once and in the schema's enum once (a grammar, not prompt tokens, for a
        # local model; prompt tokens for a provider that puts the schema in context): count it twice.
        cost = 2 * model.count_tokens(sentence) + 8
        if windows[-1] and used + cost > budget:
            windows.append([])
            used = 0
        windows[-1].append((page, sentence))
        used += cost
    return windows


async def _extract_one(run: _Run, doc: _Doc, flagged: list[str]) -> Insight:
    ctx, inp, model, topics = run.ctx, run.inp, run.model, run.topics
    pages = await _read(run, doc)
    all_sentences = sentences(pages)
    windows = _windows(run, doc, all_sentences)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + inp.summary_timeout_s
    found: dict[str, tuple[str, int, str]] = {}  # topic key -> (quote, page, value), first window wins
    mismatched = 0
    for n, window in enumerate(windows, 1):
        part = f" (part {n} of {len(windows)})" if len(windows) > 1 else ""
        step = f"extract[{doc.label}]" + (f"/{n}" if len(windows) > 1 else "")
        candidates = {k: v for k, v in candidates_of(topics, window).items() if k not in found}
        if not candidates:
            continue  # nothing left in this window that can be about a topic still open: no call
        asked = [t for t in topics if t.key in candidates]
        messages = [
            Message(role="system", content=EXTRACT_SYSTEM),
            Message(role="user", content=_extraction_prompt(doc, asked, window, part)),
        ]
        # The document's own timeout covers all its windows; each call gets what is left of it, as a durable
        # step that fails with type `timeout` when it runs out.
        out: _ExtractionOut = await ctx.generate(
            step,
            model,
            messages,
            output_type=_ExtractionOut,
            json_schema=_extraction_schema(candidates),
            settings=ModelSettings(temperature=0.0, max_tokens=_out_tokens(asked)),
            timeout=max(deadline - loop.time(), 0.001),
        )
        answer = out.root
        on_page = {s: p for p, s in window}
        for t in topics:
            cell = answer.get(t.key)
            if cell is None or t.key in found or not cell.quote.strip():
                continue
            quote = " ".join(cell.quote.split())
            page = on_page.get(quote) or find_quote(quote, pages)
            if page is None:
                flagged.append(doc.label)
                ctx.error(
                    "hallucination_suspected",
                    f"the quote {quote[:120]!r}, given for {t.name} in {doc.label} ({doc.name}), is not in the "
                    "document; it is left out of the analysis",
                    step=step,
                )
                continue
            if not t.concerns(quote) or quote in {q for q, _, _ in found.values()}:
                # A sentence about something else, or one already given for an earlier topic: a small model's
                # slip, not a finding.
                mismatched += 1
                continue
            found[t.key] = (quote, page, grounded_value(cell.value, quote))
    key_points = [
        KeyPoint(topic=t.name, point=found[t.key][2], quote=found[t.key][0], page=found[t.key][1])
        for t in topics
        if t.key in found
    ]
    summary = (
        "; ".join(f"{k.topic}: {k.point}" for k in key_points)
        if key_points
        else f"{doc.label} addresses none of the topics: {', '.join(t.name for t in topics)}."
    )
    return Insight(
        document=doc.id,
        label=doc.label,
        source=doc.source,
        summary=summary,
        key_points=key_points,
        condensed=len(windows) > 1,
        windows=len(windows),
        mismatched=mismatched,
    )


class _ExtractionOut(pydantic.RootModel[dict[str, Extracted]]):
    pass


async def _extract(run: _Run) -> tuple[list[Insight], list[str]]:
    ctx, inp = run.ctx, run.inp
    total = len(run.docs)
    need = inp.min_success if inp.min_success is not None else max(1, math.ceil(total / 2))
    need = min(need, total)
    done = 0
    flagged: list[str] = []
    await ctx.emit("stage", {"stage": "extract", "done": 0, "total": total, "topics": [t.name for t in run.topics]})

    async def one(doc: _Doc) -> Insight | None:
        nonlocal done
        try:
            insight = await _extract_one(run, doc, flagged)
        except StepFailed as exc:
            ctx.error(
                exc.type,
                f"reading {doc.label} ({doc.source}) failed: {exc.message}; the analysis goes on without it",
                step=exc.step,
                recovery_suggested=exc.recovery_suggested,
            )
            return None
        except TimeoutError:
            ctx.error(
                "timeout",
                f"reading {doc.label} ({doc.source}) timed out after {inp.summary_timeout_s:g} s; the analysis "
                "goes on without it",
                step=f"extract[{doc.label}]",
                recovery_suggested=True,
            )
            return None
        done += 1
        await ctx.partial_result(f"insight:{doc.label}", insight.model_dump())
        await ctx.emit("stage", {"stage": "extract", "done": done, "total": total, "document": doc.label})
        await ctx.progress(0.35 + 0.35 * done / total, f"read {done}/{total}")
        return insight

    outcomes = await ctx.concurrently(*(one(d) for d in run.docs))
    insights = [o for o in outcomes if isinstance(o, Insight)]
    if len(insights) < need:
        raise WorkflowError(
            f"{len(insights)} of {total} documents were read; at least {need} needed",
            type="min_success_not_met",
            step="extract",
            recovery_suggested=True,
        )
    return insights, flagged


# -- compare: the aligned table, worked out in code -----------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NUMBER_WORDS = {
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "fifteen": "15", "twenty": "20", "thirty": "30",
    "forty": "40", "forty-five": "45", "sixty": "60", "ninety": "90", "hundred": "100",
}  # fmt: skip
_STOP = frozenset(
    "the a an and or of to in on at by for with from as is are be shall will may must any all each this that "
    "these those its it their per within after before under than other otherwise only not no".split()
)


def _figure(raw: str) -> str:
    """A figure as written, read as a number: 50,000 and 50000 alike, 12.0 as 12; 30 stays 30."""
    digits = raw.replace(",", "").rstrip(".")
    try:
        return f"{float(digits):g}" if "." in digits else str(int(digits))
    except ValueError:
        return digits


def _numbers(text: str) -> set[str]:
    words = re.findall(r"[a-z]+(?:-[a-z]+)?", text.casefold())
    found = {_figure(n) for n in _NUMBER.findall(text)}
    return found | {_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.casefold()) if w not in _STOP and len(w) > 2}


def _stems(text: str) -> set[str]:
    return {w[:5] for w in _words(text)}


def grounded_value(value: str, quote: str) -> str:
    """The model's value when the quote bears it out (its figures and its words are the quote's), else the quote
    itself: a figure or a claim the sentence does not contain ("limited" for "unlimited") is never compared."""
    value = " ".join(value.split())
    stems = _stems(value)
    if not value or not _numbers(value) <= _numbers(quote) or not stems <= _stems(quote):
        return quote
    return value


_PARTIES = frozenset(
    w[:5]
    for w in "agreement contract customer client supplier vendor provider party parties company services "
    "service this hereunder herein".split()
)


def same_position(a: str, b: str, topic: Topic | None = None) -> bool:
    """Whether two statements on one topic agree: by their figures where either has any (30 days vs 60 days),
    else by what is left of their words once the topic's own words and the parties' names are set aside, the
    shorter mostly within the longer (the laws of England govern vs governed by the laws of England: agree;
    England vs Delaware: differ)."""
    na, nb = _numbers(a), _numbers(b)
    if na or nb:
        return na == nb

    def core(text: str) -> set[str]:
        kept = {w for w in _words(text) if topic is None or not topic.concerns(w)}
        return {w[:5] for w in kept} - _PARTIES

    wa, wb = core(a), core(b)
    if not wa or not wb:
        return wa == wb
    # The shorter statement's words mostly in the longer one: "the Province of Ontario" and "the courts of the
    # Province of Ontario, whose law applies" say the same.
    return len(wa & wb) / min(len(wa), len(wb)) >= 0.5


def _compare(run: _Run, insights: list[Insight]) -> ComparisonResult:
    """Every topic as a row with each document's cell; which documents agree or differ is decided here, in code,
    by the values' figures and words. The model later only words what this table shows."""
    table: list[TableRow] = []
    for topic in run.topics:
        cells = [
            Cell(document=i.document, label=i.label, value=k.point, quote=k.quote, page=k.page)
            for i in insights
            for k in i.key_points
            if k.topic == topic.name
        ]
        groups: list[list[Cell]] = []
        for c in cells:
            group = next((g for g in groups if same_position(g[0].value, c.value, topic)), None)
            if group is None:
                groups.append([c])
            else:
                group.append(c)
        status: Literal["differ", "agree", "single", "absent"]
        if not cells:
            status = "absent"
        elif len(cells) == 1:
            status = "single"
        else:
            status = "differ" if len(groups) > 1 else "agree"
        table.append(TableRow(topic=topic.name, status=status, cells=cells))
    names = {d.label: d.name for d in run.docs}

    def finding(row: TableRow) -> ComparisonFinding:
        detail = "; ".join(f"{c.label} ({names.get(c.label, c.label)}): {c.value}" for c in row.cells)
        return ComparisonFinding(
            topic=row.topic,
            documents=[c.document for c in row.cells],
            labels=[c.label for c in row.cells],
            detail=detail,
        )

    conflicts = [finding(r) for r in table if r.status == "differ"]
    overlaps = [finding(r) for r in table if r.status == "agree"]
    parts = []
    if conflicts:
        parts.append(f"The documents differ on {', '.join(c.topic for c in conflicts)}.")
    if overlaps:
        parts.append(f"They agree on {', '.join(o.topic for o in overlaps)}.")
    singles = [r for r in table if r.status == "single"]
    if singles:
        parts.append(
            "Addressed by one document only: " + ", ".join(f"{r.topic} ({r.cells[0].label})" for r in singles) + "."
        )
    absent = [r.topic for r in table if r.status == "absent"]
    if absent:
        parts.append(f"None addresses {', '.join(absent)}.")
    return ComparisonResult(table=table, overlaps=overlaps, conflicts=conflicts, summary=" ".join(parts))


# -- risks: the model words what the table shows --------------------------------------------------------------------


def _word_prompt(run: _Run, row: TableRow) -> str:
    names = {d.label: d.name for d in run.docs}
    lines = [f"Topic: {row.topic}"]
    for c in row.cells:
        lines.append(f'{c.label} ({names.get(c.label, c.label)}) says: "{c.quote}" (in short: {c.value})')
    others = [d.label for d in run.docs if d.label not in {c.label for c in row.cells}]
    if others:
        lines.append(f"{', '.join(others)} say nothing about {row.topic}.")
    lines.append(f"\nRequest: {run.inp.request}")
    if row.status == "differ":
        lines.append(f"The documents state {row.topic} differently. What risk does that create?")
    else:
        lines.append(f"What risk does this {row.topic} term create?")
    return "\n".join(lines)


_SEVERITY = {"critical": 0, "high": 1, "medium": 2, "low": 3}
_LABELISH = re.compile(r"^[\W\d_]*$")


def junk_reason(w: Wording, row: TableRow, seen: set[str], labels: Sequence[str]) -> str | None:
    """Why a worded risk is not worth showing, or None: a title that is a number or a bare label, a duplicate, or
    a rationale that cites nothing in the documents (no label, no figure, no word of what they say)."""
    title = " ".join(w.risk.split())
    words = re.findall(r"[^\W\d_]+", title)
    bare = {row.topic.casefold(), "risk", "risks", *_SEVERITY, *(x.casefold() for x in labels)}
    if _LABELISH.match(title) or len(words) < 3 or title.casefold().strip(" .:") in bare:
        return "a title that is a number or a bare label"
    key = " ".join(words).casefold()
    if key in seen:
        return "a duplicate"
    rationale = w.rationale.casefold()
    cites_label = any(re.search(rf"\b{re.escape(x.casefold())}\b", rationale) for x in labels)
    said = " ".join(f"{c.value} {c.quote}" for c in row.cells)
    cites_figure = bool(_numbers(said) & _numbers(w.rationale))
    cites_words = len(_words(said) & _words(w.rationale)) >= 2
    if not (cites_label or cites_figure or cites_words):
        return "a rationale that cites nothing in the documents"
    seen.add(key)
    return None


async def _word(run: _Run, comparison: ComparisonResult) -> tuple[list[RiskDraft] | None, Component]:
    """One small call per topic the documents differ on (then per topic only one addresses, while max_risks
    allows): the risk, a severity and a rationale. The evidence is the table's own verified quotes; worded risks
    that are junk are dropped, with a ``low_quality_output`` warning saying how many."""
    ctx, inp = run.ctx, run.inp
    rows = [r for r in comparison.table if r.status == "differ"]
    rows += [r for r in comparison.table if r.status == "single"]
    if len(rows) > inp.max_risks:
        ctx.warn(
            "risks_capped",
            f"{len(rows)} topics could carry a risk; the first {inp.max_risks} (differences first) are worded "
            "(max_risks)",
            step="risks",
        )
        rows = rows[: inp.max_risks]
    if not rows:
        return [], "ok"
    await ctx.emit("stage", {"stage": "risks", "done": 0, "total": len(rows)})
    done = 0

    async def one(row: TableRow) -> Wording | None:
        nonlocal done
        messages = [Message(role="system", content=WORD_SYSTEM), Message(role="user", content=_word_prompt(run, row))]
        try:
            wording: Wording = await ctx.generate(
                f"risk[{_slug(row.topic)}]",
                run.model,
                messages,
                output_type=Wording,
                settings=ModelSettings(temperature=0.0, max_tokens=260),
                timeout=inp.step_timeout_s,
            )
        except StepFailed as exc:
            _component_failed(ctx, f"wording of the {row.topic} risk", exc, inp.step_timeout_s, exc.step)
            return None
        done += 1
        await ctx.emit("stage", {"stage": "risks", "done": done, "total": len(rows), "topic": row.topic})
        return wording

    outcomes = await ctx.concurrently(*(one(r) for r in rows))
    worded = [(r, w) for r, w in zip(rows, outcomes, strict=True) if isinstance(w, Wording)]
    if not worded:
        return None, "failed"
    seen: set[str] = set()
    labels = [d.label for d in run.docs]
    drafts: list[RiskDraft] = []
    dropped: dict[str, int] = {}
    for row, w in worded:
        reason = junk_reason(w, row, seen, labels)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        evidence = [EvidenceDraft(document=c.label, page=c.page, quote=c.quote) for c in row.cells]
        drafts.append(
            RiskDraft(risk=w.risk, severity=w.severity, rationale=w.rationale, topic=row.topic, evidence=evidence)
        )
    if dropped:
        why = ", ".join(f"{n} for {reason}" for reason, n in dropped.items())
        ctx.warn(
            "low_quality_output",
            f"{sum(dropped.values())} of {len(worded)} risks the model worded were dropped as low quality ({why}); "
            "their topics remain in the comparison table",
            step="risks",
        )
    drafts.sort(key=lambda d: _SEVERITY[d.severity])  # stable: differences before single-document topics
    await ctx.partial_result("risks", [dataclasses.asdict(d) for d in drafts])
    return drafts, "ok" if len(worded) == len(rows) else "partial"


def _component_failed(ctx: WorkflowContext, what: str, exc: StepFailed, timeout: float, step: str | None) -> None:
    message = f"timed out after {timeout:g} s" if exc.type == "timeout" else f"failed: {exc.message}"
    ctx.error(
        exc.type,
        f"the {what} {message}; the rest of the analysis is returned without it",
        step=exc.step or step,
        recovery_suggested=exc.recovery_suggested,
    )


@dataclass(kw_only=True, slots=True)
class EvidenceDraft:
    document: str
    page: int
    quote: str


@dataclass(kw_only=True, slots=True)
class RiskDraft:
    risk: str
    severity: Literal["low", "medium", "high", "critical"]
    rationale: str
    topic: str
    evidence: list[EvidenceDraft]


# -- corroborate ---------------------------------------------------------------------------------------------------

PASSAGE_CHARS = 300


async def _corroborate(run: _Run, drafts: list[RiskDraft] | None) -> tuple[list[Support | None], Component]:
    """Each risk, looked up in the documents' passages through the ``search_memory`` tool (a durable read step per
    risk, in the task's tool trace), then narrowed to the sentence of each document nearest the risk: a chunk's
    score says little when a short document is one chunk, a sentence's says where the document speaks to it. The
    sentence scores and their confidence go into the retrieval trace. A refused or failed lookup leaves that risk
    without ``support``, never the analysis without its risks."""
    ctx = run.ctx
    if not drafts:
        return [], "skipped"
    await ctx.emit("stage", {"stage": "corroborate", "done": 0, "total": len(drafts)})
    ids = [d.id for d in run.docs]
    top_k = min(50, 3 * len(ids))  # enough for a few passages of each document, most of the time
    traces: dict[int, dict[str, Any]] = {}

    async def one(i: int, draft: RiskDraft) -> Support | None:
        query = f"{draft.topic}: {draft.risk}"
        try:
            found: dict[str, Any] = await ctx.tool(
                "search_memory", {"query": query, "top_k": top_k, "documents": ids}, name=f"corroborate[{i + 1}]"
            )
        except StepFailed as exc:
            _looked_up_nothing(ctx, exc)
            return None
        ranked: dict[str, Any] = await ctx.step(f"nearest[{i + 1}]", _nearest_sentences(run), query, found["results"])
        support = Support.model_validate(ranked)
        trace = {
            "query": query,
            "space": found["space"],
            "confidence": support.confidence,
            "level": support.level,
            "step": f"corroborate[{i + 1}]",
            "hits": [p.model_dump(exclude={"label"}) for p in support.passages],
        }
        traces[i] = trace
        await ctx.emit("retrieval", trace)
        return support

    outcomes = await ctx.concurrently(*(one(i, d) for i, d in enumerate(drafts)))
    if traces:
        ctx.metadata.setdefault("retrieval", []).extend(traces[i] for i in sorted(traces))  # in the risks' order
    support = [s if isinstance(s, Support) else None for s in outcomes]
    await ctx.emit("stage", {"stage": "corroborate", "done": len(drafts), "total": len(drafts)})
    found = sum(s is not None for s in support)
    return support, "ok" if found == len(drafts) else "partial" if found else "skipped"


def _nearest_sentences(run: _Run) -> Callable[[str, list[dict[str, Any]]], Awaitable[dict[str, Any]]]:
    """A step body: the sentences of the passages found, embedded beside the query in the memory's own space; the
    best of each document, best first, judged by the memory's confidence policy."""
    memory = memory_of(run.ctx)
    labels = {d.id: d.label for d in run.docs}

    async def nearest(query: str, hits: list[dict[str, Any]]) -> dict[str, Any]:
        candidates = list(
            dict.fromkeys(
                (hit["document"], page, text)
                for hit in hits
                if hit["document"] in labels
                for page, text in sentences([{"page": hit["page"], "text": hit["text"]}])
            )
        )
        if not candidates:
            return Support(confidence=0.0, level="none", passages=[]).model_dump()
        vectors = await memory.embedder.embed([query, *(text for _, _, text in candidates)])
        scores = vectors[1:] @ vectors[0]
        best: dict[str, Passage] = {}
        for (doc, page, text), score in sorted(zip(candidates, scores.tolist(), strict=True), key=lambda c: -c[1]):
            if doc not in best:
                best[doc] = Passage(
                    document=doc, label=labels[doc], page=page, score=round(score, 4), text=text[:PASSAGE_CHARS]
                )
        confidence, level = memory.confidence.judge([p.score for p in best.values()])
        return Support(confidence=confidence, level=level, passages=list(best.values())).model_dump()

    return nearest


def _looked_up_nothing(ctx: WorkflowContext, exc: StepFailed) -> None:
    """One warning per task, however many risks: the reason is the same for all of them."""
    if not any(e.type == "corroboration_skipped" for e in ctx.errors):
        ctx.warn(
            "corroboration_skipped",
            f"the risks were not looked up in the documents' passages ({exc.type}: {exc.message}); "
            "they come back without `support`",
            step=exc.step,
        )


# -- validate ------------------------------------------------------------------------------------------------------

_PUNCT = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
        "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00a0": " ", "\u00ad": "",
    }
)  # fmt: skip
_ELLIPSIS = re.compile(r"\s*(?:\.\.\.|\u2026|\[\.\.\.\])\s*")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT).casefold()
    text = re.sub(r"-\s*\n\s*", "", text)  # a word hyphenated across a line break
    return re.sub(r"\s+", " ", text).strip()


def find_quote(quote: str, pages: Sequence[dict[str, Any]]) -> int | None:
    """The page on which ``quote`` appears, compared without case, spacing, hyphenation or typographic quotes.
    A quote with an ellipsis must have every part on one page, in order. ``None``: not found (or too short
    to mean anything)."""
    parts = [p for p in (_normalise(x) for x in _ELLIPSIS.split(quote.strip().strip("\"'\u201c\u201d"))) if p]
    if not parts or sum(len(p) for p in parts) < 8:
        return None
    for page in pages:
        text = _normalise(str(page["text"]))
        at = 0
        for part in parts:
            at = text.find(part, at)
            if at < 0:
                break
            at += len(part)
        else:
            return int(page["page"])
    return None


def _validate_evidence(
    run: _Run, drafts: list[RiskDraft] | None, support: Sequence[Support | None]
) -> tuple[list[Risk] | None, Component]:
    """Every quote given as evidence is looked up once more in its document's text before delivery: the
    extraction already checked it, so a miss here means the pages changed under the analysis."""
    ctx = run.ctx
    if drafts is None:
        return None, "skipped"
    flagged = 0
    risks: list[Risk] = []
    for i, (draft, found) in enumerate(zip(drafts, support, strict=True)):
        evidence: list[Evidence] = []
        for j, ev in enumerate(draft.evidence):
            doc = run.by_label(ev.document)
            page = find_quote(ev.quote, run.texts.get(doc.id, [])) if doc is not None else None
            if page is None:
                flagged += 1
                ctx.error(
                    "hallucination_suspected",
                    f"the quote {ev.quote[:120]!r}, given as evidence for the risk {draft.risk[:120]!r}, is not in "
                    f"{'any analysed document' if doc is None else doc.label + ' (' + doc.source + ')'}",
                    step="validate",
                    pointer=f"/risks/{i}/evidence/{j}",
                )
            evidence.append(
                Evidence(
                    document=doc.id if doc else "",
                    label=ev.document,
                    source=doc.source if doc else "",
                    page=page if page is not None else ev.page,
                    quote=ev.quote,
                    verified=page is not None,
                    found_on_page=page,
                )
            )
        risks.append(
            Risk(
                risk=draft.risk,
                severity=draft.severity,
                rationale=draft.rationale,
                topic=draft.topic,
                evidence=evidence,
                supported=any(e.verified for e in evidence),
                support=found,
            )
        )
    return risks, "partial" if flagged else "ok"


def _checked(ctx: WorkflowContext, result: DocumentAnalysisResult) -> dict[str, Any]:
    """The pre-delivery schema check: what goes out is what the schema promises, or the envelope says where not."""
    dumped = result.model_dump(mode="json")
    try:
        _RESULT.validate_json(json.dumps(dumped))
    except pydantic.ValidationError as exc:
        for err in exc.errors()[:10]:
            pointer = "/" + "/".join(str(p) for p in err["loc"])
            ctx.error("schema_violation", f"{pointer}: {err['msg']}", step="validate", pointer=pointer)
    return dumped


# -- admission -------------------------------------------------------------------------------------------------------


async def admit(app: Admission, tenant: str, inp: DocumentAnalysisInput) -> None:
    """At submission, before any model call: every document id must be the tenant's, and every URL must pass the
    SSRF rules and answer a probe (all at once, a few seconds at most). A refused connection, a host that does not
    resolve or an HTTP 4xx is refused here; a timeout or a 5xx is not (ingestion retries it). A 422 names each bad
    entry by its JSON pointer."""
    settings = app.settings
    limits = FetchLimits(timeout_s=settings.fetch_timeout_s, allow=AllowList.parse(settings.fetch_allow_hosts))
    problems = await unknown_documents(app, tenant, inp.documents)
    urls = {i: ref for i, ref in enumerate(inp.documents) if not ref.startswith("doc_")}
    probes = await asyncio.gather(*(probe_document(url, limits) for url in urls.values()))
    problems |= {i: p.reason for i, p in zip(urls, probes, strict=True) if p.verdict == "unreachable"}
    if problems:
        errors = [{"pointer": f"/input/documents/{i}", "message": problems[i]} for i in sorted(problems)]
        raise InputError(
            f"{len(problems)} of {len(inp.documents)} documents cannot be analysed", detail={"errors": errors}
        )


DOCUMENT_ANALYSIS: Workflow[DocumentAnalysisInput] = Workflow(
    name="document_analysis",
    input_model=DocumentAnalysisInput,
    fn=document_analysis,
    estimate=lambda inp: 20.0 + 15.0 * len(inp.documents),
    description="Analyse documents, compare their insights and report the risks, each citing document, page and "
    "quote; every quote is checked against the source text.",
    admit=admit,
)
