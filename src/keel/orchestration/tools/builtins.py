"""The built-in tools as :class:`Tool` values, and the registry every process starts from."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import ConfigError, ToolError
from keel.orchestration.tools import Tool, ToolCatalog, ToolContext
from keel.orchestration.tools.documents import DocumentText, ReadDocumentArgs, read_document
from keel.orchestration.tools.email import SEND_EMAIL
from keel.orchestration.tools.fetch import FetchArgs, FetchLimits, FetchResult, fetch
from keel.orchestration.tools.services import Services


def _services(tc: ToolContext) -> Services:
    return tc.services if isinstance(tc.services, Services) else Services()


async def fetch_url(args: FetchArgs, tc: ToolContext) -> FetchResult:
    """Fetch a public http(s) URL. Private, loopback and link-local addresses are refused in every encoding,
    every redirect is re-checked, and size, time and content type are capped."""
    svc = _services(tc)
    limits = FetchLimits(max_bytes=svc.fetch_max_bytes, timeout_s=svc.fetch_timeout_s, allow=svc.fetch_allow)
    return await fetch(args, limits)


async def read_document_tool(args: ReadDocumentArgs, tc: ToolContext) -> DocumentText:
    return await read_document(args, tc)


class SearchMemoryArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=2000, description="What to look for, in plain words.")
    top_k: int = Field(5, ge=1, le=50, description="How many passages to return.")
    documents: list[str] | None = Field(
        None, max_length=100, description="Only search these document ids (default: all of the tenant's)."
    )


async def search_memory(args: SearchMemoryArgs, tc: ToolContext) -> dict[str, Any]:
    """Search the documents ingested into vector memory for passages relevant to a query. Each result has its
    document, page, text and cosine score; `confidence` (0-1) and `level` (high/medium/low/none) say how much to
    trust them: with a low level, say the documents do not answer it rather than guessing."""
    memory = _services(tc).memory
    if memory is None:
        raise ToolError("vector memory is not configured on this server", type="memory_unavailable", tool=tc.tool)
    found = await memory.search(tc.tenant, args.query, k=args.top_k, documents=args.documents)
    summary: dict[str, Any] = found.summary(text_chars=4000)
    return {
        "results": [
            {"document": h["document"], "page": h["page"], "text": h["text"], "score": h["score"]}
            for h in summary["hits"]
        ],
        "confidence": summary["confidence"],
        "level": summary["level"],
        "space": summary["space"],
    }


FETCH_URL = Tool(
    name="fetch_url",
    description=(fetch_url.__doc__ or "").strip(),
    fn=fetch_url,
    input_model=FetchArgs,
    scopes=frozenset({"tools:net"}),
    untrusted_output=True,
    source="builtin",
)
READ_DOCUMENT = Tool(
    name="read_document",
    description="Read a document (PDF, text or HTML) from a URL or the documents folder, page by page, with its "
    "metadata. Encrypted PDFs need `password`; scanned pages come back empty with a warning.",
    fn=read_document_tool,
    input_model=ReadDocumentArgs,
    untrusted_output=True,
    source="builtin",
)
SEARCH_MEMORY = Tool(
    name="search_memory",
    description=(search_memory.__doc__ or "").strip(),
    fn=search_memory,
    input_model=SearchMemoryArgs,
    untrusted_output=True,  # passages of ingested documents: whatever they say is data, not instructions
    source="builtin",
)


def builtin_tools() -> list[Tool]:
    return [FETCH_URL, READ_DOCUMENT, SEND_EMAIL, SEARCH_MEMORY]


def load_tools(specs: Iterable[str]) -> list[Tool]:
    """Tools named by ``package.module:attr`` (a Tool, or a list of them): ``KEEL_TOOLS``."""
    found: list[Tool] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not attr:
            raise ConfigError(f"KEEL_TOOLS entry {spec!r} must look like package.module:attr")
        try:
            value = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load tools from {spec!r}: {exc}") from exc
        items = value if isinstance(value, (list, tuple, ToolCatalog)) else [value]
        for item in items:
            if not isinstance(item, Tool):
                raise ConfigError(f"{spec!r} holds {type(item).__name__}, not a keel Tool")
            found.append(item)
    return found


__all__ = ["builtin_tools", "load_tools"]
