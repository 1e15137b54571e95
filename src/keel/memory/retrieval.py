"""Vector retrieval with a confidence signal, and the memory service the other layers reach.

Retrieval is lossy: the nearest chunks are not necessarily relevant ones. So every search says how sure it is:
``confidence`` (0–1) and a ``level`` (``high``/``medium``/``low``/``none``) from the best score and how far it
stands above the rest. Workflows write both into the task's trace (a ``retrieval`` event) and its envelope
metadata, and a low level is the cue to say "I could not find this" rather than answer from weak context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.memory.embeddings import Embedder
from keel.memory.ingest.pipeline import Ingestor
from keel.memory.stores import DocumentStore, SessionStore, VectorStore
from keel.memory.types import ChunkHit


@dataclass(kw_only=True, slots=True, frozen=True)
class ConfidencePolicy:
    """Score thresholds (cosine) for one embedding model. The defaults come from all-MiniLM-L6-v2 on the labelled
    contract set of ``bench/bench_embeddings.py``: the passage that answers a paraphrased question scores 0.20-0.6
    (median 0.40), the best unrelated passage at most 0.18, and the top hit of an off-topic question 0.16 (median)
    to 0.33. So below ``low`` there is most likely nothing relevant, and at or above ``high`` the match is strong.

    What a score cannot tell: a question *on the documents' topic* that they do not answer scores like one they do
    (median 0.43 on that set). Confidence says "similar text was found", not "the answer was found"; the
    workflow's own validation (quotes checked against sources) covers the rest."""

    high: float = 0.45
    low: float = 0.25

    def judge(self, scores: Sequence[float]) -> tuple[float, str]:
        if not scores:
            return 0.0, "none"
        top = scores[0]
        margin = top - scores[1] if len(scores) > 1 else top
        value = (top - self.low) / (self.high - self.low) if self.high > self.low else float(top >= self.high)
        value = min(1.0, max(0.0, value)) * (0.85 + 0.15 * min(1.0, margin / 0.1))
        level = "high" if top >= self.high else "medium" if top >= self.low else "low"
        return round(value, 3), level


@dataclass(kw_only=True, slots=True)
class Retrieval:
    query: str
    space: str
    hits: list[ChunkHit]
    confidence: float
    level: str

    def summary(self, *, text_chars: int = 0) -> dict[str, Any]:
        """The trace/metadata form: scores and where each hit is, with ``text_chars`` of its text."""
        return {
            "query": self.query,
            "space": self.space,
            "confidence": self.confidence,
            "level": self.level,
            "hits": [
                {
                    "chunk": h.chunk.id,
                    "document": h.chunk.document_id,
                    "page": h.chunk.page,
                    "start": h.chunk.start,
                    "end": h.chunk.end,
                    "score": round(h.score, 4),
                    **({"text": h.chunk.text[:text_chars]} if text_chars else {}),
                }
                for h in self.hits
            ],
        }


@dataclass(kw_only=True)
class Memory:
    """The memory layer as the other layers see it: sessions, documents, retrieval. Each tier is its own handle:
    sessions may live in Redis while documents and vectors stay in the SQL store."""

    sessions: SessionStore
    documents: DocumentStore
    vectors: VectorStore
    embedder: Embedder
    ingestor: Ingestor
    clock: Callable[[], float]
    session_ttl_s: float = 24 * 3600
    confidence: ConfidencePolicy = field(default_factory=ConfidencePolicy)

    async def search(self, tenant: str, query: str, *, k: int = 5, documents: Sequence[str] | None = None) -> Retrieval:
        (vector,) = await self.embedder.embed([query])
        space = self.embedder.space.key
        hits = await self.vectors.search_chunks(space, vector, k, tenant=tenant, now=self.clock(), documents=documents)
        confidence, level = self.confidence.judge([h.score for h in hits])
        return Retrieval(query=query, space=space, hits=hits, confidence=confidence, level=level)
