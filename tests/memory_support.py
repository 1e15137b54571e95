"""What tests of the memory layer share: two small contracts, a settable clock, and a Memory over one store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keel.memory.ingest.pipeline import Ingestor, IngestSettings
from keel.memory.retrieval import ConfidencePolicy, Memory
from keel.testing.embedders import HashEmbedder

CONTRACT_A = (
    "Vendor A shall invoice monthly. Payment is due within 30 days of the invoice date.\n\n"
    "Liability is capped at the fees paid in the preceding twelve months. Either party may terminate on 90 days "
    "written notice."
)


CONTRACT_B = (
    "Vendor B requires payment within 60 days. Late payments accrue interest at 2% per month.\n\n"
    "Vendor B's liability is unlimited for breaches of confidentiality."
)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def memory_for(store: Any, embedder: HashEmbedder, clock: Clock, tmp_path: Path, **kw: Any) -> Memory:
    ingestor = Ingestor(
        store,
        embedder,
        settings=IngestSettings(chunk_tokens=24, overlap_tokens=4, **kw),
        clock=clock,
        scratch_dir=tmp_path / "scratch",
    )
    return Memory(
        sessions=store,
        documents=store,
        vectors=store,
        embedder=embedder,
        ingestor=ingestor,
        clock=clock,
        confidence=ConfidencePolicy(),
    )
