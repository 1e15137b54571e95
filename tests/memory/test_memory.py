"""The memory layer in process: chunking, the ingestion pipeline (dedup, URL retries), embedding-version isolation
and reindexing, TTLs under an injected clock, and retrieval confidence in the trace and the envelope."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from engine_support import engine_for, wait_terminal
from keel.backends.sqlite import SQLiteStore
from keel.errors import BlockedAddress
from keel.memory.ingest.chunking import chunk_spans
from keel.memory.ingest.pipeline import Ingestor, IngestSettings
from keel.memory.retrieval import ConfidencePolicy
from keel.memory.types import DocumentStatus, NewTask, SessionTurn, TaskStatus
from keel.netguard import AllowList
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Workflow
from keel.orchestration.tools.fetch import FetchLimits, document_fetcher
from keel.orchestration.tools.services import Services
from keel.orchestration.workflows.memory import INGEST, MEMORY_REINDEX, retrieve
from keel.testing.embedders import HashEmbedder
from keel.testing.pdfs import corrupt_pdf
from memory_support import CONTRACT_A, CONTRACT_B, Clock, memory_for

UNRELATED = "The cafeteria menu changes on Mondays. Soup of the day is tomato. Parking passes renew in March."


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "k.db")
    yield s
    await s.aclose()


# -- chunking -------------------------------------------------------------------------------------------------


words = st.lists(st.sampled_from(["alpha", "beta.", "gamma", "delta!", "\n\n", "eps", "z"]), min_size=0, max_size=300)


@settings(max_examples=200, deadline=None)
@given(words, st.integers(1, 40), st.integers(0, 20))
def test_chunks_cover_every_token_within_the_window(parts: list[str], max_tokens: int, overlap: int) -> None:
    text = " ".join(parts)
    spans = HashEmbedder().token_spans(text)
    chunks = chunk_spans(text, spans, max_tokens, overlap)
    covered: set[int] = set()
    for c in chunks:
        inside = [i for i, (s, e) in enumerate(spans) if s >= c.start and e <= c.end]
        assert len(inside) == c.tokens <= max_tokens
        covered.update(inside)
    assert covered == set(range(len(spans)))  # nothing silently dropped
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


def test_chunks_overlap_and_prefer_sentence_ends() -> None:
    text = " ".join(f"word{i}." if i % 10 == 9 else f"word{i}" for i in range(100))
    spans = HashEmbedder().token_spans(text)
    chunks = chunk_spans(text, spans, 25, 5)
    assert all(c.text(text).endswith(".") for c in chunks[:-1])  # cut after "word9." not mid-sentence
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end  # overlapping


# -- the pipeline ---------------------------------------------------------------------------------------------


async def test_ingest_text_is_idempotent_and_searchable(store: SQLiteStore, tmp_path: Path) -> None:
    emb, clock = HashEmbedder(), Clock()
    memory = memory_for(store, emb, clock, tmp_path)
    doc = await memory.ingestor.ingest_bytes("t1", CONTRACT_A.encode(), source="upload:a.txt")
    assert doc.status is DocumentStatus.ingested and doc.pages == 1 and doc.chunks >= 2
    assert doc.space == emb.space.key and doc.expires_at == clock.t + 30 * 86_400
    embedded = emb.texts_embedded
    again = await memory.ingestor.ingest_bytes("t1", CONTRACT_A.encode(), source="upload:copy.txt")
    assert again.id == doc.id and emb.texts_embedded == embedded  # same bytes: nothing re-embedded
    assert await store.chunk_count(emb.space.key) == doc.chunks
    other_tenant = await memory.ingestor.ingest_bytes("t2", CONTRACT_A.encode(), source="upload:a.txt")
    assert other_tenant.id != doc.id
    found = await memory.search("t1", "payment due within 30 days of the invoice", k=3)
    top = found.hits[0].chunk
    assert top.document_id == doc.id and "30 days" in top.text and top.page == 1
    assert CONTRACT_A[top.start : top.end] == top.text  # offsets point into the page text
    assert all(h.chunk.tenant == "t1" for h in found.hits)


async def test_unsupported_and_corrupt_documents_are_skipped_with_an_error(store: SQLiteStore, tmp_path: Path) -> None:
    memory = memory_for(store, HashEmbedder(), Clock(), tmp_path)
    blob = await memory.ingestor.ingest_bytes("t1", bytes(range(256)) * 4, source="upload:x.bin")
    assert blob.status is DocumentStatus.skipped and blob.errors[0]["type"] == "document_unsupported_type"
    bad = await memory.ingestor.ingest_bytes("t1", corrupt_pdf(), source="upload:broken.pdf")
    assert bad.status is DocumentStatus.skipped and bad.errors[0]["type"] == "document_corrupt"
    stored = await store.get_document("t1", bad.id)
    assert stored is not None and stored.status is DocumentStatus.skipped  # durable, with its reason


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed once we leave: connections are refused


async def test_unreachable_url_is_retried_three_times_with_backoff_then_skipped(
    store: SQLiteStore, tmp_path: Path
) -> None:
    sleeps: list[float] = []
    attempts: list[str] = []
    fetch = document_fetcher(FetchLimits(allow=AllowList.parse("127.0.0.1"), timeout_s=5))

    async def counting_fetch(url: str) -> Any:
        attempts.append(url)
        return await fetch(url)

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    ingestor = Ingestor(
        store,
        HashEmbedder(),
        settings=IngestSettings(retries=3, backoff_base_s=0.5),
        fetcher=counting_fetch,
        clock=Clock(),
        scratch_dir=tmp_path,
        sleep=fake_sleep,
    )
    events: list[tuple[str, dict[str, Any]]] = []

    async def progress(type: str, data: dict[str, Any]) -> None:
        events.append((type, data))

    url = f"http://127.0.0.1:{closed_port()}/report.pdf"
    doc = await ingestor.ingest_url("t1", url, progress=progress)
    assert len(attempts) == 4  # the first try and 3 retries
    assert len(sleeps) == 3 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1 and 1 <= sleeps[2] <= 2
    assert [e[0] for e in events] == ["ingest_retry"] * 3
    assert doc.status is DocumentStatus.skipped and doc.source == url
    assert doc.errors[0]["type"] == "document_unreachable" and doc.errors[0]["detail"]["attempts"] == 4


async def test_http_404_is_not_retried_and_ssrf_targets_are_refused(store: SQLiteStore, tmp_path: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    def ingestor(allow: str) -> Ingestor:
        return Ingestor(
            store,
            HashEmbedder(),
            fetcher=document_fetcher(FetchLimits(allow=AllowList.parse(allow), timeout_s=5)),
            clock=Clock(),
            scratch_dir=tmp_path,
            sleep=fake_sleep,
        )

    async with server:
        doc = await ingestor("127.0.0.1").ingest_url("t1", f"http://127.0.0.1:{port}/gone.pdf")
    assert doc.status is DocumentStatus.skipped and doc.errors[0]["detail"]["status"] == 404 and sleeps == []
    with pytest.raises(BlockedAddress):  # the caller's mistake, not an unreachable document
        await ingestor("").ingest_url("t1", "http://169.254.169.254/latest/meta-data")


# -- embedding versions ---------------------------------------------------------------------------------------


async def test_chunks_of_version_a_are_never_returned_for_version_b_until_reindexed(
    store: SQLiteStore, tmp_path: Path
) -> None:
    clock = Clock()
    a, b = HashEmbedder(version="A"), HashEmbedder(version="B")
    mem_a, mem_b = memory_for(store, a, clock, tmp_path), memory_for(store, b, clock, tmp_path)
    doc = await mem_a.ingestor.ingest_bytes("t1", CONTRACT_A.encode(), source="upload:a.txt")
    query = "Payment is due within 30 days of the invoice date."
    assert (await mem_a.search("t1", query)).hits
    before = await mem_b.search("t1", query)
    assert before.hits == [] and before.level == "none"  # the same text, another version: never compared

    task = await store.create_task(
        NewTask(tenant="t1", workflow="memory_reindex", input={"model": "hash:B", "batch": 1}), None, clock()
    )
    assert task.task is not None
    services = Services(store=store, memory=mem_a, embedders=lambda spec: b)
    engine = engine_for(store, MEMORY_REINDEX, services=services)
    await engine.start()
    try:
        done = await wait_terminal(store, task.task.id, timeout=30)
    finally:
        await engine.stop()
    assert done.status is TaskStatus.succeeded, done.envelope
    result = done.envelope["result"] if done.envelope else {}
    assert result["reembedded"] == doc.chunks and result["source"] == a.space.key and result["target"] == b.space.key
    events = [e.type for e in await store.read(task.task.id, 0)]
    assert events.count("reindex_progress") == doc.chunks  # batch=1: one event per chunk
    after = await mem_b.search("t1", query)
    assert after.hits and after.hits[0].chunk.document_id == doc.id and after.hits[0].chunk.space == b.space.key
    assert await store.spaces(clock()) == {a.space.key: doc.chunks, b.space.key: doc.chunks}


# -- TTL ------------------------------------------------------------------------------------------------------


async def test_expired_sessions_and_chunks_are_never_returned_and_the_sweeper_removes_them(
    store: SQLiteStore, tmp_path: Path
) -> None:
    clock = Clock()
    memory = memory_for(store, HashEmbedder(), clock, tmp_path, ttl_s=3600)
    doc = await memory.ingestor.ingest_bytes("t1", CONTRACT_B.encode(), source="upload:b.txt")
    await store.append_turns("t1", "chat-1", [SessionTurn(role="user", content="hello")], 600, clock())
    assert await store.get_session("t1", "chat-1", clock()) is not None
    assert (await memory.search("t1", "late payment interest")).hits

    clock.t += 601  # the session's TTL has passed, the documents' has not
    assert await store.get_session("t1", "chat-1", clock()) is None
    assert (await memory.search("t1", "late payment interest")).hits
    clock.t += 3000  # now the document's too: nothing is returned even before any sweep
    assert (await memory.search("t1", "late payment interest")).hits == []
    assert await store.get_document("t1", doc.id, clock()) is None
    assert await store.chunk_count(memory.embedder.space.key) == doc.chunks  # still on disk

    engine = engine_for(store, INGEST, clock=clock)
    await engine.sweep_once()
    assert await store.chunk_count(memory.embedder.space.key) == 0
    assert await store.get_document("t1", doc.id) is None
    assert await store.sweep_sessions(clock()) == 0  # already swept


# -- workflows: a batch with bad documents, and retrieval confidence -------------------------------------------


async def test_batch_of_five_with_two_bad_documents_is_a_partial_success(store: SQLiteStore, tmp_path: Path) -> None:
    clock = Clock()
    memory = memory_for(store, HashEmbedder(), clock, tmp_path)
    memory.ingestor.fetcher = document_fetcher(FetchLimits(allow=AllowList.parse("127.0.0.1"), timeout_s=2))
    memory.ingestor.settings.retries = 1
    memory.ingestor.settings.backoff_base_s = 0.01
    good = [
        (await memory.ingestor.ingest_bytes("t1", text.encode(), source=f"upload:{i}.txt")).id
        for i, text in enumerate([CONTRACT_A, CONTRACT_B, UNRELATED])
    ]
    bad = (await memory.ingestor.ingest_bytes("t1", corrupt_pdf(), source="upload:broken.pdf")).id
    dead_url = f"http://127.0.0.1:{closed_port()}/c.pdf"
    task = await store.create_task(
        NewTask(tenant="t1", workflow="ingest", input={"documents": [*good, bad, dead_url]}), None, clock()
    )
    assert task.task is not None
    engine = engine_for(store, INGEST, services=Services(store=store, memory=memory))
    await engine.start()
    try:
        done = await wait_terminal(store, task.task.id, timeout=30)
    finally:
        await engine.stop()
    assert done.status is TaskStatus.partial_success and done.envelope is not None
    result = done.envelope["result"]
    assert result["ingested"] == 3 and result["skipped"] == 2
    kinds = sorted(e["type"] for e in done.envelope["errors"] if e["severity"] == "error")
    assert kinds == ["document_corrupt", "document_unreachable"]


class Question(BaseModel):
    q: str


async def ask_memory(ctx: WorkflowContext, inp: Question) -> dict[str, Any]:
    found = await retrieve(ctx, inp.q, k=2)
    return {"top": found["hits"][0]["text"] if found["hits"] else None}


ASK_MEMORY = Workflow(name="ask_memory", input_model=Question, fn=ask_memory)


async def test_retrieval_scores_and_confidence_go_into_the_trace_and_the_envelope(
    store: SQLiteStore, tmp_path: Path
) -> None:
    clock = Clock()
    memory = memory_for(store, HashEmbedder(), clock, tmp_path)
    memory.confidence = ConfidencePolicy(high=0.5, low=0.2)
    await memory.ingestor.ingest_bytes("t1", CONTRACT_B.encode(), source="upload:b.txt")
    ids = []
    for q in ("late payments accrue interest", "zebra xylophone quartz"):
        created = await store.create_task(NewTask(tenant="t1", workflow="ask_memory", input={"q": q}), None, clock())
        assert created.task is not None
        ids.append(created.task.id)
    engine = engine_for(store, ASK_MEMORY, services=Services(store=store, memory=memory))
    await engine.start()
    try:
        strong, weak = [await wait_terminal(store, i) for i in ids]
    finally:
        await engine.stop()
    assert strong.envelope and weak.envelope
    [trace] = strong.envelope["metadata"]["retrieval"]
    assert trace["level"] in ("high", "medium") and trace["confidence"] > 0 and trace["hits"][0]["score"] > 0.2
    assert "Late payments" in strong.envelope["result"]["top"] and strong.status is TaskStatus.succeeded
    events = [e for e in await store.read(strong.id, 0) if e.type == "retrieval"]
    assert len(events) == 1 and events[0].data["hits"][0]["score"] == trace["hits"][0]["score"]
    [weak_trace] = weak.envelope["metadata"]["retrieval"]
    assert weak_trace["level"] in ("low", "none")
    assert any(e["type"] == "low_retrieval_confidence" for e in weak.envelope["errors"])


async def test_session_turns_survive_a_restart_until_their_ttl(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "k.db")
    await first.append_turns("t1", "s", [SessionTurn(role="user", content="remember the blue file")], 60, 100.0)
    await first.aclose()
    second = SQLiteStore(tmp_path / "k.db")
    try:
        got = await second.get_session("t1", "s", 150.0)
        assert got is not None and got.turns[0].content == "remember the blue file"
        assert await second.get_session("t1", "s", 160.0) is None
    finally:
        await second.aclose()


async def test_ask_with_a_session_remembers_earlier_turns(store: SQLiteStore, tmp_path: Path) -> None:
    from keel.orchestration.llm.models import ModelRegistry
    from keel.orchestration.workflows.basic import ASK
    from keel.testing.models import FunctionModel

    seen: list[list[str]] = []

    def reply(messages: list[Any], info: Any) -> str:
        seen.append([m.content for m in messages])
        return f"answer {len(seen)}"

    models = ModelRegistry("scripted")
    models.add("scripted", FunctionModel(reply))
    clock = Clock()
    memory = memory_for(store, HashEmbedder(), clock, tmp_path)
    memory.session_ttl_s = 600
    engine = engine_for(store, ASK, services=Services(store=store, memory=memory), models=models)
    await engine.start()
    try:
        for question in ("my name is Ada", "what is my name?"):
            new = NewTask(tenant="t1", workflow="ask", input={"question": question, "session": "chat-7"})
            created = await store.create_task(new, None, clock())
            assert created.task is not None
            done = await wait_terminal(store, created.task.id)
            assert done.status is TaskStatus.succeeded, done.envelope
    finally:
        await engine.stop()
    assert seen == [["my name is Ada"], ["my name is Ada", "answer 1", "what is my name?"]]
    session = await store.get_session("t1", "chat-7", clock())
    assert session is not None and [t.role for t in session.turns] == ["user", "assistant"] * 2
    clock.t += 601
    assert await store.get_session("t1", "chat-7", clock()) is None  # its TTL slid from the last write, then ran out


class FlakyEmbedder(HashEmbedder):
    """Fails on its second call: the embedder (keel's side) dies halfway through a document."""

    async def embed(self, texts: Any) -> Any:
        if self.calls == 1 and not getattr(self, "healed", False):
            self.calls += 1
            raise ConnectionError("embedding server went away")
        return await super().embed(texts)


async def test_an_ingestion_cut_halfway_is_failed_then_resumes_without_duplicates(
    store: SQLiteStore, tmp_path: Path
) -> None:
    emb, clock = FlakyEmbedder(), Clock()
    memory = memory_for(store, emb, clock, tmp_path, embed_batch=2)
    long_text = (CONTRACT_A + "\n\n") * 6
    with pytest.raises(ConnectionError):
        await memory.ingestor.ingest_bytes("t1", long_text.encode(), source="upload:long.txt")
    [doc] = await store.list_documents("t1", clock())
    assert doc.status is DocumentStatus.failed and doc.errors[0]["type"] == "ingestion_failed"
    partial = await store.chunk_count(emb.space.key)
    assert partial == 2  # the first batch is stored
    emb.healed = True  # type: ignore[attr-defined]
    again = await memory.ingestor.ingest_bytes("t1", long_text.encode(), source="upload:long.txt")
    assert again.id == doc.id and again.status is DocumentStatus.ingested and again.errors == []
    assert await store.chunk_count(emb.space.key) == again.chunks > partial  # no chunk stored twice


async def test_a_large_spaces_hnsw_graph_is_saved_on_close_and_reused_only_while_it_matches(tmp_path: Path) -> None:
    import numpy as np

    from keel.memory.types import ChunkRecord, DocumentRecord

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    async def open_store() -> SQLiteStore:
        s = SQLiteStore(tmp_path / "k.db")
        s.hnsw_threshold = 100
        return s

    first = await open_store()
    await first.save_document(DocumentRecord(id="doc_1", tenant="t1", sha256="x", source="upload:x"), 1.0)
    chunks = [
        ChunkRecord(
            document_id="doc_1", tenant="t1", page=1, start=i, end=i + 1, text=f"c{i}", content_hash=f"h{i}",
            space="m@1", vector=v,
        )
        for i, v in enumerate(vectors)
    ]  # fmt: skip
    await first.add_chunks(chunks, 1.0)
    before = await first.search_chunks("m@1", vectors[5], 5, tenant="t1", now=2.0)
    assert before[0].chunk.text == "c5" and first._indexes["m@1"].kind == "hnsw"
    await first.aclose()
    saved = list((tmp_path / "vectors").glob("*.kvi"))
    assert len(saved) == 1

    second = await open_store()
    again = await second.search_chunks("m@1", vectors[5], 5, tenant="t1", now=2.0)
    assert [h.chunk.id for h in again] == [h.chunk.id for h in before]
    assert second._saved_index("m@1") is not None  # the rows still match what the graph was built from
    await second.add_chunks([dataclasses.replace(chunks[0], start=999, content_hash="new", id=0)], 3.0)
    assert second._saved_index("m@1") is None  # a row the saved graph lacks: it would be rebuilt, not trusted
    await second.aclose()


async def test_the_same_bytes_uploaded_twice_at_once_are_embedded_once(store: SQLiteStore, tmp_path: Path) -> None:
    emb = HashEmbedder()
    memory = memory_for(store, emb, Clock(), tmp_path)
    data = (CONTRACT_A + "\n\n" + CONTRACT_B).encode()
    first, second = await asyncio.gather(
        memory.ingestor.ingest_bytes("t1", data, source="upload:a.txt"),
        memory.ingestor.ingest_bytes("t1", data, source="upload:retry.txt"),
    )
    assert first.id == second.id and first.status is DocumentStatus.ingested
    assert emb.texts_embedded == first.chunks  # one parse, one embedding pass
    assert memory.ingestor._running == {}
