"""A token stream for the live-token crash test, loaded by `keel serve` via ``KEEL_WORKFLOWS``.

``stream`` is one durable step that emits ``n`` ``token`` events ``pace_ms`` apart through ``ctx.emit_nowait``, the
path a model's streamed answer takes (:mod:`keel.orchestration.llm.generation`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow


class StreamInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(100, ge=1, le=100_000)
    pace_ms: float = Field(5.0, ge=0, le=1000)


@workflow(name="stream")
async def stream(ctx: WorkflowContext, inp: StreamInput) -> dict[str, Any]:
    """Stream ``n`` tokens from one step, then return how many."""

    async def tokens() -> int:
        for i in range(inp.n):
            await asyncio.sleep(inp.pace_ms / 1000)
            await ctx.emit_nowait("token", {"i": i, "attempt": ctx.attempt})
        return inp.n

    return {"tokens": await ctx.step("tokens", tokens)}


WORKFLOWS = [stream]
