"""The ingestion pipeline: bytes or a URL in, a :class:`DocumentRecord` out, its chunks embedded in vector memory.

A document never fails the caller's batch: whatever goes wrong with *this* document (encrypted, corrupt, a
parser bomb, unreachable, no text at all) ends as a record with status ``skipped`` and the reason in its
``warnings`` (encrypted: the user can supply a password) or ``errors``. Only a failure of keel's own (the
embedder or the store) ends as ``failed``, and ingesting the same bytes again retries it.

Idempotent: a document's id is derived from the tenant and the SHA-256 of its bytes, and a chunk's row from its
document, space, page, offsets and content hash; ingesting the same bytes again returns the stored record,
and an interrupted ingestion re-run adds only the chunks that are missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from keel.errors import DocumentRejected, KeelError, UpstreamError
from keel.memory.embeddings import Embedder
from keel.memory.ingest.chunking import chunk_spans, content_hash
from keel.memory.ingest.pdf import ParseLimits, parse_pdf
from keel.memory.stores import DocumentStore, VectorStore
from keel.memory.types import ChunkRecord, DocumentRecord, DocumentStatus, document_id

Progress = Callable[[str, dict[str, Any]], Awaitable[None]]
"""``(event type, data)``: ``ingest_progress`` (phase, done, total) and ``ingest_retry`` (attempt, error)."""


@dataclass(kw_only=True, slots=True)
class Fetched:
    data: bytes
    media_type: str
    url: str
    status: int = 200


Fetcher = Callable[[str], Awaitable[Fetched]]
"""Fetch a URL through the SSRF guard within the caps. Raises UpstreamError for what a retry may cure (transport
errors, timeouts), DocumentRejected for what it cannot (too large, a type that is not allowed), and
BlockedAddress for an address the SSRF rules refuse (the caller's mistake: it propagates)."""


class IngestBackend(DocumentStore, VectorStore, Protocol):
    pass


@dataclass(kw_only=True, slots=True)
class IngestSettings:
    chunk_tokens: int = 200
    """Upper bound; the embedder's window (less 2 for its [CLS]/[SEP]) lowers it when smaller."""
    overlap_tokens: int = 32
    ttl_s: float | None = 30 * 86_400
    """How long a document and its chunks live in vector memory (None: until deleted)."""
    embed_batch: int = 32
    max_bytes: int = 50_000_000
    retries: int = 3
    """A URL is tried once and retried this many times (transport errors, timeouts, 429 and 5xx) before the
    document is skipped as unreachable."""
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    parallel_parses: int = 2
    limits: ParseLimits = field(default_factory=ParseLimits)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sniff(data: bytes, declared: str | None) -> str:
    head = data[:1024]
    if b"%PDF-" in head:
        return "application/pdf"
    if b"\x00" not in head:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return "text/plain" if not declared or not declared.startswith("text/") else declared.split(";")[0]
    return declared or "application/octet-stream"


def _problem(exc: KeelError, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": getattr(exc, "type", exc.code), "message": exc.message, **extra}
    if exc.detail:
        out["detail"] = exc.detail
    return out


class Ingestor:
    def __init__(
        self,
        store: IngestBackend,
        embedder: Embedder,
        *,
        settings: IngestSettings | None = None,
        fetcher: Fetcher | None = None,
        clock: Callable[[], float],
        scratch_dir: Path,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings or IngestSettings()
        self.fetcher = fetcher
        self.clock = clock
        self.scratch_dir = scratch_dir
        self._sleep = sleep
        self._parses = asyncio.Semaphore(self.settings.parallel_parses)
        self._running: dict[tuple[str, str | None], asyncio.Future[DocumentRecord]] = {}

    @property
    def max_chunk_tokens(self) -> int:
        return max(8, min(self.settings.chunk_tokens, self.embedder.max_tokens - 2))

    # -- sources ------------------------------------------------------------------------------------------

    async def ingest_url(
        self, tenant: str, url: str, *, password: str | None = None, progress: Progress | None = None
    ) -> DocumentRecord:
        """Fetch ``url`` (retried with backoff) and ingest it. An address the SSRF rules refuse raises
        BlockedAddress at once: that is the caller's mistake, not an unreachable document."""
        if self.fetcher is None:
            raise DocumentRejected("fetching URLs is not configured", reason="unreachable", document=url)
        try:
            fetched = await self._fetch_with_retries(url, progress)
        except DocumentRejected as exc:
            now = self.clock()
            doc = DocumentRecord(
                id=document_id(tenant, "url:" + hashlib.sha256(url.encode()).hexdigest()),
                tenant=tenant,
                sha256="",
                source=url,
                status=DocumentStatus.skipped,
                errors=[_problem(exc)],
                expires_at=self._expiry(now),
            )
            return await self.store.save_document(doc, now)
        return await self.ingest_bytes(
            tenant, fetched.data, source=fetched.url, media_type=fetched.media_type, password=password,
            progress=progress,
        )  # fmt: skip

    async def _fetch_with_retries(self, url: str, progress: Progress | None) -> Fetched:
        assert self.fetcher is not None
        attempts = self.settings.retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            wait_at_least = 0.0
            try:
                return await self.fetcher(url)
            except UpstreamError as exc:
                last = exc.message
                wait_at_least = min(exc.retry_after or 0.0, self.settings.backoff_max_s)
                status = exc.status_code
                if status is not None and status < 500 and status not in (408, 425, 429):
                    raise DocumentRejected(
                        f"fetching {url} answered HTTP {status}", reason="unreachable", document=url,
                        detail={"status": status, "attempts": attempt},
                    ) from exc  # fmt: skip
            if attempt < attempts:
                delay = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2  # jitter: retries from many tasks do not line up
                delay = max(delay, wait_at_least)  # a 429/503's Retry-After, within the backoff cap
                if progress is not None:
                    await progress("ingest_retry", {"url": url, "attempt": attempt, "error": last, "delay_s": delay})
                await self._sleep(delay)
        raise DocumentRejected(
            f"{url} could not be fetched after {attempts} attempts: {last}", reason="unreachable", document=url,
            detail={"attempts": attempts, "last_error": last},
        )  # fmt: skip

    async def ingest_bytes(
        self,
        tenant: str,
        data: bytes,
        *,
        source: str,
        media_type: str | None = None,
        password: str | None = None,
        progress: Progress | None = None,
        sha256: str | None = None,
    ) -> DocumentRecord:
        """``sha256``: the bytes' hash when the caller has it already (it is not computed twice)."""
        now = self.clock()
        sha: str = sha256 if sha256 is not None else await asyncio.to_thread(_sha256, data)
        doc_id = document_id(tenant, sha)
        existing = await self.store.get_document(tenant, doc_id, now)
        if existing is not None and existing.status is DocumentStatus.ingested:
            return existing  # the same bytes again: nothing to do
        # The same bytes arriving twice at once (a client's retry racing its first request) are parsed and embedded
        # once: the second caller waits for the first one's work. Shielded, so one caller giving up stops nobody.
        key = (doc_id, password)
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(
                self._ingest_new(doc_id, tenant, sha, data, source, media_type, password, progress)
            )
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(running)

    async def _ingest_new(
        self,
        doc_id: str,
        tenant: str,
        sha: str,
        data: bytes,
        source: str,
        media_type: str | None,
        password: str | None,
        progress: Progress | None,
    ) -> DocumentRecord:
        now = self.clock()
        kind = _sniff(data, media_type)
        doc = DocumentRecord(
            id=doc_id,
            tenant=tenant,
            sha256=sha,
            source=source,
            media_type=kind,
            size=len(data),
            status=DocumentStatus.ingesting,
            expires_at=self._expiry(now),
        )
        doc = await self.store.save_document(doc, now)
        try:
            if len(data) > self.settings.max_bytes:
                raise DocumentRejected(
                    f"{len(data)} bytes is over the {self.settings.max_bytes}-byte limit", reason="too_large"
                )
            pages = await self._pages(doc, data, kind, password, progress)
        except DocumentRejected as exc:
            doc.status = DocumentStatus.skipped
            if exc.reason == "encrypted":
                doc.warnings.append(_problem(exc, hint="ingest it again with its password"))
            else:
                doc.errors.append(_problem(exc))
            return await self.store.save_document(doc, self.clock())
        try:
            await self._embed(doc, pages, progress)
        except Exception as exc:  # the embedder or the store: keel's failure, not the document's
            doc.status = DocumentStatus.failed
            doc.errors.append({"type": "ingestion_failed", "message": f"{type(exc).__name__}: {exc}"})
            await self.store.save_document(doc, self.clock())
            raise
        return await self.store.save_document(doc, self.clock())

    def _expiry(self, now: float) -> float | None:
        return None if self.settings.ttl_s is None else now + self.settings.ttl_s

    # -- parsing ------------------------------------------------------------------------------------------

    async def _pages(
        self, doc: DocumentRecord, data: bytes, kind: str, password: str | None, progress: Progress | None
    ) -> list[tuple[int, str]]:
        if kind.startswith("text/"):
            doc.pages = 1
            return [(1, data.decode("utf-8", errors="replace"))]
        if kind != "application/pdf":
            raise DocumentRejected(f"cannot ingest {kind!r}: only PDF and UTF-8 text", reason="unsupported_type")

        async def on_page(done: int, total: int) -> None:
            if progress is not None:
                await progress("ingest_progress", {"document": doc.id, "phase": "parse", "done": done, "total": total})

        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="ingest-", suffix=".pdf", dir=self.scratch_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                await asyncio.to_thread(fh.write, data)
            async with self._parses:
                parsed = await parse_pdf(Path(name), password=password, limits=self.settings.limits, on_page=on_page)
        finally:
            Path(name).unlink(missing_ok=True)
        doc.pages = parsed.page_count
        doc.warnings.extend(parsed.warnings)
        doc.metadata = {"pdf": parsed.metadata, "encrypted": parsed.encrypted} if parsed.metadata else {}
        if parsed.encrypted:
            doc.metadata["encrypted"] = True
        ocr = [p.number for p in parsed.pages if p.method == "ocr"]
        if ocr:
            doc.metadata["ocr_pages"] = ocr
        kept: list[tuple[int, str]] = []
        for page in parsed.pages:
            if page.flagged:
                continue  # low-confidence OCR: flagged in the warnings, never embedded as junk
            if page.text.strip():
                kept.append((page.number, page.text))
        if not kept:
            raise DocumentRejected("no text found, even with OCR", reason="empty")
        return kept

    # -- chunking and embedding ---------------------------------------------------------------------------

    def chunks(self, doc: DocumentRecord, pages: Sequence[tuple[int, str]]) -> list[ChunkRecord]:
        out: list[ChunkRecord] = []
        space = self.embedder.space.key
        for number, text in pages:
            for span in chunk_spans(
                text, self.embedder.token_spans(text), self.max_chunk_tokens, self.settings.overlap_tokens
            ):
                piece = span.text(text)
                if not piece.strip():
                    continue
                out.append(
                    ChunkRecord(
                        document_id=doc.id,
                        tenant=doc.tenant,
                        page=number,
                        start=span.start,
                        end=span.end,
                        text=piece,
                        content_hash=content_hash(piece),
                        space=space,
                        expires_at=doc.expires_at,
                    )
                )
        return out

    async def _embed(self, doc: DocumentRecord, pages: Sequence[tuple[int, str]], progress: Progress | None) -> None:
        chunks = await asyncio.to_thread(self.chunks, doc, pages)
        batch = self.settings.embed_batch
        for i in range(0, len(chunks), batch):
            part = chunks[i : i + batch]
            vectors = await self.embedder.embed([c.text for c in part])
            for chunk, vector in zip(part, vectors, strict=True):
                chunk.vector = vector
            await self.store.add_chunks(part, self.clock())
            if progress is not None:
                await progress(
                    "ingest_progress",
                    {"document": doc.id, "phase": "embed", "done": min(i + batch, len(chunks)), "total": len(chunks)},
                )
        doc.chunks = len(chunks)
        doc.space = self.embedder.space.key
        doc.status = DocumentStatus.ingested
