"""The body of the built-in ``read_document`` tool: the text of a PDF, a plain-text/Markdown file or an HTML page.

A ``source`` is either an ``http(s)`` URL, fetched through :func:`keel.orchestration.tools.fetch.fetch` (so the
SSRF guard, the size cap and the time limit all apply), or a path inside the operator's documents folder
(``Services.documents_dir``, set with ``KEEL_DOCUMENTS_DIR``). A local path may not leave that folder: ``..``,
absolute paths elsewhere and symlinks whose target lies outside are refused.

The kind is decided by the magic bytes (``%PDF-``), then the content type, then the file extension, then by
sniffing for text. PDFs are parsed with pypdf in a worker thread under a wall-clock limit, so the event loop never
blocks; HTML is reduced to its text with the standard library's parser (scripts and styles dropped). Everything
this tool returns -- the text and the PDF's info dictionary alike -- is untrusted content: nothing is stripped
or "sanitised" (zero-width characters, odd metadata), so the caller sees exactly what the document carries.

Not handled here (the ingestion pipeline comes later): OCR of pages without a text layer, parsing in a
resource-limited subprocess, and killing a runaway parse (a thread cannot be killed; the call gives up on it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass, field
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from keel.errors import BlockedAddress, ToolError
from keel.orchestration.tools import ToolContext

TOOL = "read_document"
PARSE_TIMEOUT_S = 20.0
"""Wall-clock limit for parsing one PDF. The worker thread cannot be killed: past the limit the call fails and
the thread is left to finish on its own."""
MAX_METADATA_CHARS = 1000
MAX_METADATA_ENTRIES = 64

Kind = Literal["pdf", "text", "html"]

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_TYPES = frozenset({"text/plain", "text/markdown", "text/x-markdown", "text/csv", "application/json"})
_PDF_TYPES = frozenset({"application/pdf", "application/x-pdf"})
_HTML_EXTS = frozenset({".html", ".htm", ".xhtml"})
_TEXT_EXTS = frozenset({".txt", ".text", ".md", ".markdown", ".csv", ".json", ".log", ".rst"})


class ReadDocumentArgs(BaseModel):
    """Read the text of a document: a PDF, a plain-text or Markdown file, or an HTML page."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1,
        max_length=4096,
        description=(
            "An absolute http:// or https:// URL (private and internal addresses are refused), or a path relative "
            "to the documents folder, such as 'reports/q3.pdf'."
        ),
    )
    password: str | None = Field(
        default=None,
        max_length=1024,
        repr=False,
        description="The password of an encrypted PDF. Leave it out for documents that are not encrypted.",
    )
    max_pages: int = Field(
        default=50,
        ge=1,
        le=500,
        description="Read at most this many pages of a PDF; the result says when pages were left out.",
    )


class DocumentPage(BaseModel):
    page: int = Field(description="The page number, starting at 1.")
    text: str = Field(description="The page's text; empty when the page has no text layer.")


class DocumentText(BaseModel):
    """What ``read_document`` returns. All of it is untrusted content from outside."""

    source: str = Field(description="The source as it was given.")
    kind: Kind = Field(description="What the document turned out to be.")
    pages: list[DocumentPage] = Field(description="The text, page by page (one page for text and HTML).")
    metadata: dict[str, str] = Field(
        default_factory=dict, description="The PDF's document information (Title, Author, ...), as the file says."
    )
    page_count: int = Field(description="How many pages the document has, including any not returned.")
    truncated: bool = Field(default=False, description="True when pages or text were left out (see warnings).")
    warnings: list[str] = Field(default_factory=list, description="Anything the reader should know.")


@dataclass(slots=True)
class _Raw:
    """A document's bytes (or text already decoded by the fetcher), before it is parsed."""

    name: str
    """The path or URL path, for its extension."""
    data: bytes | None = None
    text: str | None = None
    content_type: str = ""
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)


