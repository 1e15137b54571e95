"""Ingestion throughput: PDF parsing through :func:`keel.memory.ingest.pdf.parse_pdf` (a resource-limited child
process per document), for text PDFs and for scanned pages (OCR with tesseract), against the fixed cost of one
document (starting the child). Writes its figures into docs/benchmarks.md (between the ``bench_ingest`` markers).

Run: ``.venv/bin/python bench/bench_ingest.py`` (about a minute; ``--no-doc`` prints without rewriting the doc,
``--reps`` sets the repetitions of the text cases, ``--ocr-pages`` the scanned pages, 0 to skip OCR).

Every figure is the median of whole ``parse_pdf`` calls. To add a stage (chunking, embedding), add a function
that returns :class:`Figure` rows and call it from :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _doc import cpu_model, write_section

from keel.memory.ingest.pdf import ParseLimits, ocr_available, parse_pdf
from keel.testing.pdfs import make_scanned_pdf, make_text_pdf

START, END = "<!-- bench_ingest:start -->", "<!-- bench_ingest:end -->"
TEXT_PAGES = 200
WORDS = (
    "the supplier shall invoice the customer monthly in arrears and the customer shall pay each undisputed "
    "invoice within thirty days of receipt either party may terminate this agreement with ninety days notice"
).split()


@dataclass(kw_only=True, slots=True)
class Figure:
    name: str
    pages: int
    seconds: float
    """Median wall time of one whole document."""
    note: str = ""

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds


def page_text(i: int, words: int = 450) -> str:
    body = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))
    return f"Section {i + 1}\n{body}"


async def timed(path: Path, limits: ParseLimits, reps: int) -> float:
    times: list[float] = []
    for _ in range(reps):
        start = time.perf_counter()
        parsed = await parse_pdf(path, limits=limits)
        times.append(time.perf_counter() - start)
        assert parsed.pages and all(p.text for p in parsed.pages), "a page came back empty"
    return statistics.median(times)


async def text_figures(tmp: Path, reps: int) -> list[Figure]:
    one = make_text_pdf(tmp / "one.pdf", [page_text(0)])
    many = make_text_pdf(tmp / "many.pdf", [page_text(i) for i in range(TEXT_PAGES)])
    await parse_pdf(one)  # warm the file cache and the interpreter's .pyc files
    base = await timed(one, ParseLimits(), reps * 3)
    full = await timed(many, ParseLimits(), reps)
    return [
        Figure(name="1-page text PDF (the fixed cost: child start, imports, open)", pages=1, seconds=base),
        Figure(name=f"{TEXT_PAGES}-page text PDF", pages=TEXT_PAGES, seconds=full),
    ]


async def ocr_figures(tmp: Path, pages: int) -> list[Figure]:
    scan = make_scanned_pdf(tmp / "scan.pdf", [page_text(i, 220) for i in range(pages)], dpi=300)
    out: list[Figure] = []
    for concurrency in (1, 2):
        limits = ParseLimits(ocr_dpi=300, ocr_concurrency=concurrency)
        seconds = await timed(scan, limits, 1)
        out.append(Figure(name=f"scanned, 300 dpi, ocr_concurrency={concurrency}", pages=pages, seconds=seconds))
    return out


@dataclass(kw_only=True, slots=True)
class Pipeline:
    name: str
    pages: int
    chunks: int
    seconds: float
    parse_s: float

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds


async def pipeline_figures(tmp: Path, ocr_pages: int) -> list[Pipeline]:
    """The whole ingestion as `POST /v1/documents` runs it: sandboxed parse, token chunking, MiniLM embedding on
    numpy, chunk rows in SQLite (WAL, synchronous=FULL)."""
    from keel.backends.sqlite import SQLiteStore
    from keel.memory.embeddings import open_embedder
    from keel.memory.ingest.pipeline import Ingestor, IngestSettings

    try:
        embedder = open_embedder("local:minilm")
        await embedder.embed(["warm up"])  # load the weights outside the timing
    except Exception as exc:  # the weights are not installed: say so instead of measuring a fake
        print(f"pipeline figures skipped: {exc}", file=sys.stderr)
        return []
    store = SQLiteStore(tmp / "bench.db")
    out: list[Pipeline] = []
    try:
        cases = [
            ("text PDF, 20 pages of ~450 words", make_text_pdf(tmp / "p20.pdf", [page_text(i) for i in range(20)]))
        ]
        if ocr_pages and ocr_available():
            scan = make_scanned_pdf(tmp / "pscan.pdf", [page_text(i, 220) for i in range(2)], dpi=300)
            cases.append(("scanned PDF, 2 pages at 300 dpi (OCR)", scan))
        for name, path in cases:
            ingestor = Ingestor(store, embedder, settings=IngestSettings(), clock=time.time, scratch_dir=tmp)
            start = time.perf_counter()
            parsed = await parse_pdf(path, limits=ParseLimits(ocr_dpi=300))
            parse_s = time.perf_counter() - start
            start = time.perf_counter()
            doc = await ingestor.ingest_bytes("bench", path.read_bytes(), source=f"upload:{path.name}")
            seconds = time.perf_counter() - start
            assert doc.status.value == "ingested", doc.errors
            out.append(
                Pipeline(name=name, pages=parsed.page_count, chunks=doc.chunks, seconds=seconds, parse_s=parse_s)
            )
    finally:
        await store.aclose()
        await embedder.aclose()
    return out


def pipeline_table(rows: list[Pipeline]) -> str:
    if not rows:
        return "The end-to-end ingestion was not measured (the MiniLM weights are not installed)."
    lines = [
        "End to end (`Ingestor.ingest_bytes`: parse in the sandbox, chunk by MiniLM tokens, embed with MiniLM on "
        "numpy, store in SQLite), one run each:",
        "",
        "| document | pages | chunks | wall | pages/s | parse alone | embedding's share |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = max(0.0, (r.seconds - r.parse_s) / r.seconds)
        lines.append(
            f"| {r.name} | {r.pages} | {r.chunks} | {r.seconds:.2f} s | {r.pages_per_s:.2f} | {r.parse_s:.2f} s "
            f"| {share:.0%} |"
        )
    return "\n".join(lines)


def tesseract_version() -> str:
    exe = shutil.which("tesseract")
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


async def run(reps: int, ocr_pages: int) -> tuple[list[Figure], list[Pipeline]]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        figures = await text_figures(tmp, reps)
        if ocr_pages and ocr_available():
            figures += await ocr_figures(tmp, ocr_pages)
        return figures, await pipeline_figures(tmp, ocr_pages)


def section(figures: list[Figure], reps: int, load: float, pipeline: list[Pipeline]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    base = figures[0].seconds
    rows = []
    for fig in figures:
        per_page = (fig.seconds - base) / fig.pages * 1000 if fig.pages > 1 else fig.seconds * 1000
        ratio = f"{fig.seconds / base:.1f}x"
        rows.append(
            f"| {fig.name} | {fig.pages} | {fig.seconds:.2f} s | {fig.pages_per_s:.1f} | {per_page:.1f} ms | {ratio} |"
        )
    by_name = {f.name: f for f in figures}
    ocr1 = by_name.get("scanned, 300 dpi, ocr_concurrency=1")
    ocr2 = by_name.get("scanned, 300 dpi, ocr_concurrency=2")
    text = by_name.get(f"{TEXT_PAGES}-page text PDF")
    notes = []
    if load >= (os.cpu_count() or 1):
        notes.append(
            "The machine was busy with other work during this run (load average at or above the CPU count), "
            "so the OCR figures are noisy: one earlier run had concurrency 2 slower than 1."
        )
    if ocr1 and ocr2:
        notes.append(f"OCR with 2 tesseract processes is {ocr1.seconds / ocr2.seconds:.2f}x as fast as with 1.")
    if ocr2 and text:
        notes.append(
            f"An OCR page costs about {(ocr2.seconds - base) / ocr2.pages / ((text.seconds - base) / text.pages):.0f}x "
            "a text page."
        )
    if not ocr1:
        notes.append("OCR was not measured (tesseract is not installed, or --ocr-pages 0).")
    return f"""{START}
