"""A small PDF writer for tests and sample documents, built on pypdf alone.

:func:`make_pdf` lays text out on US Letter pages in Helvetica (one of the PDF standard 14 fonts, so nothing is
embedded), with a document info dictionary and optional AES-256 encryption. The text layer it writes is plain
``Tj`` strings, so ``pypdf.PdfReader(...).pages[i].extract_text()`` gives the text back.

The font uses ``WinAnsiEncoding`` (Windows code page 1252, a superset of printable Latin-1): any character it
cannot encode -- CJK, emoji, zero-width characters, control characters -- is written as ``?``. Tabs become four
spaces. :func:`corrupt_pdf` gives bytes that look like a PDF (``%PDF-``) but cannot be parsed.

For tests and samples only: this is not a general PDF generator.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from io import BytesIO

from pypdf import PdfWriter
from pypdf.generic import ContentStream, DictionaryObject, NameObject

PAGE_WIDTH = 612.0
"""US Letter, in points."""
PAGE_HEIGHT = 792.0
MARGIN = 72.0
WRAP_AT = 90
"""Lines longer than this many characters are wrapped."""


def _encode(text: str) -> bytes:
    """``text`` as a PDF literal string body in WinAnsi (cp1252): unencodable characters become ``?``."""
    out = bytearray()
    for ch in text:
        try:
            raw = ch.encode("cp1252")
        except UnicodeEncodeError:
            raw = b"?"
        if raw[0] < 0x20 or raw[0] == 0x7F:
            raw = b"?"  # control characters have no glyph
        elif raw in (b"\\", b"(", b")"):
            raw = b"\\" + raw
        out += raw
    return bytes(out)


def _lines(text: str) -> list[str]:
    lines: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.replace("\t", "    ").rstrip()
        if not line:
            lines.append("")
            continue
        lines.extend(textwrap.wrap(line, WRAP_AT, break_long_words=True, break_on_hyphens=False) or [""])
    # A page's trailing blank lines carry no text.
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _content(lines: Sequence[str], font_size: float) -> bytes:
    leading = font_size * 1.25
    parts = [b"BT", b"/F1 %s Tf" % _num(font_size), b"%s TL" % _num(leading)]
    parts.append(b"%s %s Td" % (_num(MARGIN), _num(PAGE_HEIGHT - MARGIN - font_size)))
    for i, line in enumerate(lines):
        if i:
            parts.append(b"T*")
        if line:
            parts.append(b"(" + _encode(line) + b") Tj")
    parts.append(b"ET")
    return b"\n".join(parts) + b"\n"


def _num(value: float) -> bytes:
    return (f"{value:.2f}".rstrip("0").rstrip(".")).encode("ascii")


def make_pdf(
    pages: Sequence[str],
    *,
    metadata: Mapping[str, str] | None = None,
    password: str | None = None,
    font_size: float = 11,
) -> bytes:
    """A PDF with one or more Letter pages per entry of ``pages``.

    Each entry's text is split on newlines and wrapped at ~90 characters; an entry that does not fit on one page
    continues on the next. An empty entry gives a page with no text layer (like a scanned page). ``metadata``
    fills the document info dictionary (keys as ``"Title"`` or ``"/Title"``). ``password`` encrypts the file
    with AES-256 (the same password opens and owns it). Characters outside WinAnsi (cp1252) are written as ``?``.
    """
    if font_size <= 0:
        raise ValueError("font_size must be positive")
    leading = font_size * 1.25
    per_page = max(1, math.floor((PAGE_HEIGHT - 2 * MARGIN) / leading))
    writer = PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
            NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
        }
    )
    for text in pages if pages else [""]:
        lines = _lines(text)
        chunks = [lines[i : i + per_page] for i in range(0, len(lines), per_page)] or [[]]
        for chunk in chunks:
            page = writer.add_blank_page(width=PAGE_WIDTH, height=PAGE_HEIGHT)
            page[NameObject("/Resources")] = DictionaryObject(
                {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
            )
            if chunk:
                stream = ContentStream(None, None)
                stream.set_data(_content(chunk, font_size))
                page.replace_contents(stream)
    if metadata:
        writer.add_metadata({(k if k.startswith("/") else "/" + k): str(v) for k, v in metadata.items()})
    if password is not None:
        writer.encrypt(user_password=password, owner_password=password, algorithm="AES-256")
    buf = BytesIO()
    writer.write(buf)
    return buf.getvalue()


def corrupt_pdf() -> bytes:
    """Bytes that start like a PDF but that no PDF parser can read: a header, half an object, then noise."""
    return (
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n"
        b"2 0 obj << /Kids [3 0 R /Count \x00\x01\x02 stream\n\xff\xfe\xfd garbled \x9c\x8b\x7f"
    )
