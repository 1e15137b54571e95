"""The memory tiers of the SQLite store: sessions, documents, embedded chunks and the result cache.

Chunks, their metadata and their vectors are durable rows in SQLite; the vector *index* is a cache in this
process (:class:`keel.memory.vectors.VectorIndex`, one per embedding space), built from those rows on the
first search of a space and kept in step with every write this process makes. The embedded runtime owns its
data directory alone (``keel.lock``), so no other process writes behind the index's back.

Expired rows are never returned, whether or not the sweeper has run yet: every read filters on
``expires_at > now``; the sweeper only reclaims the space.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from keel.backends import rows
from keel.backends.rows import CHUNK_COLS as _CHUNK_COLS
from keel.backends.rows import chunk_of as _chunk
from keel.backends.rows import document_of as _document
from keel.memory.types import (
    ChunkHit,
    ChunkRecord,
    DocumentRecord,
    Session,
    SessionTurn,
    Task,
    live,
)
from keel.memory.vectors import VectorIndex

T = TypeVar("T")
log = logging.getLogger("keel.memory")
_IN_BATCH = 500  # ids per `IN (...)` list: far under SQLite's variable limit

MEMORY_MIGRATION = """
    ALTER TABLE tasks ADD COLUMN cache_key TEXT;
    CREATE INDEX tasks_by_cache_key ON tasks(tenant, cache_key, finished_at) WHERE cache_key IS NOT NULL;
    CREATE TABLE sessions (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        context TEXT NOT NULL DEFAULT '{}',
        next_seq INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE INDEX sessions_expiry ON sessions(expires_at);
    CREATE TABLE session_turns (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        at REAL NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (tenant, session_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE documents (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        media_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        status TEXT NOT NULL,
        pages INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        space TEXT,
        warnings TEXT NOT NULL,
        errors TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE INDEX documents_by_tenant ON documents(tenant, created_at);
    CREATE INDEX documents_expiry ON documents(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        tenant TEXT NOT NULL,
        space TEXT NOT NULL,
        page INTEGER NOT NULL,
        char_start INTEGER NOT NULL,
        char_end INTEGER NOT NULL,
        text TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        vector BLOB NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE UNIQUE INDEX chunks_unique ON chunks(document_id, space, page, char_start, content_hash);
    CREATE INDEX chunks_by_space ON chunks(space, id);
    CREATE INDEX chunks_by_document ON chunks(document_id);
    CREATE INDEX chunks_expiry ON chunks(expires_at) WHERE expires_at IS NOT NULL
"""


def _vector_bytes(vector: Any) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _batches(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _IN_BATCH):
        yield ids[i : i + _IN_BATCH]


def _alive(now: float) -> tuple[str, tuple[float]]:
    return "(expires_at IS NULL OR expires_at > ?)", (now,)


class SQLiteMemory:
    """Mixed into :class:`keel.backends.sqlite.SQLiteStore`, which provides the writer queue and reader pool."""

    _readers: ThreadPoolExecutor
    path: Path
    hnsw_threshold = 50_000
    """Vectors in a space above which its index is an HNSW graph rather than exact search."""

    def _memory_init(self) -> None:
        self._indexes: dict[str, VectorIndex] = {}
        self._index_locks: dict[str, threading.Lock] = {}
        self._index_guard = threading.Lock()

    # Provided by SQLiteStore.
    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    def _conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    @staticmethod
    def _get(conn: sqlite3.Connection, task_id: str) -> Task | None:
        raise NotImplementedError

    # -- sessions -----------------------------------------------------------------------------------------

    @staticmethod
    def _load_session(conn: sqlite3.Connection, tenant: str, sid: str, last: int | None) -> Session | None:
        row = conn.execute("SELECT * FROM sessions WHERE tenant = ? AND id = ?", (tenant, sid)).fetchone()
        if row is None:
            return None
        if last is None:
            turns = conn.execute(
                "SELECT * FROM session_turns WHERE tenant = ? AND session_id = ? ORDER BY seq", (tenant, sid)
            ).fetchall()
        else:
            turns = conn.execute(
                "SELECT * FROM (SELECT * FROM session_turns WHERE tenant = ? AND session_id = ? "
                "ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (tenant, sid, last),
            ).fetchall()
        return rows.session_of(row, turns)

    @staticmethod
    def _drop_session(conn: sqlite3.Connection, tenant: str, sid: str) -> bool:
        conn.execute("DELETE FROM session_turns WHERE tenant = ? AND session_id = ?", (tenant, sid))
        return conn.execute("DELETE FROM sessions WHERE tenant = ? AND id = ?", (tenant, sid)).rowcount > 0

    @staticmethod
    def _touch_session(conn: sqlite3.Connection, tenant: str, sid: str, ttl_s: float, now: float) -> int:
        """Make sure a live session row exists (an expired one starts afresh); return its next turn number."""
        row = conn.execute(
            "SELECT expires_at, next_seq FROM sessions WHERE tenant = ? AND id = ?", (tenant, sid)
        ).fetchone()
        if row is not None and row["expires_at"] <= now:
            SQLiteMemory._drop_session(conn, tenant, sid)
            row = None
        if row is None:
            conn.execute(
                "INSERT INTO sessions(tenant, id, created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (tenant, sid, now, now, now + ttl_s),
            )
            return 1
        conn.execute(
            "UPDATE sessions SET updated_at = ?, expires_at = ? WHERE tenant = ? AND id = ?",
            (now, now + ttl_s, tenant, sid),
        )
        return int(row["next_seq"])

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[SessionTurn], ttl_s: float, now: float
    ) -> Session:
        def op(conn: sqlite3.Connection) -> Session:
            seq = self._touch_session(conn, tenant, session_id, ttl_s, now)
            for turn in turns:
                conn.execute(
                    "INSERT INTO session_turns(tenant, session_id, seq, role, content, at, metadata) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tenant, session_id, seq, turn.role, turn.content, turn.at or now, json.dumps(turn.metadata)),
                )
                seq += 1
            conn.execute("UPDATE sessions SET next_seq = ? WHERE tenant = ? AND id = ?", (seq, tenant, session_id))
            session = self._load_session(conn, tenant, session_id, None)
            assert session is not None
            return session

        return await self._write(op)

    async def set_session_context(
        self, tenant: str, session_id: str, context: dict[str, Any], ttl_s: float, now: float
    ) -> Session:
        def op(conn: sqlite3.Connection) -> Session:
            self._touch_session(conn, tenant, session_id, ttl_s, now)
            conn.execute(
                "UPDATE sessions SET context = ? WHERE tenant = ? AND id = ?",
                (json.dumps(context), tenant, session_id),
            )
            session = self._load_session(conn, tenant, session_id, None)
            assert session is not None
            return session

        return await self._write(op)

    async def get_session(self, tenant: str, session_id: str, now: float, *, last: int | None = None) -> Session | None:
        def op(conn: sqlite3.Connection) -> Session | None:
            session = self._load_session(conn, tenant, session_id, last)
            return session if session is not None and session.expires_at > now else None

        return await self._read(op)

    async def delete_session(self, tenant: str, session_id: str) -> bool:
        return await self._write(lambda conn: self._drop_session(conn, tenant, session_id))

    async def sweep_sessions(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM session_turns WHERE (tenant, session_id) IN "
                "(SELECT tenant, id FROM sessions WHERE expires_at <= ?)",
                (now,),
            )
            return conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount

        return await self._write(op)

    # -- documents ----------------------------------------------------------------------------------------

    async def save_document(self, doc: DocumentRecord, now: float) -> DocumentRecord:
        def op(conn: sqlite3.Connection) -> DocumentRecord:
            conn.execute(
                f"INSERT INTO documents{rows.values(rows.DOCUMENT_INSERT, '?')} "
                f"ON CONFLICT(id) DO UPDATE SET {rows.DOCUMENT_UPDATE}",
                rows.document_params(doc, now),
            )
            row = conn.execute("SELECT * FROM documents WHERE id = ?", (doc.id,)).fetchone()
            return _document(row)

        return await self._write(op)

    async def get_document(self, tenant: str, document_id: str, now: float | None = None) -> DocumentRecord | None:
        def op(conn: sqlite3.Connection) -> DocumentRecord | None:
            row = conn.execute("SELECT * FROM documents WHERE id = ? AND tenant = ?", (document_id, tenant)).fetchone()
            return live(_document(row), now) if row else None

        return await self._read(op)

    async def list_documents(self, tenant: str, now: float, *, limit: int = 100) -> list[DocumentRecord]:
        def op(conn: sqlite3.Connection) -> list[DocumentRecord]:
            alive, args = _alive(now)
            found = conn.execute(
                f"SELECT * FROM documents WHERE tenant = ? AND {alive} ORDER BY created_at DESC LIMIT ?",
                (tenant, *args, limit),
            ).fetchall()
            return [_document(r) for r in found]

        return await self._read(op)

    async def delete_document(self, tenant: str, document_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> tuple[bool, list[tuple[str, int]]]:
            gone = [
                (r["space"], r["id"])
                for r in conn.execute("SELECT space, id FROM chunks WHERE document_id = ?", (document_id,))
            ]
            n = conn.execute("DELETE FROM documents WHERE id = ? AND tenant = ?", (document_id, tenant)).rowcount
            return n > 0, gone if n else []

        found, gone = await self._write(op)
        self._unindex(gone)
        return found

    # -- chunks and vectors -------------------------------------------------------------------------------

    def _space_lock(self, space: str) -> threading.Lock:
        with self._index_guard:
            return self._index_locks.setdefault(space, threading.Lock())

    def _unindex(self, gone: Sequence[tuple[str, int]]) -> None:
        by_space: dict[str, list[int]] = {}
        for space, cid in gone:
            by_space.setdefault(space, []).append(cid)
        for space, ids in by_space.items():
            with self._space_lock(space):
                index = self._indexes.get(space)
                if index is not None:
                    index.remove(ids)

    async def add_chunks(self, chunks: Sequence[ChunkRecord], now: float) -> list[int]:
        if not chunks:
            return []
        params = [rows.chunk_params(c, _vector_bytes(c.vector), now) for c in chunks]
        insert = (
            f"INSERT INTO chunks{rows.values(rows.CHUNK_INSERT.format(vector='vector'), '?')} "
            "ON CONFLICT(document_id, space, page, char_start, content_hash) DO NOTHING"
        )

        def op(conn: sqlite3.Connection) -> tuple[list[int], list[int]]:
            ids: list[int] = []
            fresh: list[int] = []
            for c, args in zip(chunks, params, strict=True):
                cur = conn.execute(insert, args)
                if cur.rowcount:
                    ids.append(int(cur.lastrowid or 0))
                    fresh.append(len(ids) - 1)
                else:
                    row = conn.execute(
                        f"SELECT id FROM chunks WHERE {rows.CHUNK_IDENTITY.format('?')}", rows.chunk_identity(c)
                    ).fetchone()
                    ids.append(int(row["id"]))
            return ids, fresh

        ids, fresh = await self._write(op)
        if fresh:
            by_space: dict[str, list[int]] = {}
            for i in fresh:
                by_space.setdefault(chunks[i].space, []).append(i)
            for space, positions in by_space.items():
                new_ids = np.array([ids[i] for i in positions], dtype=np.int64)
                vectors = np.stack([np.asarray(chunks[i].vector, dtype=np.float32) for i in positions])
                await self._index_add(space, new_ids, vectors)
        return ids

    async def _index_add(self, space: str, ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        def add() -> None:
            # Under the space's lock, and only once the rows are committed: a load that read the table before
            # this commit registers its index first, and this add then lands in it (see _index_for).
            with self._space_lock(space):
                index = self._indexes.get(space)
                if index is not None:
                    index.add(ids, vectors)

        await self._run(add)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn)

    def _index_for(self, space: str) -> VectorIndex | None:
        """The space's index, built from its committed rows on first use (in a reader thread); None while the
        space has no rows (an index needs its dimension, which the first row gives)."""
        index = self._indexes.get(space)
        if index is not None:
            return index
        with self._space_lock(space):
            index = self._indexes.get(space)
            if index is not None:
                return index
            index = self._saved_index(space)  # checked first: it spares reading every vector
            if index is None:
                ids, matrix = self._read_vectors(space)
                if not len(ids):
                    return None
                index = VectorIndex(matrix.shape[1], hnsw_threshold=self.hnsw_threshold)
                index.add(ids, matrix)
            self._indexes[space] = index
            return index

    def _read_vectors(self, space: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Every (id, vector) of the space, read in blocks so that 1M rows never sit in memory as Python bytes."""
        id_blocks: list[npt.NDArray[np.int64]] = []
        blocks: list[npt.NDArray[np.float32]] = []
        cursor = self._conn().execute("SELECT id, vector FROM chunks WHERE space = ? ORDER BY id", (space,))
        while rows := cursor.fetchmany(8192):
            id_blocks.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
            flat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
            blocks.append(flat.reshape(len(rows), -1).astype(np.float32))
        if not blocks:
            return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
        return np.concatenate(id_blocks), np.concatenate(blocks)

    # A large space's HNSW graph takes minutes to build (about 4 at 1M vectors), so it is saved on close and
    # loaded on the next start when the rows it was built from are still exactly the rows in the table.

    def _index_file(self, space: str) -> Path:
        return self.path.parent / "vectors" / (hashlib.sha256(space.encode()).hexdigest()[:24] + ".kvi")

    def _rows_fingerprint(self, space: str) -> list[int]:
        row = (
            self._conn()
            .execute(
                "SELECT count(*), coalesce(max(id), 0), coalesce(sum(id), 0) FROM chunks WHERE space = ?", (space,)
            )
            .fetchone()
        )
        return [int(row[0]), int(row[1]), int(row[2])]

    def _saved_index(self, space: str) -> VectorIndex | None:
        path = self._index_file(space)
        meta = path.with_suffix(".json")
        try:
            saved = json.loads(meta.read_text())
            if saved.get("space") != space or saved.get("rows") != self._rows_fingerprint(space):
                return None
            index = VectorIndex.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the saved vector index of %s (%s); rebuilding it", space, exc)
            return None
        log.info("loaded the saved vector index of %s (%d vectors)", space, len(index))
        return index

    def _save_indexes(self) -> None:
        for space, index in list(self._indexes.items()):
            if index.kind != "hnsw":
                continue  # an exact index rebuilds from the table in a moment
            path = self._index_file(space)
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._space_lock(space):
                index.save(path)
                fingerprint = self._rows_fingerprint(space)
            path.with_suffix(".json").write_text(json.dumps({"space": space, "rows": fingerprint}))

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
        query = np.asarray(vector, dtype=np.float32)

        def op() -> list[ChunkHit]:
            index = self._index_for(space)
            if index is None:
                return []
            conn = self._conn()
            alive, alive_args = _alive(now)
            if documents is not None:
                # A search within a few documents (the usual case for a task): their live chunk ids are a small
                # set, so candidates are checked against it with one vectorised lookup.
                if not documents:
                    return []
                marks = ",".join("?" * len(documents))
                allowed = np.fromiter(
                    (
                        r[0]
                        for r in conn.execute(
                            f"SELECT id FROM chunks WHERE document_id IN ({marks}) AND space = ? AND tenant = ? "
                            f"AND {alive}",
                            (*documents, space, tenant, *alive_args),
                        )
                    ),
                    dtype=np.int64,
                )
                if not len(allowed):
                    return []

                def accept(candidates: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
                    return np.isin(candidates, allowed)

            else:

                def accept(candidates: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
                    ok: set[int] = set()
                    for batch in _batches([int(c) for c in candidates]):
                        ok.update(
                            r[0]
                            for r in conn.execute(
                                f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(batch))}) AND space = ? "
                                f"AND tenant = ? AND {alive}",
                                (*batch, space, tenant, *alive_args),
                            )
                        )
                    return np.fromiter((int(c) in ok for c in candidates), dtype=np.bool_, count=len(candidates))

            found = index.search(query, k, accept=accept)
            if not found:
                return []
            ids = [cid for cid, _ in found]
            by_id = {
                r["id"]: r
                for r in conn.execute(
                    f"SELECT {_CHUNK_COLS} FROM chunks WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)
                )
            }
            return [ChunkHit(chunk=_chunk(by_id[cid]), score=float(score)) for cid, score in found if cid in by_id]

        return await self._run(op)

    async def chunk_count(self, space: str, *, tenant: str | None = None, now: float | None = None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            sql = "SELECT count(*) FROM chunks WHERE space = ?"
            args: list[Any] = [space]
            if tenant is not None:
                sql += " AND tenant = ?"
                args.append(tenant)
            if now is not None:
                sql += " AND (expires_at IS NULL OR expires_at > ?)"
                args.append(now)
            return int(conn.execute(sql, args).fetchone()[0])

        return await self._read(op)

    async def spaces(self, now: float) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            alive, args = _alive(now)
            found = conn.execute(f"SELECT space, count(*) FROM chunks WHERE {alive} GROUP BY space", args)
            return {r[0]: int(r[1]) for r in found}

        return await self._read(op)

    async def document_chunks(self, tenant: str, document_id: str, space: str, now: float) -> list[ChunkRecord]:
        def op(conn: sqlite3.Connection) -> list[ChunkRecord]:
            alive, args = _alive(now)
            found = conn.execute(
                f"SELECT {_CHUNK_COLS} FROM chunks WHERE tenant = ? AND document_id = ? AND space = ? AND {alive} "
                "ORDER BY page, char_start, id",
                (tenant, document_id, space, *args),
            ).fetchall()
            return [_chunk(r) for r in found]

        return await self._read(op)

    async def chunks_to_reindex(self, source: str, target: str, limit: int, now: float) -> list[ChunkRecord]:
        def op(conn: sqlite3.Connection) -> list[ChunkRecord]:
            alive, args = _alive(now)
            found = conn.execute(
                f"SELECT {_CHUNK_COLS} FROM chunks s WHERE space = ? AND {alive} AND NOT EXISTS ("
                "SELECT 1 FROM chunks t WHERE t.space = ? AND t.document_id = s.document_id AND t.page = s.page "
                "AND t.char_start = s.char_start AND t.content_hash = s.content_hash) ORDER BY id LIMIT ?",
                (source, *args, target, limit),
            ).fetchall()
            return [_chunk(r) for r in found]

        return await self._read(op)

    async def drop_space(self, space: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM chunks WHERE space = ?", (space,)).rowcount

        n = await self._write(op)
        with self._space_lock(space):
            self._indexes.pop(space, None)
        return n

    async def sweep_chunks(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            gone = [
                (r[0], r[1])
                for r in conn.execute(
                    "SELECT space, id FROM chunks WHERE (expires_at IS NOT NULL AND expires_at <= ?) OR document_id "
                    "IN (SELECT id FROM documents WHERE expires_at IS NOT NULL AND expires_at <= ?)",
                    (now, now),
                )
            ]
            conn.execute("DELETE FROM chunks WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            conn.execute("DELETE FROM documents WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            return gone

        gone = await self._write(op)
        if gone:
            await self._run(lambda: self._unindex(gone))
        return len(gone)

    # -- result cache -------------------------------------------------------------------------------------

    async def cached_result(self, tenant: str, key: str, not_before: float) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(
                "SELECT id FROM tasks WHERE tenant = ? AND cache_key = ? AND status = 'succeeded' "
                "AND finished_at >= ? ORDER BY finished_at DESC LIMIT 1",
                (tenant, key, not_before),
            ).fetchone()
            return None if row is None else self._get(conn, row[0])

        return await self._read(op)