## Ingestion: PDF parsing throughput (`bench/bench_ingest.py`)

{when}, {cpu_model()} ({os.cpu_count()} CPUs, 1-min load average {load:.1f} at the start), Python
{platform.python_version()}, {tesseract_version()}. Each figure is one whole
`parse_pdf` call (a child process per document under RLIMIT_AS/RLIMIT_CPU, pypdf text layer, pypdfium2 render,
tesseract `--oem 1 --psm 3`, `OMP_THREAD_LIMIT=1`); the text rows are medians of {reps} runs ({reps * 3} for the
1-page baseline), the OCR rows one run each. Text pages: ~450 words in Helvetica (fpdf2); scanned pages: ~220 words
rasterised at 300 dpi (Pillow, DejaVu Sans) and embedded as images. "Per page" subtracts the 1-page baseline.

| document | pages | wall | pages/s | per page | vs. 1-page baseline |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{" ".join(notes)}

{pipeline_table(pipeline)}
{END}"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ocr-pages", type=int, default=4)
    parser.add_argument("--no-doc", action="store_true")
    opts = parser.parse_args()
    load = os.getloadavg()[0]
    figures, pipeline = asyncio.run(run(opts.reps, opts.ocr_pages))
    text = section(figures, opts.reps, load, pipeline)
    print(text)
    if not opts.no_doc:
        write_section(text, START, END)
    sys.exit(0)
