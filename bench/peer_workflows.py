"""The workloads of ``bench/bench_peer.py`` as keel workflows (``KEEL_WORKFLOWS=peer_workflows:WORKFLOWS``).

The floor app in ``bench_peer.py`` runs the same three shapes in memory, so both servers answer the same bodies:

* ``peer_chain``: ``steps`` durable no-op steps one after the other (``steps=0`` is a no-op run: lease, start, end);
* ``peer_tokens``: one durable step that streams ``n`` ``token`` events exactly as a model stream does
  (``ctx.emit_nowait``, the path of :mod:`keel.orchestration.llm.generation`), ``pace_ms`` apart;
* ``peer_fanout``: ``branches`` parallel durable branches of ``seconds`` each (``ctx.map``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Workflow


class ChainInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(0, ge=0, le=10_000)


class TokensInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(500, ge=1, le=1_000_000)
    pace_ms: float = Field(0.0, ge=0, le=1000)


class FanoutInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    branches: int = Field(4, ge=1, le=100)
    seconds: float = Field(1.0, ge=0, le=86_400)


async def _noop(i: int) -> int:
    return i


async def chain(ctx: WorkflowContext, inp: ChainInput) -> dict[str, Any]:
    for i in range(inp.steps):
        await ctx.step(f"noop-{i}", _noop, i)
    return {"steps": inp.steps}


async def tokens(ctx: WorkflowContext, inp: TokensInput) -> dict[str, Any]:
    async def stream() -> int:
        for i in range(inp.n):
            # A model stream yields to the loop between chunks (it reads them from a socket): so does this.
            await asyncio.sleep(inp.pace_ms / 1000)
            # ``t``: when it was emitted (wall clock, same machine as the client), for the emit -> client delay.
            await ctx.emit_nowait("token", {"i": i, "text": f"t{i} ", "t": time.time()})
        return inp.n

    return {"tokens": await ctx.step("stream", stream)}


async def fanout(ctx: WorkflowContext, inp: FanoutInput) -> dict[str, Any]:
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    result = await ctx.map(nap, [inp.seconds] * inp.branches)
    return {"branches": len(result.results)}


WORKFLOWS: list[Workflow[Any]] = [
    Workflow(name="peer_chain", input_model=ChainInput, fn=chain),
    Workflow(name="peer_tokens", input_model=TokensInput, fn=tokens),
    Workflow(name="peer_fanout", input_model=FanoutInput, fn=fanout),
]
