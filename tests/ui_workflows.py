"""Workflows for ``tests/interaction/test_ui.py``, loaded with ``KEEL_WORKFLOWS=ui_workflows:WORKFLOWS``: ``recall``
searches vector memory over the given documents, so its trace has retrieval hits with scores and a confidence;
``flaky`` has a step that succeeds on its second try, so its trace has a retry; ``musing`` asks the model, then
waits until the test creates a file, so a page can show the model call while the task still runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.retry import RetryPolicy
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


class Nothing(BaseModel):
    model_config = ConfigDict(extra="forbid")


_tries: dict[str, int] = {}
"""Tries so far, by task id: the step fails its first."""


@workflow(name="flaky")
async def flaky(ctx: WorkflowContext, req: Nothing) -> dict[str, Any]:
    async def shaky() -> str:
        _tries[ctx.task_id] = _tries.get(ctx.task_id, 0) + 1
        if _tries[ctx.task_id] == 1:
            raise TimeoutError("the first try times out")
        return "ok"

    return {"shaky": await ctx.step("shaky", shaky, retry=RetryPolicy(initial_interval=0.05, jitter=0))}


class Musing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    until_exists: str
    """The task waits after the model call until this file exists (at most a minute), so the test decides when it
    ends rather than racing a timer against a browser."""


@workflow(name="musing")
async def musing(ctx: WorkflowContext, req: Musing) -> dict[str, Any]:
    answer = await ctx.generate("think", ctx.model(), req.prompt)

    async def wait() -> None:
        release = Path(req.until_exists)
        for _ in range(600):
            if await asyncio.to_thread(release.exists):
                return
            await asyncio.sleep(0.1)

    await ctx.step("wait", wait)
    return {"answer": answer}


WORKFLOWS = [recall, flaky, musing]
