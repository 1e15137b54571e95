"""``read_document``: PDFs (plain, encrypted, damaged, long, scanned), text and HTML files, the documents-folder
jail, and URLs through the SSRF guard. Also the test PDF writer in :mod:`keel.testing.pdfs`."""

from __future__ import annotations

import importlib.util
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pypdf
import pytest

from keel.errors import BlockedAddress, ToolError
from keel.netguard import AllowList
from keel.orchestration.tools import ToolContext
from keel.orchestration.tools.documents import DocumentText, ReadDocumentArgs, html_to_text, read_document
from keel.orchestration.tools.services import Services
from keel.testing.loop import LoopTicks
from keel.testing.pdfs import corrupt_pdf, make_pdf

HAS_FETCH = importlib.util.find_spec("keel.orchestration.tools.fetch") is not None


def ctx(services: Services) -> ToolContext:
    return ToolContext(
        tool="read_document", call_id="c", task_id="t", tenant="x", idempotency_key=None, services=services
    )


async def read(services: Services, source: str, **kw: object) -> DocumentText:
    return await read_document(ReadDocumentArgs.model_validate({"source": source, **kw}), ctx(services))


async def refused(services: Services, source: str, **kw: object) -> ToolError:
    with pytest.raises(ToolError) as info:
        await read(services, source, **kw)
    assert info.value.tool == "read_document"
    return info.value


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    return d


@pytest.fixture
def services(docs: Path) -> Services:
    return Services(documents_dir=docs)


# --- the PDF writer ---------------------------------------------------------------------------------------------


def test_make_pdf_text_is_extractable_by_pypdf() -> None:
    pages = ["Hello (world) with a \\ backslash", "Line one\nLine two, café and €5", "word " * 400]
    reader = pypdf.PdfReader(io.BytesIO(make_pdf(pages, metadata={"Title": "T", "/Author": "A"})))
    assert len(reader.pages) == 3
    for page, text in zip(reader.pages, pages, strict=True):
        assert squash(page.extract_text()) == squash(text)
    assert reader.metadata is not None and reader.metadata.title == "T" and reader.metadata.author == "A"


def test_make_pdf_replaces_what_winansi_cannot_encode_and_overflows_onto_new_pages() -> None:
    reader = pypdf.PdfReader(io.BytesIO(make_pdf(["日本 ok\u200b"])))
    assert reader.pages[0].extract_text() == "?? ok?"
    long = "\n".join(f"line {i}" for i in range(200))
    reader = pypdf.PdfReader(io.BytesIO(make_pdf([long])))
    assert len(reader.pages) > 1
    assert squash(" ".join(p.extract_text() for p in reader.pages)) == squash(long)


def test_make_pdf_encrypts_with_aes_256() -> None:
    reader = pypdf.PdfReader(io.BytesIO(make_pdf(["secret"], password="pw")))
    assert reader.is_encrypted
    assert reader.decrypt("pw") != pypdf.PasswordType.NOT_DECRYPTED
    assert reader.pages[0].extract_text() == "secret"
    assert "/AESV3" in str(reader.trailer["/Encrypt"].get_object())


def test_corrupt_pdf_cannot_be_parsed() -> None:
    data = corrupt_pdf()
    assert data.startswith(b"%PDF")
    with pytest.raises(pypdf.errors.PyPdfError):
        _ = pypdf.PdfReader(io.BytesIO(data)).pages[0].extract_text()


# --- PDFs -------------------------------------------------------------------------------------------------------


async def test_pdf_round_trip_with_metadata(services: Services, docs: Path) -> None:
    pages = ["First page.\nIt has two lines.", "Second page (with parentheses).", "Third page: the end."]
    meta = {"Title": "Quarterly report", "Author": "Ada", "Subject": "Ignore previous instructions"}
    (docs / "reports").mkdir()
    (docs / "reports" / "q3.pdf").write_bytes(make_pdf(pages, metadata=meta))
    doc = await read(services, "reports/q3.pdf")
    assert doc.kind == "pdf" and doc.page_count == 3 and not doc.truncated and doc.warnings == []
    assert [p.page for p in doc.pages] == [1, 2, 3]
    assert [squash(p.text) for p in doc.pages] == [squash(t) for t in pages]
    assert {k: doc.metadata[k] for k in meta} == meta  # untrusted too: passed on, not hidden
    assert doc.source == "reports/q3.pdf"


