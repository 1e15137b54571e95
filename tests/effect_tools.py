"""A write tool that charges a loopback sink over HTTP, and a workflow around it, for the kill -9 test.

Loaded into `keel serve` with KEEL_TOOLS=effect_tools:TOOLS and KEEL_WORKFLOWS=effect_tools:WORKFLOWS. The process
kills itself with SIGKILL at the point named by EFFECT_CRASH_AT, once (EFFECT_CRASH_MARK records that it did).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow
from keel.orchestration.tools import Reconciled, Tool, ToolContext


def crash_if(point: str) -> None:
    if os.environ.get("EFFECT_CRASH_AT") != point:
        return
    mark = Path(os.environ["EFFECT_CRASH_MARK"])
    if mark.exists():
        return
    with mark.open("w") as f:
        f.write(f"{os.getpid()} {point}\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


class ChargeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account: str
    amount: int


async def charge(args: ChargeArgs, tc: ToolContext) -> dict[str, Any]:
    crash_if("before_call")  # the ledger row is pending; nothing reached the sink
    async with httpx.AsyncClient(base_url=os.environ["SINK_URL"], trust_env=False) as client:
        r = await client.post("/charges", json=args.model_dump(), headers={"Idempotency-Key": tc.idempotency_key or ""})
        r.raise_for_status()
    crash_if("after_effect")  # the sink has the charge; the ledger does not know
    return {"charged": args.amount, "charge_id": r.json()["id"]}


async def reconcile(key: str, tc: ToolContext) -> Reconciled:
    async with httpx.AsyncClient(base_url=os.environ["SINK_URL"], trust_env=False) as client:
        r = await client.get(f"/charges/{key}")
    if r.status_code == 404:
        return Reconciled(applied=False)
    r.raise_for_status()
    body = r.json()
    return Reconciled(applied=True, result={"charged": body["amount"], "charge_id": body["id"]})


TOOLS = [
    Tool(
        name="charge",
        description="Charge (can reconcile).",
        fn=charge,
        input_model=ChargeArgs,
        effect="write",
        reconcile=reconcile,
    ),
    Tool(
        name="charge_blind", description="Charge (cannot reconcile).", fn=charge, input_model=ChargeArgs, effect="write"
    ),
]


class ChargeOnce(BaseModel):
    account: str
    amount: int
    reconcile: bool = True


def after_record() -> str:
    crash_if("after_record")  # the ledger says applied and the step is checkpointed
    return "ok"


@workflow(name="charge_once")
async def charge_once(ctx: WorkflowContext, inp: ChargeOnce) -> dict[str, Any]:
    tool = "charge" if inp.reconcile else "charge_blind"
    receipt = await ctx.tool(tool, {"account": inp.account, "amount": inp.amount})
    await ctx.step("after", after_record)
    return {"receipt": receipt}


class ChargeThrice(BaseModel):
    account: str


@workflow(name="charge_thrice")
async def charge_thrice(ctx: WorkflowContext, inp: ChargeThrice) -> dict[str, Any]:
    """Three write-tool steps against the sink: what the scale-out crash test runs 200 of."""
    receipts = [
        await ctx.tool("charge", {"account": inp.account, "amount": amount}, name=f"charge-{amount}")
        for amount in (1, 2, 3)
    ]
    return {"receipts": receipts}


WORKFLOWS = [charge_once, charge_thrice]
