"""A small PDF writer for tests and sample documents, built on pypdf alone.

:func:`make_pdf` lays text out on US Letter pages in Helvetica (one of the PDF standard 14 fonts, so nothing is
embedded), with a document info dictionary and optional AES-256 encryption. The text layer it writes is plain
``Tj`` strings, so ``pypdf.PdfReader(...).pages[i].extract_text()`` gives the text back.

The font uses ``WinAnsiEncoding`` (Windows code page 1252, a superset of printable Latin-1): any character it
cannot encode -- CJK, emoji, zero-width characters, control characters -- is written as ``?``. Tabs become four
spaces. :func:`corrupt_pdf` gives bytes that look like a PDF (``%PDF-``) but cannot be parsed.

For the ingestion tests and benchmarks (fpdf2 and Pillow, dev-only, imported lazily): :func:`make_text_pdf`
(a real text layer), :func:`make_scanned_pdf` (image-only pages, optionally noisy), :func:`make_garbage_scan_pdf`
(junk that OCR reads with low confidence), :func:`make_pdf_bomb` (a content stream or image that inflates ~1000:1)
and :func:`make_many_pages_pdf` (10,000 pages in milliseconds; pypdf alone).

For tests and samples only: this is not a general PDF generator.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, overload

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


# --- generators for the ingestion tests and benchmarks --------------------------------------------------------
#
# fpdf2 and Pillow are dev-only dependencies: they are imported inside the functions that need them, so that
# ``keel.testing`` stays importable without them.

_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
_FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")


def _write(path: str | os.PathLike[str], data: bytes) -> Path:
    out = Path(path)
    out.write_bytes(data)
    return out


def make_text_pdf(path: str | os.PathLike[str], pages: Sequence[str], *, font_size: float = 11) -> Path:
    """Write a PDF with a real text layer (fpdf2, Helvetica) to ``path``: one Letter page per entry of ``pages``,
    each entry's lines wrapped at ~90 characters (lines past the bottom margin are dropped). Returns ``path``."""
    from fpdf import FPDF

    pdf = FPDF(format="letter", unit="pt")
    pdf.set_auto_page_break(False)
    pdf.set_font("helvetica", size=font_size)
    leading = font_size * 1.25
    for text in pages if pages else [""]:
        pdf.add_page()
        y = MARGIN + font_size
        for line in _lines(text):
            if y > PAGE_HEIGHT - MARGIN:
                break
            if line:
                # Helvetica in fpdf2 is latin-1 only.
                pdf.text(MARGIN, y, line.encode("latin-1", "replace").decode("latin-1"))
            y += leading
    return _write(path, bytes(pdf.output()))


def _font_file() -> Path | None:
    for folder in _FONT_DIRS:
        root = Path(folder)
        if not root.is_dir():
            continue
        for name in _FONT_NAMES:
            found = next(iter(sorted(root.rglob(name))), None)
            if found is not None:
                return found
    return None


