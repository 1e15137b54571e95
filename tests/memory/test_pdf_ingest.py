"""keel.memory.ingest.pdf: parsing untrusted PDFs in a resource-limited child, with OCR for scanned pages."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pypdf import PdfWriter

from keel.errors import DocumentRejected, RuntimeFailure
from keel.memory.ingest.pdf import ParsedPdf, ParseLimits, _died, ocr_available, parse_pdf
from keel.testing.loop import LoopTicks
from keel.testing.pdfs import (
    corrupt_pdf,
    make_garbage_scan_pdf,
    make_many_pages_pdf,
    make_pdf,
    make_pdf_bomb,
    make_scanned_pdf,
    make_text_pdf,
)

needs_tesseract = pytest.mark.skipif(
    not ocr_available(), reason="tesseract is not installed (apt-get install tesseract-ocr); OCR paths are skipped"
)
# Small OCR jobs: a few lines at 150 dpi take well under a second each.
OCR = ParseLimits(ocr_dpi=150)
SLOW_TEXT = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 60
"""2,000 pages of this take the child ~10 s to parse: the slow job for timeouts and cancellation."""


def workers() -> list[int]:
    """Our parser children still alive (Linux /proc)."""
    me = str(os.getpid())
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == me and b"keel.memory.ingest._worker" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    yield
    assert workers() == []


async def rejected(path: Path, **kwargs: object) -> DocumentRejected:
    with pytest.raises(DocumentRejected) as info:
        await parse_pdf(path, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- text ---------------------------------------------------------------------------------------------------


async def test_text_pdf_pages_and_progress(tmp_path: Path, no_leftovers: None) -> None:
    pdf = make_text_pdf(tmp_path / "t.pdf", ["Invoice 4471 for ACME Corporation", "Payment is due within 30 days"])
    calls: list[tuple[int, int]] = []
    parsed = await parse_pdf(pdf, on_page=lambda done, total: calls.append((done, total)))
    assert parsed.page_count == 2
    assert [p.number for p in parsed.pages] == [1, 2]
    assert all(p.method == "text" and p.confidence is None and not p.flagged for p in parsed.pages)
    assert "Invoice 4471 for ACME Corporation" in parsed.pages[0].text
    assert "Payment is due within 30 days" in parsed.pages[1].text
    assert calls == [(1, 2), (2, 2)]
    assert parsed.encrypted is False
    assert parsed.warnings == []


async def test_async_progress_metadata_and_blank_pages(tmp_path: Path) -> None:
    path = tmp_path / "m.pdf"
    path.write_bytes(make_pdf(["First page words here", "", "Third page words here"], metadata={"Title": "Q3 plan"}))
    seen: list[int] = []

    async def progress(done: int, total: int) -> None:
        await asyncio.sleep(0)
        seen.append(done)

    parsed = await parse_pdf(path, on_page=progress)
    assert seen == [1, 2, 3]
    assert parsed.metadata["Title"] == "Q3 plan"
    assert [p.method for p in parsed.pages] == ["text", "empty", "text"]
    # A blank page (nothing drawn) is not sent to OCR.
    assert [w["type"] for w in parsed.warnings] == ["page_empty"]
    assert parsed.warnings[0]["pages"] == [2]


async def test_the_event_loop_keeps_ticking(tmp_path: Path) -> None:
    pdf = make_many_pages_pdf(tmp_path / "slow.pdf", 300, text=SLOW_TEXT)
    async with LoopTicks(every=0.01) as loop:
        parsed = await parse_pdf(pdf)
    assert parsed.page_count == 300
    assert loop.ticks >= 20  # the parse takes over a second; a blocked loop would not tick at all


# --- OCR ----------------------------------------------------------------------------------------------------


@needs_tesseract
async def test_scanned_pdf_is_ocred(tmp_path: Path, no_leftovers: None) -> None:
    pdf = make_scanned_pdf(
        tmp_path / "scan.pdf",
        ["INVOICE 4471\nTotal due: 1,250 EUR\nPayment within 30 days", "Second page of the contract"],
        dpi=150,
    )
    parsed = await parse_pdf(pdf, limits=OCR)
    first, second = parsed.pages
    assert first.method == second.method == "ocr"
    assert "INVOICE" in first.text and "4471" in first.text and "Payment within 30 days" in first.text
    assert "contract" in second.text
    assert first.confidence is not None and first.confidence > 80
    assert not first.flagged
    ocr_used = [w for w in parsed.warnings if w["type"] == "ocr_used"]
    assert ocr_used and ocr_used[0]["pages"] == [1, 2]


@needs_tesseract
async def test_noisy_but_legible_scan_is_read(tmp_path: Path) -> None:
    pdf = make_scanned_pdf(tmp_path / "n.pdf", ["Termination requires ninety days notice"], dpi=200, noise=True)
    parsed = await parse_pdf(pdf, limits=ParseLimits(ocr_dpi=200))
    assert parsed.pages[0].method == "ocr"
    assert "notice" in parsed.pages[0].text


@needs_tesseract
async def test_garbage_scan_is_flagged_not_returned_as_text(tmp_path: Path) -> None:
    pdf = make_garbage_scan_pdf(tmp_path / "g.pdf", lines=8)
    parsed = await parse_pdf(pdf, limits=OCR)
    page = parsed.pages[0]
    assert page.method == "ocr"
    assert page.flagged
    assert page.text == ""
    assert page.dropped_words > 0
    types = [w["type"] for w in parsed.warnings]
    assert "ocr_low_confidence" in types and "no_text" in types


@needs_tesseract
async def test_low_confidence_words_are_dropped(tmp_path: Path) -> None:
    pdf = make_scanned_pdf(tmp_path / "s.pdf", ["Clean words on a clean page"], dpi=150)
    strict = await parse_pdf(pdf, limits=ParseLimits(ocr_dpi=150, ocr_min_word_confidence=100.1))
    page = strict.pages[0]
    assert page.text == "" and page.dropped_words >= 5 and page.confidence is None


async def test_without_tesseract_scanned_pages_come_back_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "scan.pdf"
    try:
        make_scanned_pdf(path, ["Some scanned words"], dpi=72)
    except ImportError:
        pytest.skip("fpdf2 and Pillow (dev dependencies) are needed to make a scanned PDF")
    monkeypatch.setenv("PATH", str(tmp_path))  # the child inherits it: no tesseract on it
    parsed = await parse_pdf(path)
    assert parsed.pages[0].method == "empty"
    assert [w["type"] for w in parsed.warnings] == ["ocr_unavailable", "no_text"]
    off = await parse_pdf(path, limits=ParseLimits(ocr=False))
    assert off.warnings[0]["type"] == "ocr_disabled"


# --- encryption ---------------------------------------------------------------------------------------------


async def test_encrypted_pdfs(tmp_path: Path) -> None:
    path = tmp_path / "e.pdf"
    path.write_bytes(make_pdf(["Confidential pricing: 12% discount"], password="s3cret"))
    assert (await rejected(path)).reason == "encrypted"
    assert (await rejected(path, password="nope")).reason == "wrong_password"
    opened = await parse_pdf(path, password="s3cret")
    assert opened.encrypted is True
    assert "12% discount" in opened.pages[0].text


async def test_owner_password_only_opens_without_one(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=make_text_pdf(tmp_path / "plain.pdf", ["Readable by anyone"]))
    writer.encrypt(user_password="", owner_password="owner-only", algorithm="AES-256")
    path = tmp_path / "owner.pdf"
    writer.write(path)
    parsed = await parse_pdf(path)
    assert parsed.encrypted is True
    assert "Readable by anyone" in parsed.pages[0].text


async def test_password_on_a_plain_pdf_is_ignored(tmp_path: Path) -> None:
    parsed = await parse_pdf(make_text_pdf(tmp_path / "p.pdf", ["plain"]), password="unneeded")
    assert parsed.warnings[0]["type"] == "password_ignored"


# --- damaged input ------------------------------------------------------------------------------------------


async def test_corrupt_truncated_and_non_pdf(tmp_path: Path) -> None:
    corrupt = tmp_path / "c.pdf"
    corrupt.write_bytes(corrupt_pdf())
    assert (await rejected(corrupt)).reason == "corrupt"

    whole = make_text_pdf(tmp_path / "whole.pdf", ["Some text " * 50]).read_bytes()
    truncated = tmp_path / "t.pdf"
    truncated.write_bytes(whole[: len(whole) // 2])
    assert (await rejected(truncated)).reason == "corrupt"

    noise = tmp_path / "n.pdf"
    noise.write_bytes(os.urandom(4096).replace(b"%PDF-", b"xxxxx"))
    error = await rejected(noise)
    assert error.reason == "corrupt" and error.document == "n.pdf"

    pdf_header_then_noise = tmp_path / "h.pdf"
    pdf_header_then_noise.write_bytes(b"%PDF-1.7\n" + os.urandom(4096))
    assert (await rejected(pdf_header_then_noise)).reason == "corrupt"


async def test_too_large_file_is_refused_before_parsing(tmp_path: Path) -> None:
    pdf = make_text_pdf(tmp_path / "t.pdf", ["x" * 100])
    error = await rejected(pdf, limits=ParseLimits(max_bytes=100))
    assert error.reason == "too_large"


async def test_ten_thousand_pages_are_refused_up_front(tmp_path: Path) -> None:
    pdf = make_many_pages_pdf(tmp_path / "many.pdf", 10_000)
    calls: list[int] = []
    error = await rejected(pdf, on_page=lambda done, total: calls.append(done))
    assert error.reason == "too_many_pages"
    assert "10,000" in error.message
    assert calls == []  # no page was parsed


# --- bombs and limits ---------------------------------------------------------------------------------------


async def test_decompression_bomb_is_too_large(tmp_path: Path, no_leftovers: None) -> None:
    bomb = make_pdf_bomb(tmp_path / "bomb.pdf")  # ~1 MB that inflates to 1 GiB
    assert bomb.stat().st_size < 2_000_000
    error = await rejected(bomb)  # default limits
    assert error.reason == "too_large"
    assert "max_decompressed_bytes" in error.message
    small = await rejected(bomb, limits=ParseLimits(max_decompressed_bytes=5_000_000))
    assert small.reason == "too_large"


async def test_image_bomb_is_refused_before_rendering(tmp_path: Path) -> None:
    bomb = make_pdf_bomb(tmp_path / "img.pdf", 900_000_000, image=True)
    error = await rejected(bomb, limits=ParseLimits(ocr_dpi=72))
    assert error.reason == "too_large"
    assert "rendering page 1" in error.message


async def test_memory_limit_maps_to_limit_exceeded(tmp_path: Path, no_leftovers: None) -> None:
    bomb = make_pdf_bomb(tmp_path / "bomb.pdf")
    # No decompression cap: the child decodes until RLIMIT_AS stops it.
    error = await rejected(bomb, limits=ParseLimits(max_decompressed_bytes=1 << 40, memory_mb=320))
    assert error.reason == "limit_exceeded"
    assert error.detail["limit"] == "memory_mb"
    assert "320 MB" in error.message
    # The bomb went off in the child: this process carries on parsing.
    parsed = await parse_pdf(make_text_pdf(tmp_path / "ok.pdf", ["still fine"]))
    assert parsed.pages[0].text.strip() == "still fine"


async def test_cpu_limit_signal_maps_to_limit_exceeded(tmp_path: Path, no_leftovers: None) -> None:
    slow = make_many_pages_pdf(tmp_path / "slow.pdf", 2000, text=SLOW_TEXT)
    error = await rejected(slow, limits=ParseLimits(cpu_s=1))
    assert error.reason == "limit_exceeded"
    assert error.detail["signal"] == "SIGXCPU"
    assert "CPU limit" in error.message


def test_a_crash_by_signal_maps_to_a_clean_error() -> None:
    limits = ParseLimits(memory_mb=512)
    abort = _died(-int(signal.SIGABRT), "", limits, Path("x.pdf"))
    assert isinstance(abort, DocumentRejected) and abort.reason == "limit_exceeded"
    assert "512 MB" in abort.message and abort.detail["signal"] == "SIGABRT"
    killed = _died(-int(signal.SIGKILL), "", limits, Path("x.pdf"))
    assert isinstance(killed, DocumentRejected) and killed.reason == "limit_exceeded"
    memory = _died(1, "Traceback ...\nMemoryError\n", limits, Path("x.pdf"))
    assert isinstance(memory, DocumentRejected) and memory.detail["limit"] == "memory_mb"
    ours = _died(1, "ImportError: no module named pypdf", limits, Path("x.pdf"))
    assert isinstance(ours, RuntimeFailure) and not isinstance(ours, DocumentRejected)


# --- wall clock and cancellation ----------------------------------------------------------------------------


async def test_timeout_kills_the_child(tmp_path: Path, no_leftovers: None) -> None:
    slow = make_many_pages_pdf(tmp_path / "slow.pdf", 2000, text=SLOW_TEXT)
    error = await rejected(slow, limits=ParseLimits(timeout_s=1.0))
    assert error.reason == "timeout"
    assert workers() == []


async def test_cancellation_kills_the_child(tmp_path: Path, no_leftovers: None) -> None:
    slow = make_many_pages_pdf(tmp_path / "slow.pdf", 2000, text=SLOW_TEXT)
    started = asyncio.Event()
    task: asyncio.Task[ParsedPdf] = asyncio.create_task(parse_pdf(slow, on_page=lambda done, total: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    assert len(workers()) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert workers() == []