def _error(message: str, type: str = "tool_error") -> ToolError:
    return ToolError(message, tool=TOOL, type=type)


# --- loading ----------------------------------------------------------------------------------------------------


def _local_path(source: str, base: Path | None) -> Path:
    """The real path of ``source`` inside ``base``; refuses anything that would leave it."""
    if base is None:
        raise _error(
            "local paths are disabled: no documents folder is configured. Set KEEL_DOCUMENTS_DIR to a folder to "
            "read files from it, or give an http(s) URL.",
            "local_paths_disabled",
        )
    if "\x00" in source:
        raise _error("invalid path: it contains a NUL character", "invalid_path")
    if ".." in PurePosixPath(source.replace("\\", "/")).parts:
        raise _error(
            f"refused path {source!r}: '..' is not allowed; give a path inside the documents folder", "path_refused"
        )
    try:
        root = base.resolve(strict=True)
        real = (root / source).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise _error(f"cannot resolve {source!r}: {exc}", "invalid_path") from None
    if not real.is_relative_to(root):
        raise _error(f"refused path {source!r}: it is outside the documents folder", "path_refused")
    return real


def _read_file(path: Path, source: str, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of a regular file, and whether there was more. Never follows a final symlink."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _error(f"no such document: {source!r}", "document_not_found") from None
    except OSError as exc:
        raise _error(f"cannot open {source!r}: {exc.strerror or exc}", "invalid_path") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(f"{source!r} is not a regular file", "invalid_path")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(cap + 1)
    finally:
        os.close(fd)
    return data[:cap], len(data) > cap


async def _load_local(source: str, services: Any) -> _Raw:
    path = _local_path(source, getattr(services, "documents_dir", None))
    cap = int(getattr(services, "fetch_max_bytes", 5_000_000))
    data, truncated = await asyncio.to_thread(_read_file, path, source, cap)
    return _Raw(name=path.name, data=data, truncated=truncated)


def _redirected(source: str, final: str) -> bool:
    import httpx

    try:
        return httpx.URL(source) != httpx.URL(final)
    except (httpx.InvalidURL, TypeError, ValueError):
        return source != final


async def _load_url(source: str, services: Any) -> _Raw:
    from keel.netguard import NO_ALLOW
    from keel.orchestration.tools.fetch import FetchArgs, FetchLimits, FetchRefused, fetch

    limits = FetchLimits(
        max_bytes=int(getattr(services, "fetch_max_bytes", 5_000_000)),
        timeout_s=float(getattr(services, "fetch_timeout_s", 20.0)),
        allow=getattr(services, "fetch_allow", NO_ALLOW),
    )
    try:
        result = await fetch(FetchArgs(url=source), limits)
    except (BlockedAddress, FetchRefused) as exc:
        raise _error(exc.message, exc.code) from exc
    raw = _Raw(name=urlsplit(result.url).path, content_type=result.content_type, truncated=result.truncated)
    if _redirected(source, result.url):
        raw.warnings.append(f"redirected to {result.url}")
    if result.content_b64 is not None:
        try:
            raw.data = base64.b64decode(result.content_b64, validate=True)
        except (binascii.Error, ValueError):
            raise _error(f"the fetched body of {source!r} could not be decoded", "document_corrupt") from None
    else:
        raw.text = result.text or ""
    return raw


# --- kinds ------------------------------------------------------------------------------------------------------


def _media(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _looks_textual(data: bytes) -> bool:
    head = data[:8192]
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a multi-byte character cut off at the end of the sample
    return True


def _kind(raw: _Raw) -> Kind:
    if raw.data is not None and b"%PDF-" in raw.data[:1024]:
        return "pdf"
    media, ext = _media(raw.content_type), PurePosixPath(raw.name).suffix.lower()
    if media in _PDF_TYPES or (not media and ext == ".pdf"):
        return "pdf"  # without the magic bytes: parsing will say it is damaged
    if media in _HTML_TYPES or (not media and ext in _HTML_EXTS):
        return "html"
    if media in _TEXT_TYPES or (not media and ext in _TEXT_EXTS) or raw.text is not None:
        return "text"
    if (not media or media.startswith("text/")) and raw.data is not None and _looks_textual(raw.data):
        return "html" if raw.data[:512].lstrip().lower().startswith((b"<!doctype html", b"<html")) else "text"
    what = raw.content_type or (f"'{ext}' file" if ext else "file without an extension")
    raise _error(
        f"unsupported document type ({what}): read_document reads PDF, plain text, Markdown and HTML",
        "unsupported_document",
    )


def _decode(raw: _Raw) -> str:
    if raw.text is not None:
        return raw.text
    data = raw.data or b""
    charset = re.search(r"charset=\"?([\w.:-]+)", raw.content_type, re.I)
    try:
        return data.decode(charset.group(1) if charset else "utf-8-sig", errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


# --- HTML -------------------------------------------------------------------------------------------------------

_BLOCKS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr "
    "li main nav ol p pre section table td th title tr ul".split()
)
_DROPPED = frozenset({"script", "style"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[tuple[str, bool]] = []
        """Text with whether it is preformatted (kept exactly as written)."""
        self.skipping = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROPPED:
            self.skipping += 1
        elif tag == "pre":
            self.pre += 1
        if tag in _BLOCKS:
            self.chunks.append(("\n", False))

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCKS:
            self.chunks.append(("\n", False))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>; a self-closed <script/> or <pre/> has no content, so it opens nothing.
        if tag in _BLOCKS:
            self.chunks.append(("\n", False))

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.chunks.append((data, True) if self.pre else (re.sub(r"[ \t\r\n\f]+", " ", data), False))

    def text(self) -> str:
        out: list[str] = []
        flowing: list[str] = []
        for data, pre in [*self.chunks, ("", True)]:
            if not pre:
                flowing.append(data)
                continue
            out.append(re.sub(r" *\n *", "\n", re.sub(r" {2,}", " ", "".join(flowing))))
            flowing.clear()
            out.append(data)
        return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()


def html_to_text(html: str) -> str:
    """The visible text of an HTML document: tags, scripts and styles dropped, blocks on their own lines,
    whitespace collapsed outside ``<pre>``. Hidden elements are kept: their text is data the caller should see."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


# --- PDF --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Parsed:
    pages: list[DocumentPage]
    page_count: int
    metadata: dict[str, str]
    warnings: list[str]


def _open_pdf(data: bytes, password: str | None, warnings: list[str]) -> Any:
    from pypdf import PasswordType, PdfReader

    reader = PdfReader(BytesIO(data))
    if not reader.is_encrypted:
        if password is not None:
            warnings.append("a password was given but the PDF is not encrypted; it was ignored")
        return reader
    if password is None:
        if reader.decrypt("") != PasswordType.NOT_DECRYPTED:
            return reader  # encrypted only to restrict permissions: opens without a password
        raise _error("the PDF is encrypted: supply `password` to read it", "document_encrypted")
    if reader.decrypt(password) == PasswordType.NOT_DECRYPTED:
        raise _error("the PDF is encrypted and the `password` given is wrong", "document_encrypted")
    return reader


def _metadata(reader: Any, warnings: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        info = reader.metadata
        items = list(info.items()) if info is not None else []
    except Exception as exc:  # a damaged info dictionary must not hide the text
        warnings.append(f"the document information could not be read ({type(exc).__name__})")
        return out
    for key, value in items[:MAX_METADATA_ENTRIES]:
        value = value.get_object() if hasattr(value, "get_object") else value
        if not isinstance(value, str):
            continue
        name = str(key).lstrip("/")[:100]
        if len(value) > MAX_METADATA_CHARS:
            warnings.append(f"metadata {name!r} was cut to {MAX_METADATA_CHARS} characters")
        out[name] = str(value)[:MAX_METADATA_CHARS]
    return out


def _parse_pdf(data: bytes, password: str | None, max_pages: int) -> _Parsed:
    """Runs in a worker thread."""
    warnings: list[str] = []
    reader = _open_pdf(data, password, warnings)
    page_count = len(reader.pages)
    if page_count == 0:
        raise _error("the PDF has no pages (it may be damaged)", "document_corrupt")
    metadata = _metadata(reader, warnings)
    pages: list[DocumentPage] = []
    for i in range(min(page_count, max_pages)):
        try:
            text = reader.pages[i].extract_text() or ""
        except Exception as exc:  # one bad page must not hide the others
            warnings.append(f"page {i + 1}: the text could not be extracted ({type(exc).__name__}: {exc})"[:300])
            text = ""
        else:
            if not text.strip():
                warnings.append(f"page {i + 1} has no text layer (scanned?); OCR arrives with the ingestion pipeline")
        pages.append(DocumentPage(page=i + 1, text=text))
    return _Parsed(pages=pages, page_count=page_count, metadata=metadata, warnings=warnings)


async def _read_pdf(raw: _Raw, password: str | None, max_pages: int) -> _Parsed:
    from pypdf.errors import DependencyError

    if raw.truncated:
        raise _error("the PDF is larger than the size limit and cannot be read in part", "document_too_large")
    try:
        async with asyncio.timeout(PARSE_TIMEOUT_S):
            return await asyncio.to_thread(_parse_pdf, raw.data or b"", password, max_pages)
    except ToolError:
        raise
    except TimeoutError:
        raise _error(f"parsing the PDF took longer than {PARSE_TIMEOUT_S:g} s", "document_timeout") from None
    except DependencyError as exc:
        raise _error(f"the PDF needs a feature that is not installed: {exc}", "unsupported_document") from None
    except Exception as exc:  # pypdf raises many kinds of errors on damaged input
        raise _error(
            f"the PDF is damaged and cannot be read ({type(exc).__name__}: {exc})"[:500], "document_corrupt"
        ) from None


# --- the tool ---------------------------------------------------------------------------------------------------


async def _load(source: str, services: Any) -> _Raw:
    match = _URL_RE.match(source)
    if match is None:
        return await _load_local(source, services)
    scheme = source.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise _error(f"unsupported URL scheme {scheme!r}: give an http(s) URL or a path", "unsupported_source")
    return await _load_url(source, services)


async def read_document(args: ReadDocumentArgs, tc: ToolContext) -> DocumentText:
    """Read the text of a PDF, plain-text, Markdown or HTML document from a URL or the documents folder.

    Raises :class:`ToolError` (``tool="read_document"``) with a ``type`` such as ``document_encrypted``,
    ``document_corrupt``, ``path_refused``, ``document_not_found`` or ``unsupported_document``.
    """
    source = args.source.strip()
    services = tc.services
    raw = await _load(source, services)
    kind = _kind(raw)
    warnings = list(raw.warnings)
    if kind == "pdf":
        parsed = await _read_pdf(raw, args.password, args.max_pages)
        warnings += parsed.warnings
        truncated = parsed.page_count > len(parsed.pages)
        if truncated:
            warnings.append(
                f"only the first {len(parsed.pages)} of {parsed.page_count} pages were read (max_pages); "
                "ask again with a larger max_pages for more"
            )
        return DocumentText(
            source=args.source,
            kind="pdf",
            pages=parsed.pages,
            metadata=parsed.metadata,
            page_count=parsed.page_count,
            truncated=truncated,
            warnings=warnings,
        )
    text = _decode(raw)
    if kind == "html":
        text = await asyncio.to_thread(html_to_text, text)
    if raw.truncated:
        warnings.append("the document is larger than the size limit; only its beginning was read")
    return DocumentText(
        source=args.source,
        kind=kind,
        pages=[DocumentPage(page=1, text=text)],
        page_count=1,
        truncated=raw.truncated,
        warnings=warnings,
    )
