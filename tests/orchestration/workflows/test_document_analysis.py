"""The flagship ``document_analysis`` workflow in process, on SQLite, with a scripted model: every branch of seed
000's failure table, the map-reduce paths, the quote check, and resuming after a crash without paying twice.
The same branches run over HTTP through a real ``keel serve`` in ``test_flagship_e2e.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine_support import engine_for, wait_terminal
from keel.backends.sqlite import SQLiteStore
from keel.memory.types import NewTask, Task, TaskStatus
from keel.orchestration.llm.models import ModelRegistry
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.tools.builtins import builtin_tools
from keel.orchestration.tools.services import Services
from keel.orchestration.workflows.document_analysis import (
    CHECKLIST,
    DOCUMENT_ANALYSIS,
    DocumentAnalysisResult,
    find_quote,
    same_position,
)
from keel.testing.analyst import FABRICATED_QUOTE, ScriptedAnalyst
from keel.testing.embedders import HashEmbedder
from keel.testing.models import FunctionModel
from keel.testing.pdfs import make_pdf
from memory_support import CONTRACT_A, CONTRACT_B, Clock, memory_for

REQUEST = "Analyse these documents, compare insights, and tell me the risks."
CONTRACT_C = (
    "Vendor C offers a 99.9% uptime commitment. Service credits are the sole remedy for downtime.\n\n"
    "Payment is due within 45 days of receipt of a valid invoice."
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "k.db")
    yield s
    await s.aclose()


class Harness:
    def __init__(
        self,
        store: SQLiteStore,
        tmp_path: Path,
        analyst: ScriptedAnalyst,
        window: int = 8192,
        tools: ToolCatalog | None = None,
    ) -> None:
        self.store, self.clock = store, Clock(time.time())
        self.memory = memory_for(store, HashEmbedder(), self.clock, tmp_path)
        self.analyst = analyst
        self.model = FunctionModel(analyst.function_reply, name="scripted", context_window=window)
        models = ModelRegistry("scripted")
        models.add("scripted", self.model)
        self.engine = engine_for(
            store,
            DOCUMENT_ANALYSIS,
            services=Services(store=store, memory=self.memory),
            models=models,
            tools=ToolCatalog(builtin_tools()) if tools is None else tools,
        )

    async def add(self, text: str, name: str) -> str:
        return (await self.memory.ingestor.ingest_bytes("t1", text.encode(), source=f"upload:{name}")).id

    async def add_pdf(self, data: bytes, name: str) -> str:
        return (await self.memory.ingestor.ingest_bytes("t1", data, source=f"upload:{name}")).id

    async def run(self, documents: list[str], **inp: Any) -> Task:
        new = NewTask(
            tenant="t1", workflow="document_analysis", input={"request": REQUEST, "documents": documents, **inp}
        )
        created = await self.store.create_task(new, None, self.clock())
        assert created.task is not None
        await self.engine.start()
        try:
            return await wait_terminal(self.store, created.task.id, timeout=30)
        finally:
            await self.engine.stop()


def errors_of(task: Task, type: str) -> list[dict[str, Any]]:
    assert task.envelope is not None
    return [e for e in task.envelope["errors"] if e["type"] == type]


async def test_all_documents_fine_is_a_success_with_cited_verified_risks(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst())
    docs = [await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")]
    done = await h.run(docs)
    assert done.status is TaskStatus.succeeded, done.envelope
    assert done.envelope is not None
    result = DocumentAnalysisResult.model_validate(done.envelope["result"])
    assert [i.label for i in result.insights] == ["D1", "D2"] and all(i.key_points for i in result.insights)
    assert result.comparison is not None
    rows = {r.topic: r for r in result.comparison.table}
    assert rows["payment terms"].status == "differ"  # 30 days against 60 days, decided in code
    assert [c.value for c in rows["payment terms"].cells] == ["30 days", "60 days"]
    assert rows["governing law"].status == "absent" and rows["termination"].status == "single"
    conflict = next(c for c in result.comparison.conflicts if c.topic == "payment terms")
    assert conflict.documents == docs and "30 days" in conflict.detail and "60 days" in conflict.detail
    assert result.risks and all(r.supported for r in result.risks)
    assert result.risks[0].topic == "payment terms" and "payment terms" in result.risks[0].risk
    for risk in result.risks:
        for ev in risk.evidence:
            assert ev.verified and ev.document in docs and ev.page == 1 and ev.quote
    assert result.components == {
        "ingest": "ok", "extraction": "ok", "comparison": "ok", "risks": "ok", "corroboration": "ok",
        "validation": "ok",
    }  # fmt: skip
    meta = done.envelope["metadata"]
    assert [n["id"] for n in meta["plan"]["nodes"]][-4:] == ["risks", "corroborate", "aggregate", "validate"]
    # each risk was looked up in the documents' passages through the search_memory tool: its support is the best
    # passage of each document, best first, with the retrieval's confidence, and the trace has the same lookup
    assert [c["tool"] for c in meta["tools_called"]] == ["search_memory"] * len(result.risks)
    assert len(meta["retrieval"]) == len(result.risks)
    for risk, trace in zip(result.risks, meta["retrieval"], strict=True):
        assert risk.support is not None and trace["query"] == f"{risk.topic}: {risk.risk}"
        assert (risk.support.confidence, risk.support.level) == (trace["confidence"], trace["level"])
        passages = risk.support.passages
        assert {p.document for p in passages} == set(docs) and {p.label for p in passages} == {"D1", "D2"}
        assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
        assert passages[0].score == trace["hits"][0]["score"] and all(p.text for p in passages)
    assert meta["plan"]["topics"][:5] == ["payment terms", "liability", "termination", "data location", "governing law"]
    assert h.analyst.calls.count("extract") == 2 and h.analyst.calls[0] == "plan"
    # one wording per topic the documents differ on or only one addresses: nothing else is asked of the model
    worded = sum(1 for r in result.comparison.table if r.status in ("differ", "single"))
    assert h.analyst.calls.count("risk") == worded == len(result.risks)


async def test_the_callers_topics_replace_the_checklist(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst())
    done = await h.run(
        [await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")], topics=["payment", "liability"]
    )
    assert done.status is TaskStatus.succeeded and done.envelope is not None, done.envelope
    result = done.envelope["result"]
    assert result["topics"] == ["payment", "liability"]
    assert [r["topic"] for r in result["comparison"]["table"]] == ["payment", "liability"]


async def test_without_the_search_tool_the_risks_come_back_unsupported_with_one_warning(
    store: SQLiteStore, tmp_path: Path
) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(), tools=ToolCatalog())  # a catalog without search_memory
    done = await h.run([await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")])
    assert done.status is TaskStatus.succeeded and done.envelope is not None, done.envelope
    result = DocumentAnalysisResult.model_validate(done.envelope["result"])
    assert len(result.risks or []) > 1 and all(r.support is None and r.supported for r in result.risks or [])
    assert result.components["corroboration"] == "skipped"
    [warning] = errors_of(done, "corroboration_skipped")
    assert warning["severity"] == "warning" and "search_memory" in warning["message"]
    assert done.envelope["metadata"]["retrieval"] == []


async def test_an_encrypted_document_is_skipped_with_a_warning_and_the_rest_analysed(
    store: SQLiteStore, tmp_path: Path
) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst())
    locked = await h.add_pdf(make_pdf(["Secret pricing."], password="pw"), "locked.pdf")
    docs = [await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt"), locked]
    done = await h.run(docs)
    assert done.status is TaskStatus.partial_success, done.envelope
    [warning] = errors_of(done, "document_encrypted")
    assert warning["severity"] == "warning" and "password" in warning["message"]
    assert done.envelope is not None
    result = done.envelope["result"]
    assert [d["status"] for d in result["documents"]] == ["ingested", "ingested", "skipped"]
    assert len(result["insights"]) == 2 and result["risks"] and result["components"]["ingest"] == "partial"


async def test_a_document_that_times_out_leaves_the_others(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(extract_delay_s={"D2": 5.0}))
    docs = [await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt"), await h.add(CONTRACT_C, "c.txt")]
    started = time.monotonic()
    done = await h.run(docs, summary_timeout_s=0.5)
    assert time.monotonic() - started < 4.5
    assert done.status is TaskStatus.partial_success, done.envelope
    [timeout] = errors_of(done, "timeout")
    assert timeout["step"] == "extract[D2]" and timeout["recovery_suggested"]
    assert done.envelope is not None
    result = done.envelope["result"]
    assert [i["label"] for i in result["insights"]] == ["D1", "D3"] and result["components"]["extraction"] == "partial"
    assert [d["summarised"] for d in result["documents"]] == [True, False, True]


async def test_below_the_minimum_success_threshold_the_task_fails_keeping_what_finished(
    store: SQLiteStore, tmp_path: Path
) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(extract_delay_s={"D2": 5.0, "D3": 5.0}))
    docs = [await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt"), await h.add(CONTRACT_C, "c.txt")]
    done = await h.run(docs, summary_timeout_s=0.3, min_success=2)
    assert done.status is TaskStatus.failed and done.envelope is not None
    assert errors_of(done, "min_success_not_met") and len(errors_of(done, "timeout")) == 2
    assert "insight:D1" in done.envelope["result"]  # the document that was read is kept


async def test_failed_risk_wordings_return_the_table_with_clear_metadata(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(malformed={"risk"}))
    done = await h.run([await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")])
    assert done.status is TaskStatus.partial_success and done.envelope is not None
    result = done.envelope["result"]
    assert result["risks"] is None and len(result["insights"]) == 2 and result["comparison"]["conflicts"]
    assert result["components"]["risks"] == "failed"
    errs = [e for e in done.envelope["errors"] if e["step"].startswith("risk[")]
    assert errs and "risk[payment_terms]" in {e["step"] for e in errs}
    assert all("wording of the" in e["message"] and "not JSON" in e["message"] for e in errs)


async def test_one_topics_failed_wording_keeps_the_other_risks(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(malformed={"risk:liability"}))
    done = await h.run([await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")])
    assert done.status is TaskStatus.partial_success and done.envelope is not None
    result = done.envelope["result"]
    assert result["components"]["risks"] == "partial" and result["risks"]
    assert "liability" not in {r["topic"] for r in result["risks"]} and "payment terms" in {
        r["topic"] for r in result["risks"]
    }
    assert [e["step"] for e in done.envelope["errors"] if e["severity"] == "error"] == ["risk[liability]"]


async def test_junk_wordings_are_dropped_with_a_warning_never_presented(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(junk=True))
    done = await h.run([await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")])
    assert done.envelope is not None
    result = done.envelope["result"]
    assert result["risks"] == [] and result["comparison"]["conflicts"]  # the table still shows the differences
    [warning] = errors_of(done, "low_quality_output")
    worded = h.analyst.calls.count("risk")
    assert warning["severity"] == "warning" and f"{worded} of {worded} risks" in warning["message"]
    assert "a number or a bare label" in warning["message"]


async def test_an_ambiguous_request_asks_for_clarification_before_reading_anything(
    store: SQLiteStore, tmp_path: Path
) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(confidence=0.2, questions=["Which risks: legal or financial?"]))
    done = await h.run([await h.add(CONTRACT_A, "a.txt")])
    assert done.status is TaskStatus.needs_clarification and done.envelope is not None
    assert done.envelope["result"]["questions"] == ["Which risks: legal or financial?"]
    assert h.analyst.calls == ["plan"]  # no document read, nothing else paid for


async def test_a_fabricated_quote_is_flagged_and_kept_out_of_the_analysis(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(fabricate=True))
    done = await h.run([await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")])
    assert done.status is TaskStatus.partial_success and done.envelope is not None
    [flag] = errors_of(done, "hallucination_suspected")
    assert FABRICATED_QUOTE[:40] in flag["message"] and flag["step"] == "extract[D1]"
    result = done.envelope["result"]
    quotes = [k["quote"] for i in result["insights"] for k in i["key_points"]]
    quotes += [e["quote"] for r in result["risks"] for e in r["evidence"]]
    assert FABRICATED_QUOTE not in quotes
    assert result["components"]["validation"] == "partial"


async def test_overflowing_documents_are_read_in_windows_not_truncated(store: SQLiteStore, tmp_path: Path) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(), window=1400)
    filler = " ".join(f"Clause {i} describes the services in general detail for both parties." for i in range(40))
    long_a = f"{filler}\n\n{CONTRACT_A}"  # the payment term sits past the first window
    done = await h.run([await h.add(long_a, "long.txt"), await h.add(CONTRACT_B, "b.txt")])
    assert done.status in (TaskStatus.succeeded, TaskStatus.partial_success), done.envelope
    assert done.envelope is not None
    first = done.envelope["result"]["insights"][0]
    assert first["condensed"] is True and first["windows"] >= 2
    # windows of filler hold no sentence that can be about a topic: they cost no call
    assert 2 <= h.analyst.calls.count("extract") < first["windows"] + 1
    payment = next(k for k in first["key_points"] if k["topic"] == "payment terms")
    assert payment["quote"] in CONTRACT_A  # found past the first window, merged in
    steps = {s["name"] for s in done.envelope["metadata"]["steps"]}
    assert f"extract[D1]/{first['windows']}" in steps and "extract[D1]/1" not in steps


def test_positions_are_compared_by_their_figures_then_their_words() -> None:
    assert not same_position("30 days", "60 days")
    assert same_position("within 30 days", "30 days of the invoice")
    assert same_position("twelve months", "12 months")
    assert not same_position("10 days", "100 days") and same_position("thirty (30) days", "30 days")
    assert same_position("USD 50,000", "USD 50000") and not same_position("USD 50,000", "USD 5,000")
    assert not same_position("laws of England and Wales", "laws of the State of Delaware")
    assert same_position("governed by English law", "English law governs")
    assert not same_position("European Union only", "any country where the Supplier operates")
    law = next(t for t in CHECKLIST if t.key == "governing_law")
    england = "This agreement is governed by the laws of England."
    assert same_position(england, "The laws of England govern this contract.", law)
    assert not same_position(england, "This agreement is governed by the laws of the State of Delaware.", law)
    ontario = "The laws of the Province of Ontario govern this contract."
    assert same_position(
        ontario, "Any dispute is subject to the courts of the Province of Ontario, whose law applies.", law
    )
    termination = next(t for t in CHECKLIST if t.key == "termination")
    assert termination.concerns("Either party may end this agreement on 90 days' written notice.")
    assert not termination.concerns("Notices must be in writing and sent to the registered office.")


def test_quotes_match_across_case_spacing_hyphenation_and_ellipses() -> None:
    pages = [
        {"page": 1, "text": "Intro."},
        {"page": 2, "text": "Payment is due within\n30 days of the in-\nvoice date."},
    ]
    assert find_quote("payment is due within 30 days", pages) == 2
    assert find_quote("\u201cPayment is due \u2026 of the invoice date\u201d", pages) == 2
    assert find_quote("Payment is due within 90 days", pages) is None
    assert find_quote("due", pages) is None  # too short to mean anything


async def test_a_restart_mid_analysis_resumes_without_paying_again_for_finished_work(
    store: SQLiteStore, tmp_path: Path
) -> None:
    h = Harness(store, tmp_path, ScriptedAnalyst(extract_delay_s={"D2": 30.0}))
    docs = [await h.add(CONTRACT_A, "a.txt"), await h.add(CONTRACT_B, "b.txt")]
    new = NewTask(tenant="t1", workflow="document_analysis", input={"request": REQUEST, "documents": docs})
    created = await store.create_task(new, None, h.clock())
    assert created.task is not None
    task_id = created.task.id
    await h.engine.start()
    try:
        for _ in range(1000):  # until D1's extraction is checkpointed while D2's is still being written
            if "partial:insight:D1" in await store.load_state(task_id):
                break
            await asyncio.sleep(0.01)
    finally:
        await h.engine.stop()  # the process goes away mid-run
    assert h.analyst.calls.count("extract") == 2
    h.analyst.extract_delay_s = {}  # the provider is quick again
    restarted = engine_for(store, DOCUMENT_ANALYSIS, services=h.engine.services, models=h.engine.models)
    await restarted.start()
    try:
        done = await wait_terminal(store, task_id, timeout=30)
    finally:
        await restarted.stop()
    assert done.status is TaskStatus.succeeded and done.envelope is not None, done.envelope
    assert h.analyst.calls.count("plan") == 1  # the plan was not asked again
    assert h.analyst.calls.count("extract") == 3  # D1 once; D2 once interrupted, once to the end
    replayed = {s["name"] for s in done.envelope["metadata"]["steps"] if s["replayed"]}
    assert {"plan", "extract[D1]", "read[D1]"} <= replayed
