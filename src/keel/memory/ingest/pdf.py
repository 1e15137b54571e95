"""Parse an untrusted PDF into page texts, in a resource-limited child process, with OCR for scanned pages.

:func:`parse_pdf` never parses in the server's process. A PDF can be a decompression bomb, and pypdfium2 (PDFium)
*aborts the whole process* (SIGABRT) when an allocation fails, so no ``try`` could save the server. Each document
gets a child, ``python -m keel.memory.ingest._worker``, started with :func:`asyncio.create_subprocess_exec` in a
session of its own (so the whole group, tesseract included, can be killed at once), with
``OMP_THREAD_LIMIT=OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1``. The child sets its own ``RLIMIT_AS`` (``memory_mb``)
and ``RLIMIT_CPU`` (``cpu_s`` soft, +5 s hard) before it imports a parser -- not ``preexec_fn``, which is unsafe
in the server's multi-threaded process. The request (path, password, limits) goes on stdin, never the password
on argv; the child streams one JSON line per page (progress) and then the result or a typed error; stderr is kept
(the last 8 KiB) for diagnostics. A wall clock (``timeout_s``) and the awaiting task's cancellation both kill the
child's process group, so nothing is left running.

Text layer: pypdf, not pypdfium2. Its ``extract_text`` swallows its own ``LimitReachedError`` and returns ``''``,
so before extracting a page the child decodes the page's content streams and the form XObjects they draw
(recursively) itself, counts every decoded byte against ``max_decompressed_bytes``, and rejects the document as
``too_large`` past it (pypdf's per-stream caps are also lowered to that budget). pypdf caches what it decoded, so
the extractor reuses it: the cap covers exactly what the extractor reads. One parser for both the accounting and
the text avoids two parsers disagreeing about a damaged file's structure, and pypdf is what ``read_document``
already uses. pypdfium2 extracts text about twice as fast (2.5 against 5 ms a page), which is noise next to OCR.

OCR: a page whose text layer has fewer than 16 letters and digits and that draws something (an image, or a
content stream of 512 bytes or more) is rendered with pypdfium2 at ``ocr_dpi`` in grayscale (scaled down to at
most 40 Mpx; the declared image sizes and the bitmap count against ``max_decompressed_bytes``), written as a PGM
(no Pillow at run time), and read by the ``tesseract`` binary (``--oem 1 --psm 3 tsv``), ``ocr_concurrency`` pages
at a time. Words below ``ocr_min_word_confidence`` are dropped; the kept words are put back in lines.
A page is *flagged* when the character-weighted mean confidence of **all** the words tesseract reported (kept and
dropped) is below ``ocr_min_page_confidence``: most of what it read is unreliable, so even its kept words are
suspect; its ``text`` is left empty (``confidence`` and ``dropped_words`` still say what OCR saw), so junk is
never returned as text. A blank page (no text, nothing drawn) is not OCRed.

A document with no text at all is **returned**, not rejected (a ``no_text`` warning): the caller decides
(the ingestion pipeline rejects it as ``empty``; a viewer may still want the metadata).

Rejections (:class:`~keel.errors.DocumentRejected` ``reason``): ``too_large`` (file over ``max_bytes``, or
decoding past ``max_decompressed_bytes``), ``corrupt`` (not a PDF, unreadable, no pages), ``encrypted`` (needs a
password, none given; the empty user password is always tried first, so owner-password-only files open),
``wrong_password``, ``too_many_pages`` (over ``max_pages``: the declared count is checked before the page tree is
walked), ``limit_exceeded`` (the child hit its memory or CPU limit: a ``MemoryError``, or killed by a signal) and
``timeout`` (over ``timeout_s`` of wall clock). A child that fails in any other way is keel's failure
(:class:`~keel.errors.RuntimeFailure`), not the document's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from keel.errors import DocumentRejected, RuntimeFailure

_STREAM_LIMIT = 16 << 20
"""Longest JSON line accepted from the child (a page's text is capped at 1M characters in the child)."""
_STDERR_KEEP = 8192

OnPage = Callable[[int, int], Awaitable[None] | None]
"""``(pages done, page count)``, called once per page as the child finishes it."""


@dataclass(kw_only=True, slots=True)
class ParseLimits:
    """Caps for parsing one PDF. Every limit applies per document."""

    max_bytes: int = 100_000_000
    """Input file size; larger files are rejected (``too_large``) before a child is started."""
    max_pages: int = 2_000
    """Page cap (``too_many_pages``), checked before any page is parsed."""
    max_decompressed_bytes: int = 300_000_000
    """Sum of decoded content streams, form XObjects, declared sizes of the images of rendered pages and rendered
    bitmaps (``too_large`` past it): the decompression-bomb guard."""
    memory_mb: int = 1536
    """RLIMIT_AS of the child (and of the tesseract processes it starts). Hitting it: ``limit_exceeded``."""
    cpu_s: int = 300
    """RLIMIT_CPU of the child (soft; SIGKILL 5 s later). Each tesseract process inherits its own copy of it;
    ``timeout_s`` bounds the document as a whole."""
    timeout_s: float = 600.0
    """Wall clock for the whole parse; past it the child's process group is killed (``timeout``)."""
    ocr: bool = True
    """OCR pages without a (meaningful) text layer when tesseract is installed."""
    ocr_dpi: int = 300
    ocr_lang: str = "eng"
    """Tesseract language(s), e.g. ``"eng+deu"``; each needs its ``tesseract-ocr-<lang>`` package."""
    ocr_min_word_confidence: float = 60.0
    """OCR words below this confidence (0-100) are dropped, not embedded as junk."""
    ocr_min_page_confidence: float = 50.0
    """A page whose character-weighted mean confidence over all its OCR words (kept and dropped) is below this is
    flagged (``PageText.flagged``, an ``ocr_low_confidence`` warning)."""
    ocr_concurrency: int = 2
    """OCR pages processed at a time (one single-threaded tesseract process each)."""


@dataclass(kw_only=True, slots=True)
class PageText:
    number: int
    """1-based."""
    text: str
    method: Literal["text", "ocr", "empty"]
    """Where the text came from; ``empty``: no text layer and no usable OCR."""
    confidence: float | None = None
    """OCR: mean word confidence (0-100) of the kept words."""
    dropped_words: int = 0
    """OCR words dropped for low confidence."""
    flagged: bool = False
    """Low-confidence OCR page (see the module docstring): its ``text`` is empty."""


@dataclass(kw_only=True, slots=True)
class ParsedPdf:
    page_count: int
    pages: list[PageText]
    """One per page, in page order."""
    warnings: list[dict[str, Any]]
    """``{"type", "message"}`` plus ``"page"`` or ``"pages"``. Types: ``ocr_used``, ``ocr_low_confidence``,
    ``ocr_unavailable``, ``ocr_disabled``, ``ocr_failed``, ``ocr_downscaled``, ``page_empty``, ``page_unreadable``,
    ``page_truncated``, ``no_text``, ``password_ignored``, ``metadata_unreadable``."""
    metadata: dict[str, str]
    """The document information (Title, Author, ...): untrusted text, as the file says."""
    encrypted: bool
    """It was encrypted (and opened with the password given, or the empty user password)."""


def ocr_available() -> bool:
    """Whether the ``tesseract`` binary is on PATH (Debian: ``apt-get install tesseract-ocr``)."""
    return shutil.which("tesseract") is not None


def _reject(message: str, reason: str, path: Path, **detail: object) -> DocumentRejected:
    return DocumentRejected(message, reason=reason, document=path.name, detail=detail or None)


def _check_file(path: Path, limits: ParseLimits) -> None:
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise _reject(f"the PDF is {size:,} bytes; the limit is {limits.max_bytes:,}", "too_large", path)
    with path.open("rb") as fh:
        head = fh.read(1024)
    if b"%PDF-" not in head:
        raise _reject("the file is not a PDF (no %PDF- header)", "corrupt", path)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_THREAD_LIMIT="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # The child must import this very keel, even when it is not installed (a source checkout on sys.path).
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The child leads its own session, so its pid is the group id; tesseract processes are in the group too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def _keep_tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-_STDERR_KEEP]


