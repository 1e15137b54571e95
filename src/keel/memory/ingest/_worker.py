"""The PDF parsing child process: ``python -m keel.memory.ingest._worker``, started by
:func:`keel.memory.ingest.pdf.parse_pdf`. Never import this module in the server.

It reads one JSON request on stdin (``path``, ``password``, ``limits``, ``scratch``), puts itself under
``RLIMIT_AS`` / ``RLIMIT_CPU`` *before* importing pypdf or pypdfium2 (a pypdfium2 allocation failure aborts the
process, so the limits must be in place before any parser code runs), then writes JSON lines on stdout:

- ``{"t": "start", "page_count": n, "encrypted": bool, "metadata": {...}}`` once the document is open;
- ``{"t": "page", "number": n, "text": ..., "method": ..., ...}`` for each page as it is done (OCR pages can
  finish out of order);
- ``{"t": "done", "warnings": [...]}`` at the end, or ``{"t": "error", "reason": ..., "message": ...}`` for a
  typed rejection (exit code 2). A ``MemoryError`` exits with code 3 after trying to say so.

Only the standard library is imported at module level.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_REJECTED = 2
EXIT_MEMORY = 3
MAX_REQUEST_BYTES = 1 << 20
MIN_TEXT_ALNUM = 16
"""A text layer with fewer letters and digits than this is "negligible": the page is OCRed if it draws anything."""
MIN_DRAWING_BYTES = 512
"""A page without images is OCRed only if its content stream is at least this long (vector-drawn text)."""
MAX_RENDER_PIXELS = 40_000_000
"""A page is rendered for OCR at ``ocr_dpi`` unless that would pass this many pixels (A3 at 300 dpi is 17 Mpx):
then it is scaled down to fit. Grayscale, so this is also the bitmap's size in bytes."""
MAX_PAGE_CHARS = 1_000_000
MAX_METADATA_ENTRIES = 64
MAX_METADATA_CHARS = 1000
MAX_NESTING = 16


class Rejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def set_limits(memory_mb: int, cpu_s: int) -> None:
    """Address space and CPU time for this process (and the tesseract processes it starts, which inherit them).
    The CPU soft limit sends SIGXCPU; the hard limit, a little later, SIGKILL. No core dumps."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard_as = resource.getrlimit(resource.RLIMIT_AS)
    mem = max(64, memory_mb) << 20
    if hard_as != resource.RLIM_INFINITY:
        mem = min(mem, hard_as)
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    _, hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)
    soft, hard = max(1, cpu_s), max(1, cpu_s) + 5
    if hard_cpu != resource.RLIM_INFINITY:
        soft, hard = min(soft, hard_cpu), min(hard, hard_cpu)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def die_with_parent() -> None:
    """Linux: SIGKILL this process if the parent dies, so a crashed server leaves no parser running."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --- accounting ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Budget:
    """Decoded bytes left before the document counts as a decompression bomb."""

    cap: int
    used: int = 0

    def take(self, n: int, what: str) -> None:
        self.used += n
        if self.used > self.cap:
            raise Rejected(
                "too_large",
                f"the PDF decompresses past the limit of {self.cap:,} bytes (max_decompressed_bytes) at {what}; "
                "it may be a decompression bomb",
            )


@dataclass(slots=True)
class PageScan:
    content_bytes: int = 0
    has_image: bool = False
    image_bytes: int = 0
    """Declared size of the decoded images: what rendering the page would allocate for them."""


@dataclass(slots=True)
class Options:
    cap: int
    max_pages: int
    ocr: bool
    dpi: int
    lang: str
    min_word: float
    min_page: float
    concurrency: int
    cpu_s: int
    scratch: Path
    warnings: list[dict[str, Any]] = field(default_factory=list)


def _resolve(obj: Any) -> Any:
    return obj.get_object() if hasattr(obj, "get_object") else obj


def scan_page(page: Any, number: int, budget: Budget, seen: set[int]) -> PageScan:
    """Decode the page's content streams and the form XObjects it draws (recursively), counting every decoded
    byte against the budget *before* the text extractor touches them; note the images and their declared size.
    pypdf caches what it decoded, so the extractor does not decode it again."""
    from pypdf.errors import LimitReachedError

    scan = PageScan()
    try:
        contents = page.get_contents()
        data = contents.get_data() if contents is not None else b""
    except LimitReachedError:
        budget.take(budget.cap + 1, f"page {number}")
        raise  # unreachable: take() raised
    budget.take(len(data), f"page {number}")
    scan.content_bytes = len(data)
    if re.search(rb"(?:^|\s)BI\s", data):
        scan.has_image = True  # an inline image
    _scan_resources(page.get("/Resources"), number, budget, seen, scan, 0)
    return scan


