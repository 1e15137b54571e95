"""The flagship workflow: "Analyse these N PDFs, compare insights, and tell me the risks".

Its task graph follows seed 000's lifecycle, and every broken path ends the way the seed's failure table says:

* **plan**: the model restates the request with a confidence and the topics to look for. A confidence under
  ``min_confidence`` ends the task as ``needs_clarification``, with the planner's questions, before a document is
  read or a summary paid for. The graph (ingest, summarise, compare, risks, aggregate, validate) is then fixed,
  recorded in ``metadata.plan`` and announced as a ``plan`` event.
* **ingest**: each document is its own durable step. An encrypted one is skipped with a warning; a corrupt,
  unreachable or hostile one becomes an envelope error. The others go on.
* **summarise**: every document at once, each with its own timeout. A document too long for one call is
  map-reduced, never truncated. At least ``min_success`` summaries must succeed; each one is kept as a partial
  result as soon as it exists, so a cancel or a breaker keeps it.
* **compare**: overlaps and conflicts across the summaries, map-reduced when they overflow the context window.
* **risks**: per document, in parallel, from the passages retrieved for the request and the conflicts the document
  is part of: structured risks citing ``{document, page, quote}``, the quote narrowed by the schema to the
  passages' own sentences where the provider enforces schemas. Merged by severity.
* **aggregate**: insights, comparison and risks in one result. A component that failed is ``null``, named in
  ``components`` and explained in ``errors[]``; what succeeded is returned.
* **validate**: the result is checked against its schema, and every quote is looked up in the source chunks. A
  quote that is not there is flagged ``hallucination_suspected`` with the claim it was meant to support.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from keel.errors import BlockedAddress, ClarificationNeeded, InputError, StepFailed, WorkflowError
from keel.memory.types import ChunkRecord, DocumentStatus
from keel.netguard import AllowList, resolve_target
from keel.orchestration.context import WorkflowContext
from keel.orchestration.memory_workflows import ingest_one, memory_of, report_documents, retrieve
from keel.orchestration.models import Message, Model, ModelSettings
from keel.orchestration.workflow import Workflow

if TYPE_CHECKING:
    from collections.abc import Sequence

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

    request: str = Field(min_length=1, max_length=4000, description="What the caller wants, in their words.")
    documents: list[DocumentRef] = Field(min_length=1, max_length=20)
    model: str | None = Field(None, max_length=500, description="A model spec; KEEL_DEFAULT_MODEL when omitted.")
    min_success: int | None = Field(
        None, ge=1, le=20, description="Fewest document summaries that must succeed (default: half, rounded up)."
    )
    summary_timeout_s: float = Field(180.0, gt=0, le=3600, description="Time limit of each document's summary.")
    step_timeout_s: float = Field(300.0, gt=0, le=3600, description="Time limit of the comparison and the risks.")
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="Below this planning confidence the task asks for clarification instead."
    )
    max_risks: int = Field(8, ge=1, le=10)


# -- what the model is asked for (bounded, so a small model's grammar ends every list and string) ----------------

Short = Annotated[str, Field(max_length=300)]


class Intent(BaseModel):
    goal: str = Field(max_length=300, description="The request restated in one sentence.")
    confidence: float = Field(ge=0, le=1, description="How sure you are what the user wants, 0 to 1.")
    questions: list[Short] = Field(
        default_factory=list, max_length=3, description="What you must ask first; empty when clear."
    )
    focus: list[Annotated[str, Field(max_length=80)]] = Field(
        max_length=5, description="Topics to look for in the documents."
    )


class KeyPoint(BaseModel):
    point: str = Field(max_length=300)
    page: int = Field(ge=0, le=100_000, description="The page it comes from; 0 when unknown.")


class DocumentSummary(BaseModel):
    summary: str = Field(max_length=1200)
    key_points: list[KeyPoint] = Field(max_length=6)


class Finding(BaseModel):
    topic: str = Field(max_length=120)
    documents: list[Annotated[str, Field(max_length=40)]] = Field(max_length=10)
    detail: str = Field(max_length=500)


class Comparison(BaseModel):
    overlaps: list[Finding] = Field(max_length=6)
    conflicts: list[Finding] = Field(max_length=6)
    summary: str = Field(max_length=800)


class EvidenceDraft(BaseModel):
    document: str = Field(max_length=40, description="The document's label, e.g. D1.")
    page: int = Field(ge=0, le=100_000)
    quote: str = Field(max_length=300, description="Copied word for word from a passage.")


class RiskDraft(BaseModel):
    risk: str = Field(max_length=200)
    severity: Literal["low", "medium", "high", "critical"]
    rationale: str = Field(max_length=600)
    evidence: list[EvidenceDraft] = Field(min_length=1, max_length=2)


class RiskReport(BaseModel):
    risks: list[RiskDraft] = Field(max_length=5)


# -- what the caller gets (checked before delivery) ----------------------------------------------------------------


class Evidence(BaseModel):
    document: str = Field(description="The document id.")
    label: str
    source: str
    page: int
    quote: str
    verified: bool = Field(description="The quote was found in the document's text (see `found_on_page`).")
    found_on_page: int | None = None


class Risk(BaseModel):
    risk: str
    severity: Literal["low", "medium", "high", "critical"]
    rationale: str
    evidence: list[Evidence]
    supported: bool = Field(description="At least one piece of its evidence was found in the sources.")


class Insight(BaseModel):
    document: str
    label: str
    source: str
    summary: str
    key_points: list[KeyPoint]
    condensed: bool = Field(description="The document was too long for one call and was map-reduced first.")


class ComparisonFinding(BaseModel):
    topic: str
    documents: list[str]
    labels: list[str]
    detail: str


class ComparisonResult(BaseModel):
    overlaps: list[ComparisonFinding]
    conflicts: list[ComparisonFinding]
    summary: str


class DocumentEntry(BaseModel):
    document: str
    label: str | None
    source: str
    status: str
    pages: int
    summarised: bool


Component = Literal["ok", "partial", "failed", "skipped"]


class DocumentAnalysisResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request: str
    goal: str
    documents: list[DocumentEntry]
    insights: list[Insight]
    comparison: ComparisonResult | None
    risks: list[Risk] | None
    components: dict[str, Component]
    retrieval: dict[str, Any] = Field(description="The weakest retrieval confidence behind the risks, by level.")


_RESULT = TypeAdapter(DocumentAnalysisResult)

# -- prompts ---------------------------------------------------------------------------------------------------------

PLAN_SYSTEM = (
    "You plan a document analysis. The user attached {n} document(s) and wrote a request. Decide whether the "
    "request says clearly enough what to do with the documents. Answer in JSON: goal (the request in one "
    "sentence), confidence (0 to 1, how sure you are what the user wants), questions (what you must ask the user "
    "first; empty when the request is clear) and focus (up to 5 topics to look for, such as payment terms)."
)
SUMMARY_SYSTEM = (
    "You summarise a document. Use only its text. Answer in JSON: summary (at most 120 words) and key_points "
    "(up to 6 facts that matter: obligations, figures, deadlines, each with its page number)."
)
COMPARE_SYSTEM = (
    "You compare documents for a document analysis, from their summaries. Find overlaps (where documents cover "
    "the same topic alike) and conflicts (where they set different terms for the same thing). Name documents by "
    "their labels (D1, D2, ...). Answer in JSON: overlaps, conflicts (each a list of topic, documents, detail) "
    "and summary (at most 100 words)."
)
COMPARE_REDUCE = (
    "Compare these document summaries for the request: {request}. Keep every overlap and every conflict (different "
    "terms, figures or obligations for the same thing), naming documents by their labels (D1, D2, ...)."
)
RISKS_SYSTEM = (
    "You find the risks in a document for a document analysis. Use only the sentences given. Give each risk a "
    "short name, a severity (low, medium, high or critical), a rationale, and evidence: the document label, the "
    "page and the sentence it comes from, copied word for word. Answer in JSON."
)
SUMMARY_REDUCE = (
    "Summarise document {label} ({source}) for the request: {request}. Keep facts, figures, obligations and "
    "deadlines, with their page numbers."
)


@dataclass(kw_only=True, slots=True)
class _Doc:
    id: str
    label: str
    source: str
    pages: int
    space: str | None


@dataclass(kw_only=True, slots=True)
class _Run:
    ctx: WorkflowContext
    inp: DocumentAnalysisInput
    model: Model
    docs: list[_Doc] = field(default_factory=list)
    texts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Document id to its pages (``{"page", "text"}``), rebuilt from its chunks."""
    focus: list[str] = field(default_factory=list)

    def by_label(self, label: str) -> _Doc | None:
        wanted = re.sub(r"[^a-z0-9]", "", label.casefold())
        for d in self.docs:
            names = (d.label, d.id, d.source, d.source.rsplit("/", 1)[-1], d.source.removeprefix("upload:"))
            if any(re.sub(r"[^a-z0-9]", "", n.casefold()) == wanted for n in names):
                return d
        return None


