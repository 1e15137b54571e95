"""Workflows over the memory layer: ``ingest`` (a batch of documents, recovered per document),
``memory_reindex`` (re-embed a space under another model, in the background) and :func:`retrieve`, the durable
retrieval step other workflows call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import ConfigError, DocumentRejected, InputError, WorkflowError
from keel.memory.retrieval import Memory, Retrieval
from keel.memory.types import DocumentRecord, DocumentStatus, SessionTurn
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Admission, Workflow


def memory_of(ctx: WorkflowContext) -> Memory:
    memory = getattr(ctx.services, "memory", None)
    if not isinstance(memory, Memory):
        raise ConfigError("this workflow needs the memory layer (Services.memory), and this engine has none")
    return memory


def session_loader(ctx: WorkflowContext, session: str, last: int) -> Callable[[], Awaitable[list[dict[str, str]]]]:
    """A step body: the session's last ``last`` turns as ``{"role", "content"}`` messages (none when the session is
    unknown or expired). Every conversational workflow reads its history so."""

    async def load() -> list[dict[str, str]]:
        memory = memory_of(ctx)
        found = await memory.sessions.get_session(ctx.tenant, session, memory.clock(), last=last)
        return [{"role": t.role, "content": t.content} for t in found.turns] if found else []

    return load


def session_saver(ctx: WorkflowContext, session: str, turns: Sequence[tuple[str, str]]) -> Callable[[], Awaitable[int]]:
    """A step body: append ``(role, content)`` turns to the session (its TTL slides); returns its length."""

    async def save() -> int:
        memory = memory_of(ctx)
        new = [SessionTurn(role=role, content=content) for role, content in turns]
        stored = await memory.sessions.append_turns(ctx.tenant, session, new, memory.session_ttl_s, memory.clock())
        return len(stored.turns)

    return save


# -- retrieval ----------------------------------------------------------------------------------------------


async def retrieve(
    ctx: WorkflowContext,
    query: str,
    *,
    k: int = 5,
    documents: list[str] | None = None,
    name: str = "retrieve",
) -> dict[str, Any]:
    """Search vector memory as a durable step (a replay returns the same hits). The scores and the confidence go
    into the task's trace (a ``retrieval`` event) and its envelope metadata (``metadata.retrieval``); a ``low``
    or ``none`` level also adds an envelope warning, so weak context is never passed off as strong."""
    memory = memory_of(ctx)

    async def search(q: str) -> dict[str, Any]:
        found: Retrieval = await memory.search(ctx.tenant, q, k=k, documents=documents)
        await ctx.emit("retrieval", found.summary(text_chars=120))
        return found.summary(text_chars=100_000)

    result: dict[str, Any] = await ctx.step(name, search, query)
    trace = {key: value for key, value in result.items() if key != "hits"}
    trace["hits"] = [{key: v for key, v in hit.items() if key != "text"} for hit in result["hits"]]
    ctx.metadata.setdefault("retrieval", []).append(trace)
    if result["level"] in ("low", "none"):
        ctx.warn(
            "low_retrieval_confidence",
            f"retrieval for {query[:80]!r} found {'nothing' if result['level'] == 'none' else 'only weak matches'}"
            f" (confidence {result['confidence']})",
            step=name,
        )
    return result


# -- ingest -------------------------------------------------------------------------------------------------


class IngestInput(BaseModel):
    """Input of the built-in ``ingest`` workflow."""

    model_config = ConfigDict(extra="forbid")

    documents: list[str] = Field(
        min_length=1,
        max_length=100,
        description="Document ids from `POST /v1/documents`, or http(s) URLs to fetch (SSRF-guarded).",
    )
    min_success: int | None = Field(
        None, ge=0, description="Fewest documents that must be ingested for the task to go on (default: 1)."
    )


async def ingest_one(ctx: WorkflowContext, ref: str) -> dict[str, Any]:
    """Ingest (or look up) one document; a document's own failure comes back as its record, never raised."""
    memory = memory_of(ctx)

    async def progress(type: str, data: dict[str, Any]) -> None:
        await ctx.emit(type, {"ref": ref, **data})

    if ref.startswith("doc_"):
        doc: DocumentRecord | None = await memory.documents.get_document(ctx.tenant, ref, memory.clock())
        if doc is None:
            raise DocumentRejected(
                f"no document {ref!r} (unknown, expired or deleted)", reason="not_found", document=ref
            )
    elif ref.startswith(("http://", "https://")):
        doc = await memory.ingestor.ingest_url(ctx.tenant, ref, progress=progress)
    else:
        raise DocumentRejected(f"{ref!r} is neither a document id nor an http(s) URL", reason="unsupported_type")
    return doc.public()


async def unknown_documents(app: Admission, tenant: str, refs: Sequence[str]) -> dict[int, str]:
    """The document ids in ``refs`` the tenant does not have (unknown, expired, deleted, or another tenant's: the
    same answer, so an id says nothing about other tenants), by position, with the reason."""
    return {
        i: f"no document {ref} (unknown, expired or deleted)"
        for i, ref in enumerate(refs)
        if ref.startswith("doc_") and await app.find_document(tenant, ref) is None
    }


async def admit_ingest(app: Admission, tenant: str, inp: IngestInput) -> None:
    """At submission: every document id must be the tenant's (a 422 naming each by its JSON pointer)."""
    problems = await unknown_documents(app, tenant, inp.documents)
    if problems:
        errors = [{"pointer": f"/input/documents/{i}", "message": problems[i]} for i in sorted(problems)]
        raise InputError(
            f"{len(problems)} of {len(inp.documents)} documents cannot be ingested", detail={"errors": errors}
        )