def _scan_resources(resources: Any, number: int, budget: Budget, seen: set[int], scan: PageScan, depth: int) -> None:
    from pypdf.errors import LimitReachedError

    resources = _resolve(resources)
    if depth > MAX_NESTING or not hasattr(resources, "get"):
        return
    xobjects = _resolve(resources.get("/XObject"))
    if not hasattr(xobjects, "values"):
        return
    for ref in list(xobjects.values())[:1000]:
        key = getattr(ref, "idnum", None)
        xobj = _resolve(ref)
        if not hasattr(xobj, "get"):
            continue
        subtype = xobj.get("/Subtype")
        if subtype == "/Image":
            scan.has_image = True
            scan.image_bytes += _image_bytes(xobj)
        elif subtype == "/Form":
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            try:
                data = xobj.get_data()
            except LimitReachedError:
                budget.take(budget.cap + 1, f"a form on page {number}")
                raise
            budget.take(len(data), f"a form on page {number}")
            scan.content_bytes += len(data)
            _scan_resources(xobj.get("/Resources"), number, budget, seen, scan, depth + 1)


def _image_bytes(xobj: Any) -> int:
    try:
        width, height = int(_resolve(xobj.get("/Width", 0))), int(_resolve(xobj.get("/Height", 0)))
        bpc = int(_resolve(xobj.get("/BitsPerComponent", 8)))
    except (TypeError, ValueError):
        return 0
    space = _resolve(xobj.get("/ColorSpace"))
    components = 4 if space == "/DeviceCMYK" else 1 if space in ("/DeviceGray", "/CalGray") else 3
    return max(0, width) * max(0, height) * components * max(1, bpc) // 8


# --- OCR ----------------------------------------------------------------------------------------------------


def render_pgm(document: Any, index: int, opts: Options, budget: Budget, scan: PageScan) -> tuple[Path, int]:
    """Render page ``index`` in grayscale to a PGM file (no Pillow needed); returns the path and the dpi used."""
    page = document[index]
    try:
        width_pt, height_pt = page.get_size()
        dpi = float(opts.dpi)
        if width_pt * height_pt * (dpi / 72) ** 2 > MAX_RENDER_PIXELS:
            dpi = 72 * math.sqrt(MAX_RENDER_PIXELS / max(1.0, width_pt * height_pt))
            opts.warnings.append(
                {
                    "type": "ocr_downscaled",
                    "message": f"page {index + 1} is very large: rendered at {dpi:.0f} dpi instead of {opts.dpi}",
                    "page": index + 1,
                }
            )
        budget.take(scan.image_bytes + round(width_pt * height_pt * (dpi / 72) ** 2), f"rendering page {index + 1}")
        bitmap = page.render(scale=dpi / 72, grayscale=True)
        try:
            width, height, stride = bitmap.width, bitmap.height, bitmap.stride
            buffer = memoryview(bitmap.buffer).cast("B")
            path = opts.scratch / f"page-{index + 1}.pgm"
            with path.open("wb") as fh:
                fh.write(b"P5\n%d %d\n255\n" % (width, height))
                if stride == width:
                    fh.write(buffer[: width * height])
                else:
                    for row in range(height):
                        fh.write(buffer[row * stride : row * stride + width])
        finally:
            bitmap.close()
    finally:
        page.close()
    return path, max(1, round(dpi))


