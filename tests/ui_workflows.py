"""A workflow for ``tests/interaction/test_ui.py``, loaded with ``KEEL_WORKFLOWS=ui_workflows:WORKFLOWS``: it
searches vector memory over the given documents, so its trace has retrieval hits with scores and a confidence
(no built-in workflow retrieves yet)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow
from keel.orchestration.workflows.memory import retrieve


class Recall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    documents: list[str]


@workflow(name="recall")
async def recall(ctx: WorkflowContext, req: Recall) -> dict[str, Any]:
    found = await retrieve(ctx, req.query, k=3, documents=req.documents)
    return {"confidence": found["confidence"], "level": found["level"], "hits": len(found["hits"])}


WORKFLOWS = [recall]
