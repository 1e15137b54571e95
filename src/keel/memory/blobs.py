"""Compact storage of step results: small JSON inline, large payloads out of line, compressed and deduplicated.

A workflow that moves document text or model output through its steps must not rewrite megabytes per step
(pydantic-ai #7157): each step writes only its own row, and anything over :data:`INLINE_LIMIT` bytes becomes a
content-addressed blob that a resume reads only when a replayed step actually returns it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

INLINE_LIMIT = 16 * 1024


@dataclass(kw_only=True, slots=True, frozen=True)
class Packed:
    inline: str | None
    blob_id: str | None = None
    blob: bytes | None = None
    size: int = 0


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def pack(value: Any, limit: int = INLINE_LIMIT) -> Packed:
    """Serialise, and compress + hash when large. CPU-bound for big values: call it off the event loop."""
    text = dumps(value)
    raw = text.encode()
    if len(raw) <= limit:
        return Packed(inline=text, size=len(raw))
    # Level 1: document text still shrinks 3-4x, and compression stays far cheaper than the fsync it saves.
    return Packed(inline=None, blob_id=hashlib.sha256(raw).hexdigest(), blob=zlib.compress(raw, 1), size=len(raw))


def unpack_blob(data: bytes) -> Any:
    return json.loads(zlib.decompress(data))


def looks_small(value: Any, budget: int) -> bool:
    """Whether ``value`` surely serialises to less than about ``budget`` characters, found without serialising a
    large one (a walk that stops as soon as the budget is spent)."""
    stack, left = [value], budget
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            left -= len(item)
        elif isinstance(item, dict):
            left -= len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            left -= len(item)
            stack.extend(item)
        elif isinstance(item, int | float) or item is None:
            left -= 8
        else:  # bytes, a model, anything unusual: do not guess, treat it as large
            return False
        if left < 0:
            return False
    return True
