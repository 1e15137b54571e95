"""Token-counted chunking with overlap.

Chunks are measured in the embedding model's own tokens (the spans its tokenizer gives), so no chunk is ever
longer than the model reads: a chunk past the window would be cut silently by the model and its tail never
embedded. A chunk prefers to end at a paragraph or sentence boundary in its second half; consecutive chunks
overlap by ``overlap`` tokens so that a sentence cut at a boundary is whole in one of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

_SENTENCE_END = (".", "!", "?", ";", ":")


@dataclass(kw_only=True, slots=True, frozen=True)
class ChunkSpan:
    start: int
    """Character offset of the chunk in the text it was cut from."""
    end: int
    tokens: int

    def text(self, source: str) -> str:
        return source[self.start : self.end]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _boundary_score(text: str, prev_end: int, next_start: int) -> int:
    """How good a place to cut the gap between two tokens is: 2 paragraph, 1 sentence, 0 elsewhere."""
    gap = text[prev_end:next_start]
    if "\n\n" in gap or gap.count("\n") >= 2:
        return 2
    # A tokenizer may keep the full stop as a token of its own, or (a word tokenizer) leave it in the gap.
    if text[prev_end - 1 : prev_end] in _SENTENCE_END or gap.rstrip().endswith(_SENTENCE_END) or "\n" in gap:
        return 1
    return 0


def _end_with_punctuation(text: str, end: int, limit: int) -> int:
    """Extend a chunk's end over punctuation a word tokenizer left between tokens (``word9.`` keeps its stop)."""
    while end < limit and text[end] in _SENTENCE_END + (")", "]", '"', "'"):
        end += 1
    return end


def chunk_spans(text: str, spans: Sequence[tuple[int, int]], max_tokens: int, overlap: int) -> list[ChunkSpan]:
    """Cut ``text`` (whose tokens are at ``spans``) into chunks of at most ``max_tokens`` tokens, each starting
    ``overlap`` tokens before the previous one ended. Every token is in at least one chunk."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    overlap = max(0, min(overlap, max_tokens // 2))
    n = len(spans)
    out: list[ChunkSpan] = []
    i = 0
    while i < n:
        j = min(i + max_tokens, n)
        if j < n:
            best, best_score = j, 0
            # Look back over the second half of the window for the best boundary (latest one wins a tie).
            for k in range(j, i + max(1, max_tokens // 2), -1):
                score = _boundary_score(text, spans[k - 1][1], spans[k][0])
                if score > best_score:
                    best, best_score = k, score
                    if score == 2:
                        break
            j = best
        limit = spans[j][0] if j < n else len(text)
        end = _end_with_punctuation(text, spans[j - 1][1], limit)
        out.append(ChunkSpan(start=spans[i][0], end=end, tokens=j - i))
        if j >= n:
            break
        i = max(j - overlap, i + 1)
    return out