# -- the workflow ------------------------------------------------------------------------------------------------------


async def document_analysis(ctx: WorkflowContext, inp: DocumentAnalysisInput) -> dict[str, Any]:
    run = _Run(ctx=ctx, inp=inp, model=ctx.model(inp.model))
    refs = list(dict.fromkeys(inp.documents))
    intent = await _plan(run, refs)
    run.focus = [f.strip() for f in intent.focus if f.strip()]
    _record_graph(ctx, intent, refs)
    await ctx.emit("plan", {"plan": ctx.metadata["plan"], "attempts": 1})
    await ctx.progress(0.05, "plan")

    entries = await _ingest(run, refs)
    await ctx.progress(0.35, "ingest")

    insights = await _summarise(run)
    summarised = {i.document for i in insights}
    for entry in entries:
        entry.summarised = entry.document in summarised

    comparison, compare_state = await _compare(run, insights)
    await ctx.progress(0.8, "compare")
    risks, retrieval, risk_state = await _risks(run, comparison)
    await ctx.progress(0.95, "risks")

    await ctx.emit("stage", {"stage": "validate"})
    validated, validation_state = _validate_evidence(run, risks)
    components: dict[str, Component] = {
        "ingest": "ok" if all(e.status == DocumentStatus.ingested.value for e in entries) else "partial",
        "summaries": "ok" if len(insights) == len(run.docs) else "partial",
        "comparison": compare_state,
        "risks": risk_state,
        "validation": validation_state,
    }
    result = DocumentAnalysisResult(
        request=inp.request,
        goal=intent.goal,
        documents=entries,
        insights=insights,
        comparison=comparison,
        risks=validated,
        components=components,
        retrieval=retrieval,
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
            settings=ModelSettings(temperature=0.0, max_tokens=400),
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


def _record_graph(ctx: WorkflowContext, intent: Intent, refs: list[str]) -> None:
    """The task graph this run executes: one ingest and one summary node per document, then the joins."""
    nodes: list[dict[str, Any]] = []
    for i, ref in enumerate(refs, 1):
        nodes.append({"id": f"ingest-{i}", "kind": "ingest", "document": ref, "depends_on": []})
        nodes.append({"id": f"summarise-{i}", "kind": "model", "depends_on": [f"ingest-{i}"]})
    summaries = [f"summarise-{i}" for i in range(1, len(refs) + 1)]
    nodes += [
        {"id": "compare", "kind": "model", "depends_on": summaries, "map_reduce": "when over the context window"},
        {"id": "retrieve", "kind": "retrieval", "depends_on": [f"ingest-{i}" for i in range(1, len(refs) + 1)]},
        {"id": "risks", "kind": "model", "depends_on": ["compare", "retrieve"]},
        {"id": "aggregate", "kind": "join", "depends_on": [*summaries, "compare", "risks"]},
        {"id": "validate", "kind": "check", "depends_on": ["aggregate"]},
    ]
    ctx.metadata["plan"] = {
        "goal": intent.goal,
        "confidence": intent.confidence,
        "questions": [],
        "open_questions": intent.questions,
        "focus": intent.focus,
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


# -- summaries -----------------------------------------------------------------------------------------------------


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
        return _pages(await memory.store.document_chunks(run.ctx.tenant, document_id, space, memory.clock()))

    pages: list[dict[str, Any]] = await run.ctx.step(f"read[{doc.label}]", read, doc.id)
    run.texts[doc.id] = pages
    return pages


def _document_text(pages: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"[page {p['page']}]\n{p['text']}" for p in pages)


def _fits(model: Model, messages: Sequence[Message], out_tokens: int) -> bool:
    return sum(model.count_tokens(m.content) for m in messages) + out_tokens + 64 <= model.context_window


async def _summarise_one(run: _Run, doc: _Doc) -> Insight:
    ctx, inp, model = run.ctx, run.inp, run.model
    pages = await _read(run, doc)
    focus = f" Look especially for: {', '.join(run.focus)}." if run.focus else ""
    # The document first and the instruction last: small models follow what they read last.
    head = f"Document {doc.label} ({doc.source}), {doc.pages} page(s):\n"
    tail = f"\n\nRequest: {inp.request}\nSummarise document {doc.label} for this request.{focus}"
    settings = ModelSettings(temperature=0.0, max_tokens=600)
    messages = [
        Message(role="system", content=SUMMARY_SYSTEM),
        Message(role="user", content=head + _document_text(pages) + tail),
    ]
    condensed = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + inp.summary_timeout_s
    if not _fits(model, messages, 600):
        # Too long for one call: condense page by page (map-reduce), never truncate.
        instruction = SUMMARY_REDUCE.format(label=doc.label, source=doc.source, request=inp.request)
        page_texts = [f"[page {p['page']}]\n{p['text']}" for p in pages]
        async with asyncio.timeout_at(deadline):
            reduction = await ctx.reduce_to_fit(page_texts, model, instruction, name=f"summarise[{doc.label}]/reduce")
        messages[1] = Message(role="user", content=head + reduction.text + tail)
        condensed = True
    # The document's own timeout covers the whole summary; the final call gets what is left of it, as a durable
    # step that fails with type `timeout` when it runs out.
    summary: DocumentSummary = await ctx.generate(
        f"summarise[{doc.label}]",
        model,
        messages,
        output_type=DocumentSummary,
        settings=settings,
        timeout=max(deadline - loop.time(), 0.001),
    )
    return Insight(
        document=doc.id,
        label=doc.label,
        source=doc.source,
        summary=summary.summary,
        key_points=summary.key_points,
        condensed=condensed,
    )


async def _summarise(run: _Run) -> list[Insight]:
    ctx, inp = run.ctx, run.inp
    total = len(run.docs)
    need = inp.min_success if inp.min_success is not None else max(1, math.ceil(total / 2))
    need = min(need, total)
    done = 0
    await ctx.emit("stage", {"stage": "summarise", "done": 0, "total": total})

    async def one(doc: _Doc) -> Insight | None:
        nonlocal done
        try:
            insight = await _summarise_one(run, doc)
        except StepFailed as exc:
            ctx.error(
                exc.type,
                f"the summary of {doc.label} ({doc.source}) failed: {exc.message}; the analysis goes on without it",
                step=exc.step,
                recovery_suggested=exc.recovery_suggested,
            )
            return None
        except TimeoutError:
            ctx.error(
                "timeout",
                f"the summary of {doc.label} ({doc.source}) timed out after {inp.summary_timeout_s:g} s; the "
                "analysis goes on without it",
                step=f"summarise[{doc.label}]",
                recovery_suggested=True,
            )
            return None
        done += 1
        await ctx.partial_result(f"insight:{doc.label}", insight.model_dump())
        await ctx.emit("stage", {"stage": "summarise", "done": done, "total": total, "document": doc.label})
        await ctx.progress(0.35 + 0.35 * done / total, f"summarised {done}/{total}")
        return insight

    outcomes = await ctx.concurrently(*(one(d) for d in run.docs))
    insights = [o for o in outcomes if isinstance(o, Insight)]
    if len(insights) < need:
        raise WorkflowError(
            f"{len(insights)} of {total} document summaries succeeded; at least {need} needed",
            type="min_success_not_met",
            step="summarise",
            recovery_suggested=True,
        )
    return insights


# -- compare -------------------------------------------------------------------------------------------------------


def _insight_text(i: Insight) -> str:
    points = "\n".join(f"- {p.point}" + (f" (p. {p.page})" if p.page else "") for p in i.key_points)
    return f"[{i.label}] {i.source}\n{i.summary}" + (f"\nKey points:\n{points}" if points else "")


def _finding(run: _Run, f: Finding) -> ComparisonFinding:
    docs = [d for d in (run.by_label(x) for x in f.documents) if d is not None]
    return ComparisonFinding(
        topic=f.topic, documents=[d.id for d in docs], labels=[d.label for d in docs], detail=f.detail
    )


async def _compare(run: _Run, insights: list[Insight]) -> tuple[ComparisonResult | None, Component]:
    ctx, inp, model = run.ctx, run.inp, run.model
    if len(insights) < 2:
        ctx.warn(
            "comparison_skipped", "only one document was summarised, so there is nothing to compare", step="compare"
        )
        return None, "skipped"
    await ctx.emit("stage", {"stage": "compare", "documents": len(insights)})
    texts = [_insight_text(i) for i in insights]
    settings = ModelSettings(temperature=0.0, max_tokens=700)
    head = f"Request: {inp.request}\n\nSummaries:\n\n"
    messages = [Message(role="system", content=COMPARE_SYSTEM), Message(role="user", content=head + "\n\n".join(texts))]
    try:
        async with asyncio.timeout(inp.step_timeout_s):
            if not _fits(model, messages, 700):
                # The combined summaries overflow the window: compare pairs, then synthesise (map-reduce).
                reduction = await ctx.reduce_to_fit(
                    texts, model, COMPARE_REDUCE.format(request=inp.request), name="compare/reduce"
                )
                messages[1] = Message(
                    role="user", content=f"Request: {inp.request}\n\nComparison notes:\n\n{reduction.text}"
                )
            found: Comparison = await ctx.generate(
                "compare", model, messages, output_type=Comparison, settings=settings, timeout=inp.step_timeout_s
            )
    except (StepFailed, TimeoutError) as exc:
        _component_failed(ctx, "comparison", exc, inp.step_timeout_s, "compare")
        return None, "failed"
    result = ComparisonResult(
        overlaps=[_finding(run, f) for f in found.overlaps],
        conflicts=[_finding(run, f) for f in found.conflicts],
        summary=found.summary,
    )
    await ctx.partial_result("comparison", result.model_dump())
    return result, "ok"


def _component_failed(ctx: WorkflowContext, what: str, exc: BaseException, timeout: float, step: str | None) -> None:
    if isinstance(exc, StepFailed):
        ctx.error(
            exc.type,
            f"the {what} failed: {exc.message}; the rest of the analysis is returned without it",
            step=exc.step or step,
            recovery_suggested=exc.recovery_suggested,
        )
    else:
        ctx.error(
            "timeout",
            f"the {what} timed out after {timeout:g} s; the rest of the analysis is returned without it",
            step=step,
            recovery_suggested=True,
        )


# -- risks -------------------------------------------------------------------------------------------------------


RISK_LENSES = "obligations, payment terms, liability, termination, penalties, exclusivity, deadlines, data"


async def _passages(run: _Run) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Each document's passages closest to the request, its focus and the usual places risks hide, as durable
    retrievals whose scores and confidence go into the envelope."""
    ctx, inp = run.ctx, run.inp
    query = f"{inp.request} ({', '.join(run.focus) or RISK_LENSES})"
    found = await ctx.concurrently(
        *(retrieve(ctx, query, k=4, documents=[d.id], name=f"retrieve[{d.label}]") for d in run.docs)
    )
    passages: dict[str, list[dict[str, Any]]] = {}
    levels: dict[str, Any] = {}
    for doc, res in zip(run.docs, found, strict=True):
        if isinstance(res, StepFailed):
            ctx.error(res.type, f"retrieval from {doc.label} failed: {res.message}", step=res.step)
            continue
        levels[doc.label] = {"confidence": res["confidence"], "level": res["level"]}
        hits = sorted(res["hits"], key=lambda h: (h["page"], h["start"]))
        passages[doc.label] = [{"page": h["page"], "text": h["text"], "score": h["score"]} for h in hits]
    order = ["none", "low", "medium", "high"]
    weakest = min(levels.values(), key=lambda v: order.index(v["level"]) if v["level"] in order else 0, default=None)
    return passages, {"per_document": levels, "weakest": weakest}


_SENTENCES = re.compile(r"[^\n.!?;]+(?:[.!?;]+|$)", re.MULTILINE)


def _sentences(passages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """The passages cut into sentences (page, sentence), each once, in reading order."""
    seen: set[str] = set()
    out: list[tuple[int, str]] = []
    for p in passages:
        for m in _SENTENCES.finditer(str(p["text"])):
            sentence = " ".join(m.group(0).split())
            if len(sentence) >= 20 and sentence not in seen:
                seen.add(sentence)
                out.append((int(p["page"]), sentence))
    return out


def _risk_schema(label: str, sentences: list[tuple[int, str]]) -> dict[str, Any]:
    """RiskReport's schema, with the evidence narrowed to this document's label and to its sentences, so a
    provider that enforces schemas (llama.cpp's grammar, OpenAI's strict mode) can only quote what is there.
    A long candidate list falls back to free text; the quote check after the answer applies either way."""
    schema = RiskReport.model_json_schema()
    evidence = schema["$defs"]["EvidenceDraft"]["properties"]
    evidence["document"] = {**evidence["document"], "enum": [label]}
    quotes = [s for _, s in sentences]
    if 0 < len(quotes) <= 100 and sum(len(q) for q in quotes) <= 12_000:
        evidence["quote"] = {"type": "string", "enum": quotes, "description": evidence["quote"]["description"]}
    return schema


async def _risks_of(
    run: _Run, doc: _Doc, passages: list[dict[str, Any]], comparison: ComparisonResult | None
) -> list[RiskDraft]:
    """One document's risks, from its passages and the conflicts it is part of."""
    inp = run.inp
    sentences = _sentences(passages)
    conflicts = [c for c in (comparison.conflicts if comparison else []) if doc.label in c.labels]
    parts = [f"Document {doc.label} ({doc.source}):"]
    parts += [f"[{doc.label} p.{page}] {sentence}" for page, sentence in sentences]
    if conflicts:
        parts.append("\nWhere it conflicts with the other documents:")
        parts += [f"- {c.topic} ({', '.join(c.labels)}): {c.detail}" for c in conflicts]
    parts.append(f"\nRequest: {inp.request}\nWhat are the risks in {doc.label}?")
    messages = [Message(role="system", content=RISKS_SYSTEM), Message(role="user", content="\n".join(parts))]
    report: RiskReport = await run.ctx.generate(
        f"risks[{doc.label}]",
        run.model,
        messages,
        output_type=RiskReport,
        json_schema=_risk_schema(doc.label, sentences),
        settings=ModelSettings(temperature=0.0, max_tokens=700),
        timeout=inp.step_timeout_s,
    )
    return report.risks


_SEVERITY = {"critical": 0, "high": 1, "medium": 2, "low": 3}


async def _risks(
    run: _Run, comparison: ComparisonResult | None
) -> tuple[list[RiskDraft] | None, dict[str, Any], Component]:
    """Risks per document in parallel (each call small enough for a small model's window), then merged by
    severity. A document whose risk call fails is named in errors[]; if every call fails, the risks are ``null``
    and the rest of the analysis is returned."""
    ctx, inp = run.ctx, run.inp
    await ctx.emit("stage", {"stage": "risks", "done": 0, "total": len(run.docs)})
    passages, confidence = await _passages(run)
    docs = [d for d in run.docs if passages.get(d.label)]
    done = 0

    async def one(doc: _Doc) -> list[RiskDraft] | None:
        nonlocal done
        try:
            found = await _risks_of(run, doc, passages[doc.label], comparison)
        except StepFailed as exc:
            _component_failed(ctx, f"risk analysis of {doc.label} ({doc.source})", exc, inp.step_timeout_s, exc.step)
            return None
        done += 1
        await ctx.emit("stage", {"stage": "risks", "done": done, "total": len(docs), "document": doc.label})
        return found

    outcomes = await ctx.concurrently(*(one(d) for d in docs))
    found = [r for r in outcomes if isinstance(r, list)]
    if not found:
        return None, confidence, "failed"
    merged = sorted((r for rs in found for r in rs), key=lambda r: _SEVERITY[r.severity])  # stable: doc order kept
    if len(merged) > inp.max_risks:
        ctx.warn(
            "risks_capped",
            f"{len(merged)} risks were found; the {inp.max_risks} most severe are returned (max_risks)",
            step="risks",
        )
    drafts = merged[: inp.max_risks]
    await ctx.partial_result("risks", [r.model_dump() for r in drafts])
    return drafts, confidence, "ok" if len(found) == len(docs) else "partial"


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


def _validate_evidence(run: _Run, drafts: list[RiskDraft] | None) -> tuple[list[Risk] | None, Component]:
    ctx = run.ctx
    if drafts is None:
        return None, "skipped"
    flagged = 0
    risks: list[Risk] = []
    for i, draft in enumerate(drafts):
        evidence: list[Evidence] = []
        for j, ev in enumerate(draft.evidence):
            doc = run.by_label(ev.document)
            page = None
            if doc is not None:
                page = find_quote(ev.quote, run.texts.get(doc.id, []))
            if page is None:  # cited to the wrong document, perhaps: look in the others before calling it invented
                for other in run.docs:
                    page = find_quote(ev.quote, run.texts.get(other.id, []))
                    if page is not None:
                        doc = other
                        break
            pointer = f"/risks/{i}/evidence/{j}"
            if page is None:
                flagged += 1
                ctx.error(
                    "hallucination_suspected",
                    f"the quote {ev.quote[:120]!r}, given as evidence for the risk {draft.risk[:120]!r}, is not in "
                    f"{'any analysed document' if doc is None else doc.label + ' (' + doc.source + ')'}",
                    step="validate",
                    pointer=pointer,
                )
            elif page != ev.page and ev.page != 0:
                ctx.warn(
                    "evidence_page_corrected",
                    f"the quote for {draft.risk[:80]!r} is on page {page} of {doc.label if doc else '?'}, not page "
                    f"{ev.page}",
                    step="validate",
                    pointer=pointer,
                )
            shown = doc or _Doc(id="", label=ev.document, source="", pages=0, space=None)
            evidence.append(
                Evidence(
                    document=shown.id,
                    label=shown.label,
                    source=shown.source,
                    page=page if page is not None else ev.page,
                    quote=ev.quote,
                    verified=page is not None,
                    found_on_page=page,
                )
            )
        if not evidence:
            ctx.warn("risk_without_evidence", f"the risk {draft.risk[:120]!r} cites no evidence", pointer=f"/risks/{i}")
        risks.append(
            Risk(
                risk=draft.risk,
                severity=draft.severity,
                rationale=draft.rationale,
                evidence=evidence,
                supported=any(e.verified for e in evidence),
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


async def admit(keel: Any, tenant: str, inp: DocumentAnalysisInput) -> None:
    """At submission, before any model call: every document id must be the tenant's, and every URL must pass the
    SSRF rules and resolve. A 422 names each bad entry by its JSON pointer."""
    problems: list[dict[str, str]] = []
    allow = AllowList.parse(keel.settings.fetch_allow_hosts)
    for i, ref in enumerate(inp.documents):
        pointer = f"/input/documents/{i}"
        if ref.startswith("doc_"):
            if await keel.store.get_document(tenant, ref, keel.clock()) is None:
                problems.append({"pointer": pointer, "message": f"no document {ref} (unknown, expired or deleted)"})
            continue
        try:
            await resolve_target(ref, allow=allow)
        except BlockedAddress as exc:
            problems.append({"pointer": pointer, "message": exc.message})
    if problems:
        raise InputError(
            f"{len(problems)} of {len(inp.documents)} documents cannot be analysed", detail={"errors": problems}
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
