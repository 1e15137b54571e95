"""Workflows loaded into a test server through ``KEEL_WORKFLOWS`` (``api_workflows:WORKFLOWS``)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import workflow
from keel.orchestration.tools import Tool, ToolCatalog
from keel.testing.models import FakeModel

TOOL_RUNS: list[str] = []


class SearchArgs(BaseModel):
    query: str


async def search(args: SearchArgs) -> dict[str, Any]:
    TOOL_RUNS.append(args.query)
    return {"query": args.query, "hits": 2}


CATALOG = ToolCatalog([Tool(name="search", description="Search the documents.", input_model=SearchArgs, fn=search)])


class Ask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    intent: str
    confidence: float = 0.9


@workflow(name="triage")
async def triage(ctx: WorkflowContext, req: Ask) -> dict[str, Any]:
    """Plans with a scripted model whose confidence the caller chooses, then runs the plan."""
    plan = {
        "goal": req.intent,
        "confidence": req.confidence,
        "nodes": [{"id": "s", "kind": "tool", "tool": "search", "args": {"query": req.intent}}],
    }
    model = FakeModel([json.dumps(plan)])
    planned = await ctx.plan(req.intent, CATALOG, model=model)
    run = await ctx.run_plan(planned, CATALOG, model=model)
    return {"answer": run.output}


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str


@workflow(name="ask_default")
async def ask_default(ctx: WorkflowContext, q: Question) -> str:
    """Asks whatever model the server is configured with (KEEL_DEFAULT_MODEL)."""
    answer: str = await ctx.generate("answer", ctx.model(), q.question)
    return answer


WORKFLOWS = [triage, ask_default]