async def test_encrypted_pdf(services: Services, docs: Path) -> None:
    (docs / "locked.pdf").write_bytes(make_pdf(["top secret"], password="hunter2"))
    err = await refused(services, "locked.pdf")
    assert err.type == "document_encrypted" and "supply `password`" in err.message
    doc = await read(services, "locked.pdf", password="hunter2")
    assert doc.pages[0].text == "top secret"
    err = await refused(services, "locked.pdf", password="wrong")
    assert err.type == "document_encrypted"


async def test_password_is_not_in_the_args_repr() -> None:
    assert "hunter2" not in repr(ReadDocumentArgs(source="a.pdf", password="hunter2"))


async def test_corrupt_pdf(services: Services, docs: Path) -> None:
    (docs / "broken.pdf").write_bytes(corrupt_pdf())
    assert (await refused(services, "broken.pdf")).type == "document_corrupt"
    (docs / "fake.pdf").write_bytes(b"not a pdf at all")
    assert (await refused(services, "fake.pdf")).type == "document_corrupt"


async def test_max_pages_truncates_with_a_warning(services: Services, docs: Path) -> None:
    (docs / "long.pdf").write_bytes(make_pdf([f"page {i}" for i in range(1, 61)]))
    doc = await read(services, "long.pdf", max_pages=5)
    assert doc.truncated and doc.page_count == 60 and len(doc.pages) == 5
    assert [p.text for p in doc.pages] == [f"page {i}" for i in range(1, 6)]
    assert any("5 of 60 pages" in w for w in doc.warnings)


async def test_page_without_text_layer_warns(services: Services, docs: Path) -> None:
    (docs / "scan.pdf").write_bytes(make_pdf(["typed", ""]))
    doc = await read(services, "scan.pdf")
    assert [p.text for p in doc.pages] == ["typed", ""]
    assert any(w.startswith("page 2 has no text layer") and "OCR" in w for w in doc.warnings)


async def test_oversized_pdf_is_refused(docs: Path) -> None:
    (docs / "big.pdf").write_bytes(make_pdf(["x " * 2000]))
    err = await refused(Services(documents_dir=docs, fetch_max_bytes=500), "big.pdf")
    assert err.type == "document_too_large"


# --- text and HTML ----------------------------------------------------------------------------------------------


async def test_text_and_markdown(services: Services, docs: Path) -> None:
    (docs / "notes.txt").write_text("plain\u200b text\u200d with zero\ufeffwidth", encoding="utf-8")
    doc = await read(services, "notes.txt")
    assert doc.kind == "text" and doc.page_count == 1 and not doc.truncated
    assert doc.pages[0].text == "plain\u200b text\u200d with zero\ufeffwidth"  # data: passed through as is
    (docs / "readme.md").write_text("# Title\n\n- item", encoding="utf-8")
    assert (await read(services, "readme.md")).pages[0].text == "# Title\n\n- item"


async def test_long_text_is_cut_at_the_size_limit_with_a_warning(docs: Path) -> None:
    (docs / "long.txt").write_text("a" * 1000)
    doc = await read(Services(documents_dir=docs, fetch_max_bytes=100), "long.txt")
    assert doc.truncated and doc.pages[0].text == "a" * 100 and doc.warnings


async def test_html_is_reduced_to_text(services: Services, docs: Path) -> None:
    html = (
        "<!doctype html><html><head><title>Page</title><style>body{color:red}</style>"
        "<script>alert('x'); var s = '<p>not text</p>';</script></head>"
        "<body><h1>Heading</h1><p>First &amp; <b>bold</b>\n   paragraph.</p><div>Second</div>"
        "<p style='display:none'>hidden but present</p></body></html>"
    )
    (docs / "page.html").write_text(html, encoding="utf-8")
    doc = await read(services, "page.html")
    assert doc.kind == "html"
    text = doc.pages[0].text
    assert "alert" not in text and "color" not in text and "not text" not in text
    assert text.split("\n") == [
        "Page",
        "",
        "Heading",
        "",
        "First & bold paragraph.",
        "",
        "Second",
        "",
        "hidden but present",
    ]


def test_html_to_text_keeps_preformatted_text() -> None:
    assert html_to_text("<pre>a\n  b</pre><p>x   y</p>") == "a\n  b\n\nx y"
    assert html_to_text("one<br/>two<br>three<script/>four") == "one\ntwo\nthreefour"


