"""keel's built-in tools: ``fetch_url``, ``read_document``, ``send_email`` and ``search_memory``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keel.memory.embeddings import Embedder
from keel.memory.retrieval import Memory
from keel.memory.stores import EmailOutbox
from keel.netguard import AllowList


@dataclass(kw_only=True, slots=True)
class Services:
    """What built-in tools reach at run time (``ToolContext.services``)."""

    store: EmailOutbox | None = None
    """Where ``send_email`` queues its messages (the store's email outbox)."""
    documents_dir: Path | None = None
    """``read_document`` reads local paths only under this folder (None: URLs only)."""
    fetch_allow: AllowList = field(default_factory=lambda: AllowList.parse(""))
    """Hosts exempt from the SSRF rules (tests and local development only)."""
    fetch_max_bytes: int = 5_000_000
    fetch_timeout_s: float = 20.0
    clock: Callable[[], float] | None = None
    memory: Memory | None = None
    """Sessions, documents and retrieval (None: no memory layer)."""
    embedders: Callable[[str], Embedder] | None = None
    """``spec -> Embedder`` (cached), for re-embedding under another model."""
