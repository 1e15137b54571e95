"""In-process nearest-neighbour index over one embedding space.

A `VectorIndex` holds the vectors of one embedding model version, keyed by chunk row id. Below `hnsw_threshold`
vectors it searches exactly (one matrix-vector product); once it grows past that it builds a faiss HNSW graph
(`faiss.IndexHNSWFlat`, inner product over the L2-normalised vectors) and searches that, which keeps a top-10 query
around a millisecond at 1M x 384 where the exact product takes ~100 ms.

faiss, not usearch: the usearch wheel statically links libstdc++ and exports its symbols, and once it is imported
llama.cpp (the embedded local LLM, same process) fails to load any model with
``error loading model vocabulary: std::bad_cast``. This module must never import usearch.

The raw float32 matrix is kept in both modes. It is the source of truth (id -> row, swap-with-last removal, save/load),
it lets HNSW results be re-scored with exactly the same arithmetic as exact mode (so both modes give bit-identical
scores), it bounds the cost of the exact fallback under a strict `accept` filter to one matrix-vector product, and the
graph is (re)built from it. It costs `4 * dim` bytes per vector (1.46 GB at 1M x 384); the faiss graph keeps its own
copy of the vectors plus `2 * M` int32 links per vector on level 0 (about 1.6 GB more at 1M x 384, M=16).

faiss HNSW cannot delete vectors. Graph labels are sequential insertion positions; `label -> row` (or -1) says which
labels are live, and a removed or replaced id *tombstones* its old label. Searches exclude tombstones inside faiss with
an `IDSelectorBitmap` over the live labels (the bitmap is updated in place when tombstones change; no selector at all
while there are none). When tombstones exceed 20% of the graph, a background thread rebuilds the graph from the raw
matrix and switches it in.

Every method is safe to call from several threads at once: writers (`add`, `remove`) are exclusive, readers
(`search`, `save`, `len`, `in`) share a lock; concurrent faiss searches on one index are read-only and release the GIL.
Graph builds (the `add` that crosses the threshold, and tombstone compaction) work on a snapshot *outside* the lock:
other threads keep searching (the old graph, or exactly) and writing meanwhile, and the rows written meanwhile are
reconciled onto the new graph (stale labels tombstoned, new vectors added) before it is switched in. faiss uses
OpenMP for bulk adds, with all cores by default (`OMP_NUM_THREADS` is honoured); the process-wide OpenMP setting is
left alone, and single-query searches do not enter a parallel region anyway.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

__all__ = ["VectorIndex"]

Kind = Literal["exact", "hnsw"]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Accept = Callable[[I64], npt.ArrayLike]

# faiss 1.15 ships type stubs, but they lack `SearchParametersHNSW` and give `IDSelectorBitmap` a signature its Python
# wrapper does not accept (it takes the bitmap array alone); those two go through this untyped alias.
_faiss_untyped: Any = faiss

_MAGIC = b"KEELVIX1"
_FORMAT_VERSION = 2  # 1: usearch graph (its graph is ignored on load and rebuilt with faiss)
# An HNSW query with `count` wanted results explores max(expansion_search, count) nodes, so widening past a few
# thousand costs as much as the exact product over the accepted set; beyond this we fall back to exact.
_MAX_HNSW_FETCH = 4096
_MAX_ID = 2**63 - 1
# Rebuild the graph in the background once tombstoned labels exceed this share of it (and this many).
_COMPACT_RATIO = 0.2
_COMPACT_MIN = 256


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Graph:
    """A faiss HNSW graph plus its tombstones. Label `l` (insertion position) holds the vector of row `label_row[l]`,
    or is dead when that is -1. `bits` mirrors `label_row >= 0` (LSB-first, as `faiss.IDSelectorBitmap` reads it).
    Callers serialise writes against searches (the index's RW lock), so both arrays are updated in place."""

    def __init__(self, index: Any, rows: I64) -> None:
        self.index = index
        self.ntotal = int(index.ntotal)
        assert len(rows) == self.ntotal
        cap = max(self.ntotal, 1024)
        self.label_row: I64 = np.full(cap, -1, np.int64)
        self.label_row[: self.ntotal] = rows
        live = rows >= 0
        self.dead = int(self.ntotal - np.count_nonzero(live))
        self.bits: U8 = np.zeros((cap + 7) // 8, np.uint8)
        packed = np.packbits(live, bitorder="little")
        self.bits[: len(packed)] = packed
        self.selector: Any = _faiss_untyped.IDSelectorBitmap(self.bits)  # keeps a reference to `bits`

    @classmethod
    def build(cls, dim: int, m: int, ef_add: int, vectors: F32, rows: I64) -> _Graph:
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_add
        if len(vectors):
            index.add(vectors)  # OpenMP: all cores
        return cls(index, rows)

    def add(self, vectors: F32, rows: I64) -> I64:
        """Insert `vectors` (for `rows`); returns their labels."""
        lo, hi = self.ntotal, self.ntotal + len(rows)
        if hi > len(self.label_row):
            cap = max(hi, len(self.label_row) * 3 // 2)
            label_row = np.full(cap, -1, np.int64)
            label_row[:lo] = self.label_row[:lo]
            bits = np.zeros((cap + 7) // 8, np.uint8)
            bits[: len(self.bits)] = self.bits
            self.label_row, self.bits = label_row, bits
            self.selector = _faiss_untyped.IDSelectorBitmap(self.bits)
        self.index.add(vectors)
        self.ntotal = hi
        labels = np.arange(lo, hi, dtype=np.int64)
        self.label_row[labels] = rows
        np.bitwise_or.at(self.bits, labels >> 3, (1 << (labels & 7)).astype(np.uint8))
        return labels

    def kill(self, labels: I64) -> None:
        """Tombstone `labels` (distinct and live)."""
        if len(labels):
            assert labels.min() >= 0 and (self.label_row[labels] >= 0).all(), "tombstoning a dead label"
            self.label_row[labels] = -1
            np.bitwise_and.at(self.bits, labels >> 3, ~(1 << (labels & 7)).astype(np.uint8))
            self.dead += len(labels)

    def search(self, q: F32, fetch: int, ef: int) -> I64:
        """Rows of up to `fetch` live vectors nearest `q` (by faiss's own inner product), best first."""
        params = _faiss_untyped.SearchParametersHNSW(sel=self.selector if self.dead else None, efSearch=ef)
        _, labels = self.index.search(q[None, :], fetch, params=params)
        found: I64 = labels[0]
        rows = self.label_row[found[found >= 0]]
        out: I64 = rows[rows >= 0]
        return out

    def wants_compaction(self) -> bool:
        return self.dead >= _COMPACT_MIN and self.dead > _COMPACT_RATIO * self.ntotal


class VectorIndex:
    """In-process index over one embedding space. Ids are int64 (chunk row ids). Vectors are float32, L2-normalised;
    scores are cosine similarities (higher is better).

    Args:
        dim: dimensionality of every vector and query.
        hnsw_threshold: once the index holds this many vectors it builds an HNSW graph and searches that; it stays
            HNSW afterwards even if removals shrink it (rebuilding both ways would thrash around the threshold).
        connectivity: HNSW edges per node, faiss's `M` (`IndexHNSWFlat(dim, M, METRIC_INNER_PRODUCT)`).
        expansion_add: HNSW beam width while inserting, faiss's `hnsw.efConstruction`.
        expansion_search: HNSW beam width while searching, faiss's `efSearch` (a search for `n` results explores
            `max(efSearch, n)`).
    """

    def __init__(
        self,
        dim: int,
        *,
        hnsw_threshold: int = 50_000,
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 128,
    ) -> None:
        for name, value in (
            ("dim", dim),
            ("hnsw_threshold", hnsw_threshold),
            ("connectivity", connectivity),
            ("expansion_add", expansion_add),
            ("expansion_search", expansion_search),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VectorIndex: {name} must be a positive int, got {value!r}")
        self._dim = dim
        self._threshold = hnsw_threshold
        self._connectivity = connectivity
        self._expansion_add = expansion_add
        self._expansion_search = expansion_search
        self._lock = _RWLock()
        # Exact store (kept in both modes): rows [0, _n) of _matrix hold the vectors of _ids[:_n].
        self._matrix: F32 = np.empty((0, dim), np.float32)
        self._ids: I64 = np.empty(0, np.int64)
        self._rows: dict[int, int] = {}
        self._n = 0
        # HNSW mode: the live graph, and per row the graph label holding that row's current vector.
        self._graph: _Graph | None = None
        self._row_label: I64 = np.empty(0, np.int64)
        # While a graph is being built outside the lock: per row its label in the new graph (= its snapshot row), or
        # -1 once the row was written after the snapshot (so it must be added to the new graph before the switch).
        self._pending_label: I64 | None = None
        self._compactor: threading.Thread | None = None

    # -- public API ---------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Dimensionality of the space."""
        return self._dim

    @property
    def kind(self) -> Kind:
        """ "exact" until the HNSW graph has been built and switched in, "hnsw" afterwards."""
        return "exact" if self._graph is None else "hnsw"

    def __len__(self) -> int:
        with self._lock.read():
            return self._n

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, int | np.integer):
            return False
        with self._lock.read():
            return int(id) in self._rows

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add `vectors` (shape (n, dim), any float dtype; normalised here) under `ids` (n distinct ints in
        [0, 2**63)). Re-adding an existing id replaces its vector. A bad batch raises ValueError and changes nothing.

        The call that takes the index past `hnsw_threshold` also builds the HNSW graph, which takes a while
        (seconds at 50k x 384 on 2 cores); other threads are not blocked during that build.
        """
        id_arr, vecs = self._check_batch(ids, vectors)
        if not len(id_arr):
            return
        snapshot: F32 | None = None
        with self._lock.write():
            rows, replaced = self._put_rows(id_arr, vecs)
            graph = self._graph
            if graph is not None:
                graph.kill(self._row_label[rows[replaced]])
                self._row_label[rows] = graph.add(vecs, rows)
                self._maybe_compact(graph)
            elif self._pending_label is None and self._n >= self._threshold:
                snapshot = self._start_build()
        if snapshot is not None:
            self._build(snapshot)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove `ids`; ids that are absent are ignored. Returns how many were present."""
        id_arr = _as_id_array(ids)
        with self._lock.write():
            graph = self._graph
            dead: list[int] = []
            removed = 0
            for i in map(int, id_arr):
                label = self._drop_row(i)
                if label is not None:
                    removed += 1
                    dead.append(label)
            if graph is not None and dead:
                graph.kill(np.asarray(dead, np.int64))
                self._maybe_compact(graph)
            return removed

    def search(self, query: npt.ArrayLike, k: int, *, accept: Accept | None = None) -> list[tuple[int, float]]:
        """The `k` ids nearest to `query` (shape (dim,)) as (id, cosine similarity), best first.

        `accept`, if given, receives an int64 array of candidate ids and returns a boolean mask of the same length;
        only accepted ids are returned. The search over-fetches and widens until it has `k` accepted hits, then falls
        back to an exact scan of the accepted set, so it returns fewer than `k` only when fewer are accepted.
        It should be vectorised (e.g. `np.isin` or a boolean lookup table): the fallback calls it on every id once.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"VectorIndex.search: k must be a positive int, got {k!r}")
        q = self._check_query(query)
        with self._lock.read():
            if not self._n:
                return []
            if self._graph is None:
                rows = self._search_exact(q, int(k), accept)
            else:
                rows = self._search_hnsw(self._graph, q, int(k), accept)
            scores = self._matrix[rows] @ q
            return [(int(i), float(s)) for i, s in zip(self._ids[rows], scores, strict=True)]

    def save(self, path: Path) -> None:
        """Write the index (ids, vectors, settings and, in HNSW mode, the graph and its tombstones) to one file at
        `path`, atomically (a temporary file in the same directory, fsynced, then renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with self._lock.read():
                n, graph = self._n, self._graph
                header: dict[str, Any] = {
                    "version": _FORMAT_VERSION,
                    "kind": self.kind,
                    "dim": self._dim,
                    "count": n,
                    "hnsw_threshold": self._threshold,
                    "connectivity": self._connectivity,
                    "expansion_add": self._expansion_add,
                    "expansion_search": self._expansion_search,
                    "graph_bytes": 0,
                    "graph_labels": 0,
                }
                tmp.write_bytes(b"")
                if graph is not None:
                    # faiss writes the graph from offset 0 (and reads it back from there); our sections follow.
                    faiss.write_index(graph.index, os.fspath(tmp))
                    header["graph_bytes"] = tmp.stat().st_size
                    header["graph_labels"] = graph.ntotal
                with open(tmp, "ab") as f:
                    self._ids[:n].tofile(f)
                    if graph is not None:
                        self._row_label[:n].tofile(f)
                    self._matrix[:n].tofile(f)
                    blob = json.dumps(header).encode()
                    f.write(blob)
                    f.write(len(blob).to_bytes(8, "little"))
                    f.write(_MAGIC)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        """Restore an index written by `save`: same ids, vectors, kind and settings, so the same search results.
        A version-1 file (usearch graph) loads too; its graph is rebuilt with faiss."""
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 16:
                raise ValueError(f"{path}: not a VectorIndex file (too short)")
            f.seek(size - 16)
            trailer = f.read(16)
            if trailer[8:] != _MAGIC:
                raise ValueError(f"{path}: not a VectorIndex file (bad magic)")
            hlen = int.from_bytes(trailer[:8], "little")
            if hlen > size - 16:
                raise ValueError(f"{path}: truncated or corrupt VectorIndex file")
            f.seek(size - 16 - hlen)
            try:
                header = json.loads(f.read(hlen))
            except ValueError as exc:
                raise ValueError(f"{path}: truncated or corrupt VectorIndex file") from exc
            version = header.get("version") if isinstance(header, dict) else None
            if version not in (1, _FORMAT_VERSION):
                raise ValueError(f"{path}: unsupported VectorIndex format version {version!r}")
            dim, n, graph_bytes = int(header["dim"]), int(header["count"]), int(header["graph_bytes"])
            hnsw = header["kind"] == "hnsw"
            with_labels = hnsw and version == _FORMAT_VERSION
            if graph_bytes + n * (16 if with_labels else 8) + n * dim * 4 + hlen + 16 != size:
                raise ValueError(f"{path}: truncated or corrupt VectorIndex file")
            self = cls(
                dim,
                hnsw_threshold=int(header["hnsw_threshold"]),
                connectivity=int(header["connectivity"]),
                expansion_add=int(header["expansion_add"]),
                expansion_search=int(header["expansion_search"]),
            )
            f.seek(graph_bytes)
            self._ids = np.fromfile(f, np.int64, n)
            row_label = np.fromfile(f, np.int64, n) if with_labels else np.arange(n, dtype=np.int64)
            self._matrix = np.fromfile(f, np.float32, n * dim).reshape(n, dim)
        self._n = n
        self._rows = dict(zip(self._ids.tolist(), range(n), strict=True))
        self._row_label = row_label
        if not hnsw:
            return self
        if not with_labels:  # a usearch graph: rebuild it from the vectors
            self._graph = _Graph.build(dim, self._connectivity, self._expansion_add, self._matrix, row_label)
            return self
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as exc:
            raise ValueError(f"{path}: corrupt HNSW graph in VectorIndex file: {exc}") from exc
        total = int(header["graph_labels"])
        if int(index.ntotal) != total or int(index.d) != dim:
            raise ValueError(f"{path}: graph holds {index.ntotal} x {index.d} vectors, the file lists {total} x {dim}")
        if n and (row_label.min() < 0 or row_label.max() >= total or len(np.unique(row_label)) != n):
            raise ValueError(f"{path}: corrupt graph labels in VectorIndex file")
        label_row = np.full(total, -1, np.int64)
        label_row[row_label] = np.arange(n)
        self._graph = _Graph(index, label_row)
        return self

    # -- internals ------------------------------------------------------------------------------------------------

    def _start_build(self) -> F32:
        """Under the write lock: mark a graph build as in progress and return the snapshot to build it from."""
        n = self._n
        self._pending_label = np.full(len(self._matrix), -1, np.int64)
        self._pending_label[:n] = np.arange(n)
        return self._matrix[:n].copy()

    def _build(self, snapshot: F32) -> None:
        """Build a graph from `snapshot` (row i -> label i) without holding the lock, then reconcile the writes made
        meanwhile and switch it in."""
        try:
            graph = _Graph.build(
                self._dim, self._connectivity, self._expansion_add, snapshot, np.full(len(snapshot), -1, np.int64)
            )
            del snapshot
            with self._lock.write():
                pending = self._pending_label
                assert pending is not None
                n = self._n
                labels = pending[:n]
                kept = labels >= 0
                kept_rows = np.flatnonzero(kept)
                graph.label_row[: graph.ntotal] = -1
                graph.label_row[labels[kept]] = kept_rows
                graph.bits[:] = 0
                packed = np.packbits(graph.label_row[: graph.ntotal] >= 0, bitorder="little")
                graph.bits[: len(packed)] = packed
                graph.dead = graph.ntotal - len(kept_rows)
                fresh = np.flatnonzero(~kept)
                if len(fresh):
                    labels[fresh] = graph.add(self._matrix[fresh], fresh)
                self._row_label = pending
                self._graph = graph
                self._pending_label = None
        except BaseException:
            with self._lock.write():
                self._pending_label = None  # keep the old state; the next write past the trigger tries again
            raise

    def _maybe_compact(self, graph: _Graph) -> None:
        """Under the write lock: start a background rebuild when tombstones have piled up."""
        if self._pending_label is None and graph.wants_compaction():
            snapshot = self._start_build()
            self._compactor = threading.Thread(
                target=self._build, args=(snapshot,), name="keel-vector-compact", daemon=True
            )
            self._compactor.start()

    def _join_compaction(self, timeout: float | None = None) -> None:
        """Wait for a background rebuild, if one is running (for tests and benchmarks)."""
        t = self._compactor
        if t is not None:
            t.join(timeout)

    def _grow(self, need: int) -> None:
        cap = max(need, int(len(self._matrix) * 1.5), 1024)
        n = self._n
        matrix = np.empty((cap, self._dim), np.float32)
        matrix[:n] = self._matrix[:n]
        id_buf = np.empty(cap, np.int64)
        id_buf[:n] = self._ids[:n]
        row_label = np.full(cap, -1, np.int64)
        row_label[:n] = self._row_label[:n]
        self._matrix, self._ids, self._row_label = matrix, id_buf, row_label
        if self._pending_label is not None:
            pending = np.full(cap, -1, np.int64)
            pending[:n] = self._pending_label[:n]
            self._pending_label = pending

    def _put_rows(self, ids: I64, vectors: F32) -> tuple[I64, npt.NDArray[np.bool_]]:
        """Store `vectors` under `ids`; returns their rows and which of them replaced a stored vector."""
        rows = np.fromiter((self._rows.get(i, -1) for i in ids.tolist()), np.int64, len(ids))
        old = rows >= 0
        new = ~old
        m = int(new.sum())
        if m:
            need = self._n + m
            if need > len(self._matrix):
                self._grow(need)
            rows[new] = np.arange(self._n, need)
            self._ids[self._n : need] = ids[new]
            self._rows.update(zip(ids[new].tolist(), range(self._n, need), strict=True))
            self._n = need
        self._matrix[rows] = vectors
        self._row_label[rows[new]] = -1  # replaced rows keep their old label: the caller tombstones it
        if self._pending_label is not None:
            self._pending_label[rows] = -1  # the snapshot's vector (if any) is stale
        return rows, old

    def _drop_row(self, id: int) -> int | None:
        """Drop `id`'s row (swap-with-last); returns its graph label (-1 outside HNSW mode), or None if absent."""
        row = self._rows.pop(id, None)
        if row is None:
            return None
        label = int(self._row_label[row])
        last = self._n - 1
        if row != last:  # swap-with-last keeps the live rows contiguous in O(1)
            moved = int(self._ids[last])
            self._matrix[row] = self._matrix[last]
            self._ids[row] = moved
            self._rows[moved] = row
            moved_label = int(self._row_label[last])
            self._row_label[row] = moved_label
            if self._graph is not None and moved_label >= 0:
                self._graph.label_row[moved_label] = row
            if self._pending_label is not None:
                self._pending_label[row] = self._pending_label[last]
        self._n = last
        return label

    def _search_exact(self, q: F32, k: int, accept: Accept | None) -> I64:
        n = self._n
        scores = self._matrix[:n] @ q
        if accept is None:
            return _top(scores, np.arange(n), k)
        # All scores are at hand; over-fetch so that an expensive `accept` sees few ids, then filter everything.
        fetch = min(n, max(4 * k, 64))
        while fetch < n // 4:
            cand = _top(scores, np.arange(n), fetch)
            hits = cand[_mask(accept, self._ids[cand])]
            if len(hits) >= k:
                return hits[:k]
            fetch *= 4
        ok = np.flatnonzero(_mask(accept, self._ids[:n]))
        return _top(scores[ok], ok, k)

    def _scan_accepted(self, q: F32, k: int, accept: Accept) -> I64:
        """Exact search over the accepted rows only: costs `accept` on every id plus one dot product per hit."""
        n = self._n
        ok = np.flatnonzero(_mask(accept, self._ids[:n]))
        scores = self._matrix[ok] @ q if 2 * len(ok) < n else (self._matrix[:n] @ q)[ok]
        return _top(scores, ok, k)

    def _search_hnsw(self, graph: _Graph, q: F32, k: int, accept: Accept | None) -> I64:
        n = self._n
        ef = self._expansion_search
        # A search explores max(efSearch, count) nodes anyway, so fetching that many is free.
        fetch = min(n, k if accept is None else max(4 * k, ef))
        while True:
            rows = graph.search(q, fetch, max(ef, fetch))
            found = len(rows)
            if accept is not None:
                rows = rows[_mask(accept, self._ids[rows])]
            if len(rows) >= k or found >= n:
                break
            if accept is None:  # the graph returned short (possible with many tombstones)
                return self._search_exact(q, k, None)
            # Widen to twice what the acceptance rate seen so far says is needed, unless that is too expensive.
            want = -(-2 * k * fetch // len(rows)) if len(rows) else _MAX_HNSW_FETCH + 1
            if fetch >= min(n, _MAX_HNSW_FETCH) or want > _MAX_HNSW_FETCH:
                return self._scan_accepted(q, k, accept)
            fetch = min(n, max(want, 2 * fetch))
        # faiss's inner product differs from the exact product in the last bits; re-score so both modes agree exactly.
        scores = self._matrix[rows] @ q
        order = np.argsort(-scores, kind="stable")[:k]
        out: I64 = rows[order]
        return out

    def _check_batch(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> tuple[I64, F32]:
        id_arr = _as_id_array(ids)
        vecs = np.asarray(vectors)
        if vecs.ndim == 1 and len(id_arr) == 1:
            vecs = vecs[None, :]
        if vecs.ndim != 2 or vecs.shape[1] != self._dim:
            raise ValueError(f"VectorIndex.add: vectors must have shape (n, {self._dim}), got {vecs.shape}")
        if vecs.shape[0] != len(id_arr):
            raise ValueError(f"VectorIndex.add: {len(id_arr)} ids but {vecs.shape[0]} vectors")
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("VectorIndex.add: ids within one batch must be distinct")
        return id_arr, _normalise(vecs, "VectorIndex.add: vectors")

    def _check_query(self, query: npt.ArrayLike) -> F32:
        q = np.asarray(query)
        if q.ndim == 2 and q.shape[0] == 1:
            q = q[0]
        if q.shape != (self._dim,):
            raise ValueError(f"VectorIndex.search: query must have shape ({self._dim},), got {q.shape}")
        out: F32 = _normalise(q[None, :], "VectorIndex.search: query")[0]
        return out


def _as_id_array(ids: Iterable[int] | npt.ArrayLike) -> I64:
    if isinstance(ids, np.ndarray):
        arr = ids
    elif isinstance(ids, Iterable) and not isinstance(ids, str | bytes):
        arr = np.asarray(list(ids))
    else:
        arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise ValueError(f"VectorIndex: ids must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"VectorIndex: ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or (arr.dtype == np.uint64 and arr.max() > _MAX_ID):
        raise ValueError("VectorIndex: ids must lie in [0, 2**63)")
    return arr.astype(np.int64)


def _normalise(vecs: npt.NDArray[Any], what: str) -> F32:
    if not np.issubdtype(vecs.dtype, np.floating):
        raise ValueError(f"{what} must be a float array, got dtype {vecs.dtype}")
    out = np.array(vecs, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} contain NaN or infinity")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} contain a zero vector (cosine similarity is undefined)")
    out /= norms
    return out


def _top(scores: F32, rows: I64, k: int) -> I64:
    """`rows` ordered by descending `scores`, the best `k` of them (ties broken by position)."""
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
        part.sort()  # position order, so the stable argsort below breaks ties deterministically
        return rows[part[np.argsort(-scores[part], kind="stable")]]
    return rows[np.argsort(-scores, kind="stable")]


def _mask(accept: Accept, ids: I64) -> npt.NDArray[np.bool_]:
    mask = np.asarray(accept(ids.copy()))
    if mask.shape != ids.shape or mask.dtype != np.bool_:
        raise ValueError(
            f"VectorIndex.search: accept must return a bool array of shape {ids.shape}, "
            f"got {mask.dtype} array of shape {mask.shape}"
        )
    return mask