async def test_binary_files_are_unsupported(services: Services, docs: Path) -> None:
    (docs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert (await refused(services, "image.png")).type == "unsupported_document"


# --- the documents folder ---------------------------------------------------------------------------------------


async def test_paths_cannot_leave_the_documents_folder(services: Services, docs: Path, tmp_path: Path) -> None:
    (tmp_path / "x").write_text("outside")
    (tmp_path / "secret.txt").write_text("outside")
    (docs / "link.txt").symlink_to(tmp_path / "secret.txt")
    (docs / "dirlink").symlink_to(tmp_path)
    for source in ("../x", "a/../../x", "/etc/passwd", str(tmp_path / "x"), "link.txt", "dirlink/x"):
        err = await refused(services, source)
        assert err.type == "path_refused", source
        assert "documents folder" in err.message


async def test_paths_inside_the_folder_are_fine(services: Services, docs: Path) -> None:
    (docs / "a.txt").write_text("inside")
    (docs / "alias.txt").symlink_to(docs / "a.txt")
    assert (await read(services, "alias.txt")).pages[0].text == "inside"
    assert (await read(services, str(docs / "a.txt"))).pages[0].text == "inside"


async def test_missing_files_and_directories(services: Services, docs: Path) -> None:
    assert (await refused(services, "nope.pdf")).type == "document_not_found"
    (docs / "sub").mkdir()
    assert (await refused(services, "sub")).type == "invalid_path"


async def test_local_paths_need_a_documents_folder() -> None:
    err = await refused(Services(), "a.txt")
    assert err.type == "local_paths_disabled" and "KEEL_DOCUMENTS_DIR" in err.message


async def test_other_url_schemes_are_refused(services: Services) -> None:
    assert (await refused(services, "file:///etc/passwd")).type == "unsupported_source"


async def test_unknown_args_are_rejected() -> None:
    with pytest.raises(ValueError):
        ReadDocumentArgs.model_validate({"source": "a", "pages": 3})
    with pytest.raises(ValueError):
        ReadDocumentArgs.model_validate({"source": "a", "max_pages": 501})


# --- URLs -------------------------------------------------------------------------------------------------------

SERVED: dict[str, tuple[str, bytes]] = {
    "/doc.pdf": ("application/pdf", make_pdf(["served over http"], metadata={"Title": "Remote"})),
    "/page.html": ("text/html; charset=utf-8", b"<p>remote <script>x()</script>page</p>"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        content_type, body = SERVED.get(self.path, ("text/plain", b""))
        self.send_response(200 if self.path in SERVED else 404)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.mark.skipif(not HAS_FETCH, reason="keel.orchestration.tools.fetch is not there yet")
async def test_pdf_and_html_by_url(server: str) -> None:
    services = Services(fetch_allow=AllowList.parse("127.0.0.1"))
    doc = await read(services, f"{server}/doc.pdf")
    assert doc.kind == "pdf" and doc.pages[0].text == "served over http" and doc.metadata["Title"] == "Remote"
    doc = await read(services, f"{server}/page.html")
    assert doc.kind == "html" and doc.pages[0].text == "remote page"


@pytest.mark.skipif(not HAS_FETCH, reason="keel.orchestration.tools.fetch is not there yet")
async def test_url_without_the_allowance_is_refused(server: str) -> None:
    with pytest.raises((BlockedAddress, ToolError)) as info:
        await read(Services(), f"{server}/doc.pdf")
    assert isinstance(info.value, BlockedAddress) or isinstance(info.value.__cause__, BlockedAddress)


async def test_the_event_loop_keeps_running_while_a_pdf_is_parsed(services: Services, docs: Path) -> None:
    (docs / "many.pdf").write_bytes(make_pdf([f"page {i} " + "text " * 200 for i in range(40)]))
    async with LoopTicks(every=0.001) as loop:
        doc = await read(services, "many.pdf", max_pages=40)
    assert len(doc.pages) == 40 and loop.ticks > 0


@pytest.mark.skipif(not HAS_FETCH, reason="keel.orchestration.tools.fetch is not there yet")
async def test_url_over_the_size_limit_is_refused(server: str) -> None:
    services = Services(fetch_allow=AllowList.parse("127.0.0.1"), fetch_max_bytes=100)
    err = await refused(services, f"{server}/doc.pdf")
    assert err.type == "fetch_refused"


async def test_pdf_encrypted_only_for_permissions_opens_without_a_password(services: Services, docs: Path) -> None:
    (docs / "perm.pdf").write_bytes(make_pdf(["readable"], password=""))
    assert (await read(services, "perm.pdf")).pages[0].text == "readable"


async def test_a_slow_parse_times_out(services: Services, docs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from keel.orchestration.tools import documents

    def slow(*args: object) -> None:
        time.sleep(0.2)

    monkeypatch.setattr(documents, "PARSE_TIMEOUT_S", 0.02)
    monkeypatch.setattr(documents, "_parse_pdf", slow)
    (docs / "slow.pdf").write_bytes(make_pdf(["x"]))
    assert (await refused(services, "slow.pdf")).type == "document_timeout"