def run_tesseract(exe: str, image: Path, lang: str, dpi: int, timeout: float) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(
            [exe, str(image), "stdout", "--dpi", str(dpi), "-l", lang, "--oem", "1", "--psm", "3", "tsv"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, "", f"tesseract took longer than {timeout:g} s"
    finally:
        image.unlink(missing_ok=True)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")[-500:]


@dataclass(slots=True)
class OcrText:
    text: str
    confidence: float | None
    dropped: int
    overall: float | None
    """Character-weighted mean confidence of every word tesseract reported, kept or not."""
    words: int


def parse_tsv(tsv: str, min_word: float) -> OcrText:
    """Keep the words at or above ``min_word``; rebuild lines (a line per tesseract line, a blank line between
    paragraphs)."""
    lines: dict[tuple[int, int, int], list[str]] = {}
    kept: list[float] = []
    dropped = 0
    weighted = chars = 0.0
    for row in tsv.splitlines()[1:]:
        cols = row.split("\t")
        if len(cols) < 12:
            continue
        word = cols[11].strip()
        try:
            conf = float(cols[10])
            key = (int(cols[2]), int(cols[3]), int(cols[4]))
        except ValueError:
            continue
        if conf < 0 or not word:
            continue  # not a word row
        weighted += conf * len(word)
        chars += len(word)
        if conf >= min_word:
            kept.append(conf)
            lines.setdefault(key, []).append(word)
        else:
            dropped += 1
    out: list[str] = []
    previous: tuple[int, int] | None = None
    for (block, par, _line), words in lines.items():
        if previous is not None and previous != (block, par):
            out.append("")
        out.append(" ".join(words))
        previous = (block, par)
    return OcrText(
        text="\n".join(out),
        confidence=round(sum(kept) / len(kept), 1) if kept else None,
        dropped=dropped,
        overall=weighted / chars if chars else None,
        words=len(kept) + dropped,
    )


def ocr_page(number: int, layer_text: str, result: tuple[int, str, str], opts: Options) -> dict[str, Any]:
    code, tsv, err = result
    if code != 0:
        opts.warnings.append(
            {"type": "ocr_failed", "message": f"OCR of page {number} failed: {err.strip()[-300:]}", "page": number}
        )
        return page_message(number, layer_text, opts)
    ocr = parse_tsv(tsv, opts.min_word)
    if ocr.words == 0 or _alnum(ocr.text) <= _alnum(layer_text) and not ocr.dropped:
        return page_message(number, layer_text, opts)
    # Flag rule: the page is flagged when the character-weighted mean confidence of *all* the words tesseract
    # reported (kept and dropped) is below ocr_min_page_confidence: most of what it read is unreliable, so even
    # the words that passed the per-word bar are suspect (noise, handwriting, a photo). A clean page with a few
    # junk words (a logo, a stamp) keeps a high mean, loses only those words, and is not flagged.
    flagged = ocr.overall is not None and ocr.overall < opts.min_page
    if flagged:
        opts.warnings.append(
            {
                "type": "ocr_low_confidence",
                "message": f"page {number}: OCR confidence is low ({ocr.overall:.0f} < {opts.min_page:g}); "
                f"{ocr.dropped} of {ocr.words} words were below the word bar; the page is flagged and its text left "
                "out",
                "page": number,
            }
        )
    return {
        "t": "page",
        "number": number,
        "text": "" if flagged else _cap(ocr.text, number, opts),
        "method": "ocr",
        "confidence": ocr.confidence,
        "dropped_words": ocr.dropped,
        "flagged": flagged,
    }


# --- pages --------------------------------------------------------------------------------------------------


def _alnum(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def _cap(text: str, number: int, opts: Options) -> str:
    if len(text) > MAX_PAGE_CHARS:
        opts.warnings.append(
            {
                "type": "page_truncated",
                "message": f"page {number}: its text was cut to {MAX_PAGE_CHARS:,} characters",
                "page": number,
            }
        )
        return text[:MAX_PAGE_CHARS]
    return text


def page_message(number: int, text: str, opts: Options) -> dict[str, Any]:
    method = "text" if text.strip() else "empty"
    return {"t": "page", "number": number, "text": _cap(text, number, opts), "method": method}


def open_reader(path: str, password: str | None, opts: Options) -> tuple[Any, bool, str | None]:
    """The reader, whether the file is encrypted, and the password that opened it (for pypdfium2)."""
    from pypdf import PasswordType, PdfReader

    try:
        reader = PdfReader(path)
        encrypted = reader.is_encrypted
    except Exception as exc:  # pypdf raises many kinds of errors on damaged input
        raise Rejected("corrupt", f"the file is not a readable PDF ({type(exc).__name__}: {exc})"[:500]) from None
    if not encrypted:
        if password:
            opts.warnings.append(
                {"type": "password_ignored", "message": "a password was given but the PDF is not encrypted"}
            )
        return reader, False, None
    try:
        if password and reader.decrypt(password) != PasswordType.NOT_DECRYPTED:
            return reader, True, password
        if reader.decrypt("") != PasswordType.NOT_DECRYPTED:
            return reader, True, ""  # encrypted only to restrict permissions (an owner password)
    except Exception as exc:  # an unsupported or damaged security handler
        raise Rejected("corrupt", f"the PDF's encryption cannot be read ({type(exc).__name__}: {exc})"[:500]) from None
    if password:
        raise Rejected("wrong_password", "the PDF is encrypted and the password given does not open it")
    raise Rejected("encrypted", "the PDF is encrypted: a password is needed to read it")


def page_count(reader: Any, max_pages: int) -> int:
    """Checks the declared /Count first (cheap, before the page tree is walked), then the real count."""
    try:
        declared = _resolve(_resolve(reader.trailer["/Root"])["/Pages"]).get("/Count")
        declared = int(_resolve(declared))
    except Exception:
        declared = 0
    if declared > max_pages:
        raise Rejected("too_many_pages", f"the PDF has {declared:,} pages; the limit is {max_pages:,}")
    try:
        count = len(reader.pages)
    except Exception as exc:
        raise Rejected("corrupt", f"the PDF's page tree cannot be read ({type(exc).__name__}: {exc})"[:500]) from None
    if count > max_pages:
        raise Rejected("too_many_pages", f"the PDF has {count:,} pages; the limit is {max_pages:,}")
    if count == 0:
        raise Rejected("corrupt", "the PDF has no pages (it may be damaged)")
    return count


def metadata(reader: Any, opts: Options) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        info = reader.metadata
        items = list(info.items()) if info is not None else []
    except Exception as exc:  # a damaged info dictionary must not hide the text
        opts.warnings.append({"type": "metadata_unreadable", "message": f"document info unreadable: {exc}"[:300]})
        return out
    for key, value in items[:MAX_METADATA_ENTRIES]:
        value = _resolve(value)
        if isinstance(value, str):
            out[str(key).lstrip("/")[:100]] = str(value)[:MAX_METADATA_CHARS]
    return out


_PYPDF_CAPS = (
    "zlib_maximum_output_length",
    "lzw_maximum_output_length",
    "run_length_maximum_output_length",
    "jbig2_maximum_output_length",
    "brotli_maximum_output_length",
    "array_based_stream_maximum_output_length",
    "stream_decoding_work_maximum_length",
)


def cap_pypdf(cap: int) -> None:
    """Set pypdf's own per-stream decoding caps to the document's budget: no one stream decodes past it (it raises
    LimitReachedError instead), and none is refused below it."""
    import dataclasses

    import pypdf

    overwrite = getattr(pypdf, "overwrite_configuration", None)
    if overwrite is not None:  # pypdf >= 7
        names = {f.name for f in dataclasses.fields(pypdf.Configuration)}
        overwrite(**{name: cap + 1 for name in _PYPDF_CAPS if name in names})
        return
    from pypdf import filters  # older pypdf: module constants

    for name in ("ZLIB_MAX_OUTPUT_LENGTH", "LZW_MAX_OUTPUT_LENGTH", "RUN_LENGTH_MAX_OUTPUT_LENGTH"):
        if hasattr(filters, name):
            setattr(filters, name, cap + 1)


def options(request: dict[str, Any]) -> Options:
    limits = request["limits"]
    return Options(
        cap=int(limits["max_decompressed_bytes"]),
        max_pages=int(limits["max_pages"]),
        ocr=bool(limits["ocr"]),
        dpi=int(limits["ocr_dpi"]),
        lang=str(limits["ocr_lang"]),
        min_word=float(limits["ocr_min_word_confidence"]),
        min_page=float(limits["ocr_min_page_confidence"]),
        concurrency=max(1, int(limits["ocr_concurrency"])),
        cpu_s=int(limits["cpu_s"]),
        scratch=Path(request["scratch"]),
    )


@dataclass(slots=True)
class Ocr:
    """Renders pages (in this thread: PDFium is not thread-safe) and runs up to ``concurrency`` tesseract
    processes at once, emitting each page as its OCR finishes."""

    path: str
    password: str | None
    opts: Options
    exe: str
    pool: ThreadPoolExecutor
    document: Any = None
    pending: dict[Future[tuple[int, str, str]], tuple[int, str]] = field(default_factory=dict)

    def submit(self, index: int, layer_text: str, budget: Budget, scan: PageScan) -> None:
        if self.document is None:
            import pypdfium2  # type: ignore[import-untyped]

            self.document = pypdfium2.PdfDocument(self.path, password=self.password or None)
        image, dpi = render_pgm(self.document, index, self.opts, budget, scan)
        timeout = float(max(30, self.opts.cpu_s))
        future = self.pool.submit(run_tesseract, self.exe, image, self.opts.lang, dpi, timeout)
        self.pending[future] = (index + 1, layer_text)
        while len(self.pending) >= self.opts.concurrency:
            self._finish()

    def drain(self) -> None:
        while self.pending:
            self._finish()

    def _finish(self) -> None:
        for future in wait(self.pending, return_when=FIRST_COMPLETED).done:
            number, layer = self.pending.pop(future)
            emit(ocr_page(number, layer, future.result(), self.opts))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.document is not None:
            self.document.close()


def parse(request: dict[str, Any]) -> None:
    from pypdf.errors import LimitReachedError

    opts = options(request)
    cap_pypdf(opts.cap)
    reader, encrypted, opened_with = open_reader(str(request["path"]), request.get("password"), opts)
    count = page_count(reader, opts.max_pages)
    emit({"t": "start", "page_count": count, "encrypted": encrypted, "metadata": metadata(reader, opts)})

    budget = Budget(opts.cap)
    seen: set[int] = set()
    exe = shutil.which("tesseract") if opts.ocr else None
    ocr = Ocr(str(request["path"]), opened_with, opts, exe, ThreadPoolExecutor(opts.concurrency)) if exe else None
    needs_ocr: list[int] = []
    unreadable: list[int] = []
    try:
        for index in range(count):
            number = index + 1
            try:
                page = reader.pages[index]
                scan = scan_page(page, number, budget, seen)
                text = (page.extract_text() or "").replace("\r\n", "\n").replace("\r", "\n")
            except (Rejected, LimitReachedError, MemoryError):
                raise
            except Exception:  # one damaged page must not hide the others
                unreadable.append(number)
                emit(page_message(number, "", opts))
                continue
            if _alnum(text) >= MIN_TEXT_ALNUM or not (scan.has_image or scan.content_bytes >= MIN_DRAWING_BYTES):
                emit(page_message(number, text, opts))
                continue
            needs_ocr.append(number)
            if ocr is None:
                emit(page_message(number, text, opts))
            else:
                ocr.submit(index, text, budget, scan)
        if ocr is not None:
            ocr.drain()
    except LimitReachedError:
        budget.take(budget.cap + 1, "a stream")
    finally:
        if ocr is not None:
            ocr.close()
    if unreadable and len(unreadable) == count:
        raise Rejected("corrupt", "no page of the PDF could be read (it may be damaged)")
    summarise(opts, unreadable, needs_ocr, exe is not None)
    emit({"t": "done", "warnings": opts.warnings})


def summarise(opts: Options, unreadable: list[int], needs_ocr: list[int], ocr_ran: bool) -> None:
    if unreadable:
        opts.warnings.append(
            {
                "type": "page_unreadable",
                "message": f"pages {_ranges(unreadable)} could not be read",
                "pages": unreadable,
            }
        )
    if not needs_ocr:
        return
    pages = _ranges(needs_ocr)
    if ocr_ran:
        kind, message = "ocr_used", f"pages {pages} have no text layer and were OCRed"
    elif opts.ocr:
        kind = "ocr_unavailable"
        message = f"pages {pages} have no text layer and OCR is not available (install tesseract-ocr); they are empty"
    else:
        kind, message = "ocr_disabled", f"pages {pages} have no text layer and OCR is off; they are empty"
    opts.warnings.append({"type": kind, "message": message, "pages": needs_ocr})


def _ranges(numbers: list[int]) -> str:
    numbers = sorted(numbers)
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], -1]:
        if n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(out)


def main(read: Callable[[int], bytes] = sys.stdin.buffer.read) -> int:
    die_with_parent()
    try:
        request = json.loads(read(MAX_REQUEST_BYTES))
        set_limits(int(request["limits"]["memory_mb"]), int(request["limits"]["cpu_s"]))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        print(f"bad request: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    import logging

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        parse(request)
    except Rejected as exc:
        emit({"t": "error", "reason": exc.reason, "message": exc.message})
        return EXIT_REJECTED
    except MemoryError:
        try:
            emit({"t": "error", "reason": "limit_exceeded", "message": "memory"})
        finally:
            os._exit(EXIT_MEMORY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
