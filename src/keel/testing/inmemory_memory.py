"""The memory tiers of the in-memory twin (unit tests only): same semantics as SQLite, exact search."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from keel.memory.types import ChunkHit, ChunkRecord, DocumentRecord, Session, SessionTurn, Task, TaskStatus, live
from keel.memory.types import alive as _alive


class InMemoryMemory:
    def _memory_init(self) -> None:
        self._sessions: dict[tuple[str, str], Session] = {}
        self._documents: dict[str, DocumentRecord] = {}
        self._chunks: dict[int, ChunkRecord] = {}
        self._next_chunk = 1

    def _all_tasks(self) -> list[Task]:
        raise NotImplementedError

    # -- sessions

    def _live_session(self, tenant: str, sid: str, ttl_s: float, now: float) -> Session:
        s = self._sessions.get((tenant, sid))
        if s is None or s.expires_at <= now:
            s = Session(id=sid, tenant=tenant, created_at=now, updated_at=now, expires_at=now + ttl_s)
            self._sessions[(tenant, sid)] = s
        s.updated_at = now
        s.expires_at = now + ttl_s
        return s

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[SessionTurn], ttl_s: float, now: float
    ) -> Session:
        s = self._live_session(tenant, session_id, ttl_s, now)
        seq = s.turns[-1].seq + 1 if s.turns else 1
        for t in turns:
            s.turns.append(replace(t, seq=seq, at=t.at or now, metadata=copy.deepcopy(t.metadata)))
            seq += 1
        return copy.deepcopy(s)

    async def set_session_context(
        self, tenant: str, session_id: str, context: dict[str, Any], ttl_s: float, now: float
    ) -> Session:
        s = self._live_session(tenant, session_id, ttl_s, now)
        s.context = copy.deepcopy(context)
        return copy.deepcopy(s)

    async def get_session(self, tenant: str, session_id: str, now: float, *, last: int | None = None) -> Session | None:
        s = self._sessions.get((tenant, session_id))
        if s is None or s.expires_at <= now:
            return None
        out = copy.deepcopy(s)
        if last is not None:
            out.turns = out.turns[-last:] if last else []
        return out

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        return self._sessions.pop((tenant, session_id), None) is not None

    async def sweep_sessions(self, now: float) -> int:
        gone = [k for k, s in self._sessions.items() if s.expires_at <= now]
        for k in gone:
            del self._sessions[k]
        return len(gone)

    # -- documents

    async def save_document(self, doc: DocumentRecord, now: float) -> DocumentRecord:
        old = self._documents.get(doc.id)
        stored = replace(copy.deepcopy(doc), created_at=old.created_at if old else (doc.created_at or now))
        stored.updated_at = now
        self._documents[doc.id] = stored
        return copy.deepcopy(stored)

    async def get_document(self, tenant: str, document_id: str, now: float | None = None) -> DocumentRecord | None:
        d = self._documents.get(document_id)
        return copy.deepcopy(live(d, now)) if d is not None and d.tenant == tenant else None

    async def list_documents(self, tenant: str, now: float, *, limit: int = 100) -> list[DocumentRecord]:
        docs = [d for d in self._documents.values() if d.tenant == tenant and _alive(d.expires_at, now)]
        docs.sort(key=lambda d: d.created_at, reverse=True)
        return copy.deepcopy(docs[:limit])

    async def delete_document(self, tenant: str, document_id: str) -> bool:
        d = self._documents.get(document_id)
        if d is None or d.tenant != tenant:
            return False
        del self._documents[document_id]
        for cid in [cid for cid, c in self._chunks.items() if c.document_id == document_id]:
            del self._chunks[cid]
        return True

    # -- chunks

    @staticmethod
    def _identity(c: ChunkRecord) -> tuple[str, str, int, int, str]:
        return (c.document_id, c.space, c.page, c.start, c.content_hash)

    async def add_chunks(self, chunks: Sequence[ChunkRecord], now: float) -> list[int]:
        known = {self._identity(c): cid for cid, c in self._chunks.items()}
        ids: list[int] = []
        for c in chunks:
            if c.document_id not in self._documents:
                raise KeyError(f"no document {c.document_id}")
            cid = known.get(self._identity(c))
            if cid is None:
                cid = self._next_chunk
                self._next_chunk += 1
                stored = replace(c, id=cid, created_at=c.created_at or now)
                stored.vector = np.asarray(c.vector, dtype=np.float32).copy()
                self._chunks[cid] = stored
                known[self._identity(c)] = cid
            ids.append(cid)
        return ids

    async def search_chunks(
        self,
        space: str,
        vector: Any,
        k: int,
        *,
        tenant: str,
        now: float,
        documents: Sequence[str] | None = None,
    ) -> list[ChunkHit]:
        wanted = None if documents is None else set(documents)
        pool = [
            c
            for c in self._chunks.values()
            if c.space == space
            and c.tenant == tenant
            and _alive(c.expires_at, now)
            and (wanted is None or c.document_id in wanted)
        ]
        if not pool:
            return []
        q = np.asarray(vector, dtype=np.float32)
        scores = np.stack([c.vector for c in pool]) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return [ChunkHit(chunk=replace(pool[i], vector=None), score=float(scores[i])) for i in order]

    async def chunk_count(self, space: str, *, tenant: str | None = None, now: float | None = None) -> int:
        return sum(
            1
            for c in self._chunks.values()
            if c.space == space
            and (tenant is None or c.tenant == tenant)
            and (now is None or _alive(c.expires_at, now))
        )

    async def spaces(self, now: float) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self._chunks.values():
            if _alive(c.expires_at, now):
                out[c.space] = out.get(c.space, 0) + 1
        return out

    async def document_chunks(self, tenant: str, document_id: str, space: str, now: float) -> list[ChunkRecord]:
        found = [
            replace(c, vector=None)
            for cid, c in sorted(self._chunks.items())
            if c.tenant == tenant and c.document_id == document_id and c.space == space and _alive(c.expires_at, now)
        ]
        return sorted(found, key=lambda c: (c.page, c.start, c.id))

    async def chunks_to_reindex(self, source: str, target: str, limit: int, now: float) -> list[ChunkRecord]:
        done = {(c.document_id, c.page, c.start, c.content_hash) for c in self._chunks.values() if c.space == target}
        todo = [
            replace(c, vector=None)
            for cid, c in sorted(self._chunks.items())
            if c.space == source
            and _alive(c.expires_at, now)
            and (c.document_id, c.page, c.start, c.content_hash) not in done
        ]
        return todo[:limit]

    async def drop_space(self, space: str) -> int:
        gone = [cid for cid, c in self._chunks.items() if c.space == space]
        for cid in gone:
            del self._chunks[cid]
        return len(gone)

    async def sweep_chunks(self, now: float) -> int:
        dead_docs = {d for d, doc in self._documents.items() if not _alive(doc.expires_at, now)}
        gone = [cid for cid, c in self._chunks.items() if not _alive(c.expires_at, now) or c.document_id in dead_docs]
        for cid in gone:
            del self._chunks[cid]
        for d in dead_docs:
            del self._documents[d]
        return len(gone)

    # -- result cache

    async def cached_result(self, tenant: str, key: str, not_before: float) -> Task | None:
        hits = [
            t
            for t in self._all_tasks()
            if t.tenant == tenant
            and t.cache_key == key
            and t.status is TaskStatus.succeeded
            and (t.finished_at or 0) >= not_before
        ]
        hits.sort(key=lambda t: t.finished_at or 0)
        return copy.deepcopy(hits[-1]) if hits else None