def report_documents(ctx: WorkflowContext, docs: list[dict[str, Any]], step: str = "ingest") -> None:
    """Turn each skipped document into its envelope entry: an encrypted one is a warning (the caller can give
    the password) that still makes the result partial; any other is an envelope error."""
    for doc in docs:
        if doc["status"] == DocumentStatus.ingested.value:
            continue
        for problem in doc["warnings"] if doc["status"] == "skipped" else []:
            if problem.get("type") == "document_encrypted":
                ctx.skipped(
                    "document_encrypted",
                    f"{doc['source']} ({doc['id']}) is encrypted and was skipped: {problem['message']}; "
                    "upload it again with its password",
                    step=step,
                )
        for problem in doc["errors"]:
            ctx.error(problem.get("type", "document_failed"), f"{doc['source']} ({doc['id']}): {problem['message']}")
        if doc["status"] == DocumentStatus.ingesting.value:
            ctx.error(
                "document_not_ready",
                f"{doc['source']} ({doc['id']}) is still being ingested; run the task again once it is",
                recovery_suggested=True,
            )


async def ingest(ctx: WorkflowContext, inp: IngestInput) -> dict[str, Any]:
    refs = list(dict.fromkeys(inp.documents))
    done = 0

    async def one(ref: str) -> dict[str, Any]:
        nonlocal done
        out = await ingest_one(ctx, ref)
        done += 1
        await ctx.progress(done / len(refs), f"ingest {ref}")
        return out

    mapped = await ctx.map(one, refs, name="ingest", min_success=0)
    docs = [r for r in mapped.results if isinstance(r, dict)]
    report_documents(ctx, docs)
    ingested = [d for d in docs if d["status"] == DocumentStatus.ingested.value]
    need = 1 if inp.min_success is None else inp.min_success
    if len(ingested) < need:
        raise WorkflowError(
            f"{len(ingested)} of {len(refs)} documents were ingested; at least {need} needed",
            type="min_success_not_met",
        )
    return {
        "documents": docs,
        "ingested": len(ingested),
        "skipped": len(refs) - len(ingested),
        "chunks": sum(d["chunks"] for d in ingested),
    }


INGEST: Workflow[IngestInput] = Workflow(
    name="ingest",
    input_model=IngestInput,
    fn=ingest,
    estimate=lambda inp: 5.0 * len(inp.documents),
    description="Ingest documents (ids or URLs) into vector memory; each bad one becomes an envelope error.",
    admit=admit_ingest,
)


# -- reindex ------------------------------------------------------------------------------------------------


class ReindexInput(BaseModel):
    """Input of the built-in ``memory_reindex`` workflow."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=500, description="Embedder spec to re-embed into, e.g. local:minilm.")
    source: str | None = Field(
        None, max_length=500, description="Space (model@version) to copy from; default: the largest other space."
    )
    batch: int = Field(64, ge=1, le=1024, description="Chunks per durable step.")
    prune: bool = Field(False, description="Delete the source space's chunks once every one has a twin.")


async def _reindex_plan(memory: Memory, source: str | None, target: str) -> dict[str, Any]:
    """Which space to copy from (the largest other one by default) and how many chunks it holds."""
    spaces = await memory.vectors.spaces(memory.clock())
    if source is None:
        others = {s: n for s, n in spaces.items() if s != target}
        if not others:
            return {"source": None, "total": 0}
        source = max(others, key=lambda s: others[s])
    return {"source": source, "total": spaces.get(source, 0)}


async def memory_reindex(ctx: WorkflowContext, inp: ReindexInput) -> dict[str, Any]:
    memory = memory_of(ctx)
    embedders = getattr(ctx.services, "embedders", None)
    if embedders is None:
        raise ConfigError("memory_reindex needs Services.embedders")
    target = embedders(inp.model)
    target_key: str = target.space.key

    async def plan() -> dict[str, Any]:  # a closure: step arguments are deep-copied per try
        return await _reindex_plan(memory, inp.source, target_key)

    where = await ctx.step("plan", plan)
    source = where["source"]
    if source is None or source == target_key:
        return {"source": source, "target": target_key, "reembedded": 0, "note": "nothing to re-embed"}
    total = max(1, int(where["total"]))

    async def batch(n: int) -> int:
        chunks = await memory.vectors.chunks_to_reindex(source, target_key, inp.batch, memory.clock())
        if not chunks:
            return 0
        vectors = await target.embed([c.text for c in chunks])
        for c, v in zip(chunks, vectors, strict=True):
            c.space, c.vector, c.id = target_key, v, 0
        await memory.vectors.add_chunks(chunks, memory.clock())
        return len(chunks)

    done = 0
    i = 0
    while True:
        n = await ctx.step(f"reembed[{i}]", batch, i)
        if n == 0:
            break
        done += n
        i += 1
        await ctx.emit("reindex_progress", {"done": done, "total": total, "source": source, "target": target_key})
        await ctx.progress(min(0.99, done / total), f"re-embedded {done}/{total}")
    pruned = 0
    if inp.prune:

        async def prune() -> int:
            return await memory.vectors.drop_space(source)

        pruned = await ctx.step("prune", prune)
    await ctx.progress(1.0, "done")
    return {"source": source, "target": target_key, "reembedded": done, "pruned": pruned}


MEMORY_REINDEX: Workflow[ReindexInput] = Workflow(
    name="memory_reindex",
    input_model=ReindexInput,
    fn=memory_reindex,
    estimate=lambda inp: 60.0,
    description="Re-embed vector memory under another embedding model/version, in the background.",
)
