"""A workflow for the dead-letter crash test, loaded by `keel serve` via ``KEEL_WORKFLOWS``.

``poison`` records one step, then kills its own process (SIGKILL) inside the second step, every time it runs: the
shape of a task that takes its worker down at the same place on every lease, which must end dead-lettered.
"""

from __future__ import annotations

import os
import signal

from pydantic import BaseModel, ConfigDict

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow


class PoisonInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def fine() -> int:
    return 1


async def crash() -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process is gone")


@workflow(name="poison")
async def poison(ctx: WorkflowContext, inp: PoisonInput) -> int:
    """Step 1 is checkpointed once; step 2 kills the worker, on every lease."""
    return await ctx.step("fine", fine) + await ctx.step("crash", crash)
