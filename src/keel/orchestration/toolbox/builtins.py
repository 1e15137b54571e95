"""The built-in tools as :class:`Tool` values, and the registry every process starts from."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import ConfigError
from keel.orchestration.toolbox import Services
from keel.orchestration.toolbox.documents import DocumentText, ReadDocumentArgs, read_document
from keel.orchestration.toolbox.email import SEND_EMAIL
from keel.orchestration.toolbox.fetch import FetchArgs, FetchLimits, FetchResult, fetch
from keel.orchestration.tools import Tool, ToolCatalog, ToolContext


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
    query: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(5, ge=1, le=50)


async def search_memory(args: SearchMemoryArgs) -> dict[str, Any]:
    # STUB until the memory layer (issue 6) lands: it says so in its result and its description, and returns
    # no hits rather than made-up ones.
    return {"results": [], "stub": True, "note": "vector memory is not available yet; nothing was searched"}


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
    description="[STUB: returns no results until vector memory lands] Search the task's long-term memory.",
    fn=search_memory,
    input_model=SearchMemoryArgs,
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