def _page(message: dict[str, Any]) -> PageText:
    method = message.get("method")
    confidence = message.get("confidence")
    return PageText(
        number=int(message["number"]),
        text=str(message.get("text", "")),
        method=method if method in ("text", "ocr", "empty") else "empty",
        confidence=float(confidence) if confidence is not None else None,
        dropped_words=int(message.get("dropped_words", 0)),
        flagged=bool(message.get("flagged", False)),
    )


def _died(rc: int, stderr: str, limits: ParseLimits, path: Path) -> DocumentRejected | RuntimeFailure:
    """What a child that ended without a result means."""
    tail = stderr[-2000:]
    if rc == 3 or "MemoryError" in stderr:
        return _reject(
            f"parsing the PDF ran out of memory (the {limits.memory_mb} MB limit, memory_mb)",
            "limit_exceeded",
            path,
            limit="memory_mb",
            stderr=tail,
        )
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        if sig == signal.SIGXCPU:
            what, limit = f"the {limits.cpu_s} s CPU limit (cpu_s)", "cpu_s"
        elif sig == signal.SIGKILL:
            what, limit = f"the {limits.cpu_s} s CPU limit (cpu_s) or the system's out-of-memory killer", "cpu_s"
        else:  # SIGABRT, SIGSEGV, SIGBUS: PDFium aborts when an allocation fails under RLIMIT_AS
            what, limit = f"most likely the {limits.memory_mb} MB memory limit (memory_mb)", "memory_mb"
        return _reject(
            f"the PDF parser was killed by {name}: {what}",
            "limit_exceeded",
            path,
            limit=limit,
            signal=name,
            stderr=tail,
        )
    return RuntimeFailure(f"the PDF parser process failed (exit code {rc}): {tail[-500:]}", detail={"stderr": tail})