def _raster_page(text: str, dpi: int, noise: bool, seed: int) -> Any:
    """A Letter page at ``dpi`` with ``text`` drawn in black on white, as a Pillow grayscale image."""
    import random

    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    width, height = round(8.5 * dpi), round(11 * dpi)
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    size = max(8, round(12 * dpi / 72))  # 12 pt
    font_path = _font_file()
    font: Any = ImageFont.truetype(str(font_path), size) if font_path else ImageFont.load_default(size=size)
    x = y = round(dpi)  # 1-inch margins
    for line in _lines(text):
        if y > height - dpi - size:
            break
        if line:
            draw.text((x, y), line, font=font, fill=0)
        y += round(size * 1.4)
    if noise:
        rng = random.Random(seed)
        pixels = img.load()
        assert pixels is not None
        for _ in range(width * height // 100):  # salt and pepper on 1% of the pixels
            pixels[rng.randrange(width), rng.randrange(height)] = rng.choice((0, 255))
        img = img.filter(ImageFilter.GaussianBlur(0.5))
    return img


def _images_pdf(images: Sequence[Any], dpi: int) -> bytes:
    """An image-only PDF (no text layer, like a scanner's output): one page per image, the image filling it."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format="letter")
    pdf.set_auto_page_break(False)
    for img in images:
        w, h = img.size[0] * 72 / dpi, img.size[1] * 72 / dpi
        pdf.add_page(format=(w, h))
        pdf.image(img, x=0, y=0, w=w, h=h)
    return bytes(pdf.output())


@overload
def make_scanned_pdf(
    path: str | os.PathLike[str], pages: Sequence[str], /, *, dpi: int = 200, noise: bool = False
) -> Path: ...
@overload
def make_scanned_pdf(pages: Sequence[str], /, *, dpi: int = 200, noise: bool = False) -> bytes: ...
def make_scanned_pdf(
    first: str | os.PathLike[str] | Sequence[str],
    pages: Sequence[str] | None = None,
    /,
    *,
    dpi: int = 200,
    noise: bool = False,
) -> Path | bytes:
    """A "scanned" PDF: each entry of ``pages`` rasterised with Pillow (DejaVu Sans when a TTF font is found, else
    Pillow's default font) at ``dpi`` and embedded as a page-sized image, with no text layer.

    ``make_scanned_pdf(path, pages)`` writes the file and returns ``path``; ``make_scanned_pdf(pages)`` returns the
    bytes. ``noise`` sprinkles salt-and-pepper noise and a slight blur over the text (still legible).
    """
    if pages is None:
        if isinstance(first, (str, os.PathLike)):
            raise TypeError("make_scanned_pdf(path, pages) or make_scanned_pdf(pages)")
        return _images_pdf([_raster_page(t, dpi, noise, i) for i, t in enumerate(first)], dpi)
    if not isinstance(first, (str, os.PathLike)):
        raise TypeError("make_scanned_pdf(path, pages): path must be a str or a path")
    return _write(first, _images_pdf([_raster_page(t, dpi, noise, i) for i, t in enumerate(pages)], dpi))


def make_garbage_scan_pdf(
    path: str | os.PathLike[str], *, pages: int = 1, dpi: int = 150, lines: int = 12, seed: int = 0
) -> Path:
    """A scanned-looking PDF of junk: ``lines`` rows of random letter-sized squiggles that an OCR engine reads as
    low-confidence nonsense. For the "never embed junk OCR text" path."""
    import random

    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    images = []
    for _ in range(max(1, pages)):
        width, height = round(8.5 * dpi), round(11 * dpi)
        img = Image.new("L", (width, height), 255)
        draw = ImageDraw.Draw(img)
        unit = max(4, dpi // 12)
        for row in range(dpi, min(height - dpi, dpi + lines * unit * 3), unit * 3):
            x = dpi
            while x < width - dpi:
                # a "word" of squiggles about the size of printed letters
                for _ in range(rng.randint(2, 7)):
                    points = [(x + rng.randint(0, unit), row + rng.randint(0, 2 * unit)) for _ in range(4)]
                    draw.line(points, fill=rng.randint(0, 90), width=max(1, unit // 4))
                    x += unit
                x += unit * 2
        images.append(img.filter(ImageFilter.GaussianBlur(1.2)))
    return _write(path, _images_pdf(images, dpi))


def _deflate_repeated(byte: bytes, total: int) -> bytes:
    """A zlib stream that inflates to ``total`` copies of ``byte``, made without compressing all of it: one
    full-flushed deflate block for 1 MiB is repeated, then a final block for the rest."""
    import zlib

    chunk_size = 1 << 20
    chunks, rest = divmod(max(1, total), chunk_size)
    chunk = byte * chunk_size
    block = zlib.compressobj(9, wbits=-15)
    repeated = block.compress(chunk) + block.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, wbits=-15)
    last = tail.compress(byte * rest) + tail.flush()
    adler = 1
    for _ in range(chunks):
        adler = zlib.adler32(chunk, adler)
    adler = zlib.adler32(byte * rest, adler)
    return b"\x78\xda" + repeated * chunks + last + adler.to_bytes(4, "big")


def make_pdf_bomb(path: str | os.PathLike[str], inflated_bytes: int = 1 << 30, *, image: bool = False) -> Path:
    """A one-page PDF that is about 1 KB on disk per MB it inflates to (1 GiB: a ~1 MB file), made in well
    under a second. By default the page's content stream inflates to ``inflated_bytes`` of spaces; with
    ``image=True`` the page instead draws a grayscale image of about ``inflated_bytes`` pixels (a text extractor
    never decodes it; a renderer does)."""
    if not image:
        return _write(path, _raw_pdf([_deflate_repeated(b" ", inflated_bytes)], filtered=True))
    side = max(1, math.isqrt(max(1, inflated_bytes)))
    data = _deflate_repeated(b"\x00", side * side)
    content = b"q 612 0 0 792 0 0 cm /Im0 Do Q"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Count 1 /Kids [3 0 R] >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /Im0 4 0 R >> >> "
        b"/Contents 5 0 R >>",
        b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray /BitsPerComponent 8 "
        b"/Filter /FlateDecode /Length %d >>\nstream\n" % (side, side, len(data)) + data + b"\nendstream",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
    ]
    return _write(path, _assemble(objects))


def make_many_pages_pdf(path: str | os.PathLike[str], pages: int = 10_000, *, text: str = "") -> Path:
    """A valid PDF with ``pages`` Letter pages, written by hand (10,000 pages in a few tens of ms). The pages are
    blank, or each shows ``text`` (Helvetica, wrapped like :func:`make_pdf`, one page's worth at most): a cheap
    way to make a document that takes a while to parse."""
    content = _content(_lines(text)[:50], 11) if text.strip() else b""
    return _write(path, _raw_pdf([content] * max(1, pages), filtered=False))


def _raw_pdf(contents: Sequence[bytes], *, filtered: bool) -> bytes:
    """A minimal PDF: catalog, one flat page tree, one page per entry of ``contents`` (empty: no /Contents)."""
    objects: list[bytes] = []
    n = len(contents)
    first_page = 3
    content_ids: list[int | None] = []
    next_id = first_page + n
    for data in contents:
        content_ids.append(next_id if data else None)
        if data:
            next_id += 1
    kids = b" ".join(b"%d 0 R" % (first_page + i) for i in range(n))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(b"<< /Type /Pages /Count %d /Kids [%s] >>" % (n, kids))
    for cid in content_ids:
        page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 %d 0 R >> >>" % (
            next_id
        )
        if cid is not None:
            page += b" /Contents %d 0 R" % cid
        objects.append(page + b" >>")
    for data in contents:
        if data:
            flt = b" /Filter /FlateDecode" if filtered else b""
            objects.append(b"<< /Length %d%s >>\nstream\n" % (len(data), flt) + data + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    return _assemble(objects)


def _assemble(objects: Sequence[bytes]) -> bytes:
    """Number ``objects`` from 1 (the first is the catalog), with a cross-reference table and trailer."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
