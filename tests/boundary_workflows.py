"""A workflow for the crash-boundary acceptance test, loaded by `keel serve` via ``KEEL_WORKFLOWS``.

``boundary`` runs ``steps`` durable steps. Each step body appends one line to a ledger file, so a test can count
how many times each body really ran, and in which process. Between steps (in workflow code, never inside a step)
the workflow passes a *boundary*: boundary 0 before the first step, boundary k right after step k's checkpoint is
committed. At boundary k, if ``<control>/pause-{k}`` exists, it is renamed to ``<control>/paused-{k}`` (atomically,
so it fires once per task even though later runs replay past the same boundary) and the workflow sleeps, so the
test can ``kill -9`` the process exactly there.

The result depends on every step's output (each step also feeds the next) and on values drawn from the
context's deterministic sources, which are seeded by the task id and so survive restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow


class BoundaryInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10, ge=1, le=100)
    ledger: str
    """File each step body appends one line to when it runs."""
    control: str
    """Directory holding the ``pause-{k}`` files."""


async def body(i: int, acc: int, ledger: str, token: str) -> dict[str, Any]:
    """One step. Appends ``step-{i} pid=... token=...`` to the ledger, durably, then returns a value from ``i``."""
    with open(ledger, "a", encoding="utf-8") as f:
        f.write(f"step-{i} pid={os.getpid()} token={token}\n")
        f.flush()
        os.fsync(f.fileno())
    return {"i": i, "sq": i * i, "acc": (acc * 31 + i * i) % 1_000_003}


async def pause_at_boundary(control: str, k: int) -> None:
    try:
        os.rename(Path(control) / f"pause-{k}", Path(control) / f"paused-{k}")
    except FileNotFoundError:
        return  # no pause requested here, or it already fired in an earlier run of this task
    await asyncio.sleep(3600)  # killed here by the test


@workflow(name="boundary")
async def boundary(ctx: WorkflowContext, inp: BoundaryInput) -> dict[str, Any]:
    """Run ``steps`` chained durable steps, with a kill point at every step boundary."""
    token = str(ctx.uuid())
    draw = ctx.random()
    await pause_at_boundary(inp.control, 0)
    outs: list[dict[str, Any]] = []
    acc = 0
    for i in range(1, inp.steps + 1):
        out = await ctx.step(f"step-{i}", body, i, acc, inp.ledger, token)
        outs.append(out)
        acc = out["acc"]
        await pause_at_boundary(inp.control, i)
    salt = ctx.rng.randrange(1_000_000_000)  # drawn after the steps: replays must reach the same RNG state
    digest = hashlib.sha256(json.dumps([token, draw, salt, outs], sort_keys=True).encode()).hexdigest()
    return {"token": token, "draw": draw, "salt": salt, "steps": outs, "acc": acc, "digest": digest}