async def parse_pdf(
    path: Path,
    *,
    password: str | None = None,
    limits: ParseLimits | None = None,
    on_page: OnPage | None = None,
) -> ParsedPdf:
    """Parse the PDF at ``path`` in a resource-limited child process (see the module docstring).

    ``password`` opens an encrypted PDF (the empty user password is tried anyway). ``on_page(done, total)`` is
    called (and awaited, if it returns an awaitable) as each page is finished. Raises
    :class:`~keel.errors.DocumentRejected` for a document that cannot be parsed; cancelling the awaiting task
    kills the child.
    """
    limits = limits or ParseLimits()
    path = Path(path)
    await asyncio.to_thread(_check_file, path, limits)
    scratch = await asyncio.to_thread(tempfile.mkdtemp, prefix="keel-pdf-")
    request = {"path": str(path.resolve()), "password": password, "limits": asdict(limits), "scratch": scratch}
    proc: asyncio.subprocess.Process | None = None
    stderr = bytearray()
    reader: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(limits.timeout_s):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "keel.memory.ingest._worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=_child_env(),
                limit=_STREAM_LIMIT,
            )
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            reader = asyncio.create_task(_keep_tail(proc.stderr, stderr))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(json.dumps(request).encode())
                await proc.stdin.drain()
                proc.stdin.close()
            return await _converse(proc, reader, stderr, path, limits, on_page)
    except TimeoutError:
        raise _reject(
            f"parsing the PDF took longer than {limits.timeout_s:g} s (timeout_s)", "timeout", path, limit="timeout_s"
        ) from None
    finally:
        if proc is not None:
            _kill_group(proc)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    await asyncio.shield(proc.wait())
        if reader is not None:
            reader.cancel()
        shutil.rmtree(scratch, ignore_errors=True)


async def _converse(
    proc: asyncio.subprocess.Process,
    reader: asyncio.Task[None],
    stderr: bytearray,
    path: Path,
    limits: ParseLimits,
    on_page: OnPage | None,
) -> ParsedPdf:
    assert proc.stdout is not None
    start: dict[str, Any] | None = None
    pages: dict[int, PageText] = {}
    while True:
        try:
            line = await proc.stdout.readline()
        except ValueError:  # a line over the stream limit: nothing the child sends legitimately
            raise RuntimeFailure("the PDF parser sent an over-long message") from None
        if not line:
            break
        try:
            message = json.loads(line)
            kind = message["t"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeFailure(f"the PDF parser sent an unreadable message: {line[:200]!r}") from None
        if kind == "start":
            start = message
        elif kind == "page":
            page = _page(message)
            pages[page.number] = page
            if on_page is not None:
                result = on_page(len(pages), int(start["page_count"]) if start else len(pages))
                if inspect.isawaitable(result):
                    await result
        elif kind == "error":
            await proc.wait()
            await reader
            if message.get("reason") == "limit_exceeded":
                raise _died(3, stderr.decode("utf-8", "replace"), limits, path)
            raise _reject(str(message.get("message", "")), str(message.get("reason", "corrupt")), path)
        elif kind == "done" and start is not None:
            await proc.wait()
            count = int(start["page_count"])
            ordered = [pages.get(n) or PageText(number=n, text="", method="empty") for n in range(1, count + 1)]
            return ParsedPdf(
                page_count=count,
                pages=ordered,
                warnings=_finish_warnings(list(message.get("warnings", [])), ordered),
                metadata={str(k): str(v) for k, v in dict(start.get("metadata") or {}).items()},
                encrypted=bool(start.get("encrypted", False)),
            )
    rc = await proc.wait()
    await reader
    raise _died(rc, stderr.decode("utf-8", "replace"), limits, path)


def _finish_warnings(warnings: list[dict[str, Any]], pages: list[PageText]) -> list[dict[str, Any]]:
    empty = [p.number for p in pages if p.method == "empty"]
    if empty and len(empty) < len(pages):
        warnings.append({"type": "page_empty", "message": f"{len(empty)} page(s) have no text", "pages": empty})
    if not any(p.text.strip() for p in pages):
        warnings.append({"type": "no_text", "message": "the PDF has no text at all, even after OCR"})
    return warnings
