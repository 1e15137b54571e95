"""The flagship request end to end over HTTP: a real ``keel serve`` subprocess (SQLite, the sandboxed PDF parser,
the real OpenAI-compatible adapter) talking to a loopback fake provider whose answers come from
:class:`~keel.testing.analyst.ScriptedAnalyst`. Every branch of seed 000's failure table that the flagship can
take, and delivery of the same envelope by polling, SSE and a signed webhook."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import free_port, make_key
from keel.testing.analyst import FABRICATED_QUOTE, ScriptedAnalyst
from keel.testing.fake_llm import FakeOpenAIServer
from keel.testing.pdfs import make_pdf
from keel_processes import KeelProcess, Servers
from webhook_receiver import Receiver, new_secret, verify

REQUEST = "Analyse these PDFs, compare insights, and tell me the risks."
CONTRACTS = {
    "vendor-a.pdf": "MASTER SERVICES AGREEMENT - VENDOR A\nPayment is due within 30 days of the invoice date.\n"
    "Liability is capped at the fees paid in the preceding twelve months.",
    "vendor-b.pdf": "SUPPLY AGREEMENT - VENDOR B\nInvoices are payable within 60 days; late payments accrue 2% a "
    "month.\nVendor B's liability is unlimited for data breaches.",
    "vendor-c.pdf": "HOSTING AGREEMENT - VENDOR C\nVendor C commits to 99.9% uptime each month.\nService credits "
    "are the sole remedy for downtime.",
}


@dataclass
class Flagship:
    fake: FakeOpenAIServer
    keel: KeelProcess
    key: str
    docs: dict[str, str]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.keel.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def script(self, analyst: ScriptedAnalyst) -> ScriptedAnalyst:
        self.fake.reset()
        self.fake.respond_with(analyst.http_reply)
        return analyst

    def submit(self, documents: list[str], **extra: Any) -> str:
        inp = {"request": REQUEST, "documents": documents, **extra.pop("input", {})}
        with self.client() as c:
            r = c.post("/v1/tasks", json={"workflow": "document_analysis", "input": inp, **extra})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def wait(self, task_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                r = c.get(f"/v1/tasks/{task_id}")
                body: dict[str, Any] = r.json()
                if body["status"] not in ("queued", "running"):
                    return body
                assert "Retry-After" in r.headers
                time.sleep(0.1)
        raise AssertionError(f"{task_id} did not finish within {timeout}s:\n{self.keel.output()}")

    def events(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self.client() as c, connect_sse(c, "GET", f"/v1/tasks/{task_id}/events") as source:
            return [(e.event, json.loads(e.data) if e.data else {}) for e in source.iter_sse()]


@pytest.fixture(scope="module")
def flagship(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flagship]:
    root = tmp_path_factory.mktemp("flagship")
    data = root / "data"
    data.mkdir()
    key = make_key(data, "acme", frozenset({"tasks:read", "tasks:write"}))
    servers = Servers(root)
    with FakeOpenAIServer(api_key="sk-test") as fake:
        env = {
            "KEEL_DEFAULT_MODEL": f"openai-compatible:{fake.base_url}#analyst-2026-01-01",
            "OPENAI_COMPATIBLE_API_KEY": "sk-test",
            "KEEL_MODEL_PRICES": json.dumps({"analyst": {"input": 1.0, "output": 2.0, "context_window": 16_000}}),
            "KEEL_EMBEDDING_MODEL": "hash:64",
            "KEEL_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        }
        try:
            keel = servers.start(free_port(), data, env=env, timeout=30)
            docs: dict[str, str] = {}
            with httpx.Client(base_url=keel.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                uploads = {name: make_pdf([text]) for name, text in CONTRACTS.items()}
                uploads["pricing-locked.pdf"] = make_pdf(["Confidential pricing schedule."], password="s3cret")
                for name, pdf in uploads.items():
                    r = c.post("/v1/documents", files={"file": (name, pdf, "application/pdf")})
                    assert r.status_code == 201, r.text
                    docs[name] = r.json()["id"]
            yield Flagship(fake=fake, keel=keel, key=key, docs=docs)
        finally:
            servers.stop_all()


def types(task: dict[str, Any]) -> list[str]:
    return [e["type"] for e in task["envelope"]["errors"]]


def test_all_documents_fine_is_a_success_delivered_alike_by_polling_sse_and_webhook(
    flagship: Flagship,
    receiver: Receiver,
) -> None:
    analyst = flagship.script(ScriptedAnalyst())
    docs = [flagship.docs["vendor-a.pdf"], flagship.docs["vendor-b.pdf"]]
    secret = new_secret()
    task_id = flagship.submit(docs, webhook={"url": receiver.url, "secret": secret})
    polled = flagship.wait(task_id)
    assert polled["status"] == "succeeded", polled["envelope"]
    envelope = polled["envelope"]
    assert envelope["status"] == "success"
    assert [e for e in envelope["errors"] if e["severity"] == "error"] == []  # warnings: the hash embedder is weak
    result = envelope["result"]
    assert [i["source"] for i in result["insights"]] == ["upload:vendor-a.pdf", "upload:vendor-b.pdf"]
    assert result["comparison"]["conflicts"][0]["documents"] == docs
    assert result["risks"] and all(r["supported"] for r in result["risks"])
    evidence = result["risks"][0]["evidence"][0]
    assert set(evidence) >= {"document", "page", "quote"} and evidence["verified"] and evidence["document"] in docs
    assert envelope["metadata"]["plan"]["nodes"] and envelope["metadata"]["plan"]["topics"]
    assert envelope["metadata"]["model_ids"] == ["analyst-2026-01-01"] and envelope["metadata"]["cost_usd"] > 0
    # SSE: the stages as they happened, then the same envelope
    events = flagship.events(task_id)
    names = [name for name, _ in events]
    assert {"plan", "stage", "partial_result", "token"} <= set(names) and names[-1] == "end"
    assert events[-1][1]["envelope"] == envelope
    stages = [d["stage"] for n, d in events if n == "stage"]
    assert stages.index("plan") < stages.index("ingest") < stages.index("extract") < stages.index("risks")
    # the signed webhook carries it too
    [hit] = receiver.wait_hits(1, timeout=15)
    assert verify(secret, hit)["data"]["envelope"] == envelope
    assert analyst.calls.count("extract") == 2


def test_an_encrypted_document_is_a_partial_success_with_a_warning(flagship: Flagship) -> None:
    flagship.script(ScriptedAnalyst())
    d = flagship.docs
    task = flagship.wait(flagship.submit([d["vendor-a.pdf"], d["vendor-b.pdf"], d["pricing-locked.pdf"]]))
    env = task["envelope"]
    assert task["status"] == "partial_success" and env["status"] == "partial_success", env
    [warning] = [e for e in env["errors"] if e["type"] == "document_encrypted"]
    assert warning["severity"] == "warning" and "pricing-locked.pdf" in warning["message"]
    assert len(env["result"]["insights"]) == 2 and env["result"]["risks"]
    assert [x["status"] for x in env["result"]["documents"]] == ["ingested", "ingested", "skipped"]


def test_a_document_that_times_out_is_a_partial_success_with_the_others(flagship: Flagship) -> None:
    flagship.script(ScriptedAnalyst(extract_delay_s={"D2": 20.0}))
    d = flagship.docs
    started = time.monotonic()
    task_id = flagship.submit(
        [d["vendor-a.pdf"], d["vendor-b.pdf"], d["vendor-c.pdf"]], input={"summary_timeout_s": 1.0}
    )
    task = flagship.wait(task_id)
    assert time.monotonic() - started < 15
    env = task["envelope"]
    assert env["status"] == "partial_success", env
    [timeout] = [e for e in env["errors"] if e["type"] == "timeout"]
    assert timeout["step"] == "extract[D2]"
    assert [i["label"] for i in env["result"]["insights"]] == ["D1", "D3"] and env["result"]["risks"]


def test_failed_risk_wordings_are_a_partial_success_with_the_insights(flagship: Flagship) -> None:
    flagship.script(ScriptedAnalyst(malformed={"risk"}))
    d = flagship.docs
    env = flagship.wait(flagship.submit([d["vendor-a.pdf"], d["vendor-b.pdf"]]))["envelope"]
    assert env["status"] == "partial_success"
    result = env["result"]
    assert result["risks"] is None and result["components"]["risks"] == "failed"
    assert len(result["insights"]) == 2 and result["comparison"] is not None
    steps = {e["step"] for e in env["errors"] if "wording of the" in e["message"]}
    assert "risk[payment_terms]" in steps and all(s.startswith("risk[") for s in steps)


def test_an_ambiguous_request_needs_clarification_before_any_document_work(flagship: Flagship) -> None:
    analyst = flagship.script(ScriptedAnalyst(confidence=0.2, questions=["Which kind of risk matters to you?"]))
    task = flagship.wait(flagship.submit([flagship.docs["vendor-a.pdf"]], input={"request": "hmm, these?"}))
    assert task["status"] == "needs_clarification"
    env = task["envelope"]
    assert env["status"] == "needs_clarification" and env["result"]["questions"] == [
        "Which kind of risk matters to you?"
    ]
    assert analyst.calls == ["plan"]


def test_a_fabricated_quote_is_flagged_hallucination_suspected(flagship: Flagship) -> None:
    flagship.script(ScriptedAnalyst(fabricate=True))
    d = flagship.docs
    env = flagship.wait(flagship.submit([d["vendor-a.pdf"], d["vendor-b.pdf"]]))["envelope"]
    [flag] = [e for e in env["errors"] if e["type"] == "hallucination_suspected"]
    assert flag["step"] == "extract[D1]" and FABRICATED_QUOTE[:30] in flag["message"]
    assert env["status"] == "partial_success"
    quotes = [e["quote"] for r in env["result"]["risks"] for e in r["evidence"]]
    assert quotes and FABRICATED_QUOTE not in quotes  # flagged, and never presented as evidence


def test_a_cancel_mid_run_is_cancelled_keeping_the_documents_already_read(flagship: Flagship) -> None:
    analyst = flagship.script(ScriptedAnalyst(extract_delay_s={"D2": 60.0}))
    d = flagship.docs
    task_id = flagship.submit([d["vendor-a.pdf"], d["vendor-b.pdf"]])
    with flagship.client() as c, connect_sse(c, "GET", f"/v1/tasks/{task_id}/events") as source:
        for sse in source.iter_sse():
            if sse.event == "partial_result" and json.loads(sse.data)["key"] == "insight:D1":
                break
        r = c.post(f"/v1/tasks/{task_id}/cancel")
        assert r.status_code in (200, 202)
    task = flagship.wait(task_id, timeout=15)
    assert task["status"] == "cancelled"
    env = task["envelope"]
    assert env["status"] == "partial_success" and "cancelled" in types(task)
    assert env["result"]["insight:D1"]["key_points"] and "insight:D2" not in env["result"]
    assert "risk" not in analyst.calls  # nothing more was paid for


def test_bad_documents_are_refused_with_422_before_any_model_call(flagship: Flagship) -> None:
    flagship.script(ScriptedAnalyst())
    bad = {
        "unknown id": ["doc_000000000000000000000000"],
        "ssrf": ["http://169.254.169.254/latest/meta-data"],
        "not a reference": ["vendor-a.pdf"],
    }
    with flagship.client() as c:
        for why, documents in bad.items():
            r = c.post(
                "/v1/tasks",
                json={"workflow": "document_analysis", "input": {"request": REQUEST, "documents": documents}},
            )
            assert r.status_code == 422, (why, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "/input/documents/0" in r.text, (why, r.text)
    assert flagship.fake.requests == []  # not one model call
