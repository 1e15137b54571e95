"""A workflow for ``test_tools_api.py``, loaded with ``KEEL_WORKFLOWS=tools_api_workflows:WORKFLOWS``: it reads an
(untrusted) document, then emails part of it, so the email needs a person's approval."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from keel.errors import StepFailed
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "report.txt"
    to: str = "boss@example.com"


@workflow(name="email_report")
async def email_report(ctx: WorkflowContext, req: Report) -> dict[str, Any]:
    doc = await ctx.tool("read_document", {"source": req.source})
    text = "\n".join(page["text"] for page in doc["pages"])
    try:
        sent = await ctx.tool("send_email", {"to": [req.to], "subject": "report", "body": text[:200]})
    except StepFailed as exc:
        return {"document": doc, "refused": exc.type}
    return {"document": doc, "sent": sent}


WORKFLOWS = [email_report]
