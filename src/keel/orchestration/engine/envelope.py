"""Builds the semantic envelope a terminal task carries."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from keel.memory.types import TaskStatus
from keel.orchestration.engine.context import EnvelopeError, WorkflowContext

EnvelopeStatus = Literal["success", "partial_success", "failed", "needs_clarification"]


class EnvelopeErrorModel(BaseModel):
    """One problem with the output: its kind, how bad it is, and whether a retry may help."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="Machine-readable kind, e.g. `timeout`, `schema_violation`, `cancelled`.")
    message: str = Field(description="Human-readable explanation.")
    severity: Literal["info", "warning", "error"] = "error"
    recovery_suggested: bool = Field(False, description="True when retrying or fixing the input may help.")
    step: str | None = Field(None, description="The workflow step the error belongs to, if any.")
    pointer: str | None = Field(None, description="JSON pointer into the output the error is about, if any.")


class EnvelopeMetadata(BaseModel):
    steps: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Every step in call order: name, kind, status, duration_ms, attempts, errors, and whether "
        "it was replayed from its checkpoint after a resume.",
    )
    tools_called: list[dict[str, Any]] = Field(default_factory=list)
    duration_ms: float = 0.0
    model_ids: list[str] = Field(default_factory=list, description="Pinned model ids the providers returned.")
    model_calls: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Every model call, failed, refused and cancelled ones included: provider, requested model, the "
        "model id that answered, adapter version, settings, tokens (from the provider, or counted), cost, latency, "
        "finish reason and outcome (ok, refusal, http_529, cancelled, ...), with error, error_class, repair, "
        "cancelled and fallback flags where they apply. A model a fallback chain skipped is listed with outcome "
        "skipped, the reason, its circuit state and its verdicts.",
    )
    tenant_usage: dict[str, Any] | None = Field(
        None, description="The tenant's model calls and spend so far today (UTC), this task included."
    )
    tokens: dict[str, int] = Field(default_factory=dict)
    cost_usd: float = 0.0
    budget: dict[str, Any] = Field(default_factory=dict, description="Budget limits and what the task used.")
    reductions: dict[str, Any] = Field(
        default_factory=dict, description="Map-reduce trees: how inputs larger than a context window were combined."
    )
    plan: dict[str, Any] | None = Field(None, description="The validated task graph, when the workflow planned.")
    retrieval: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Every vector-memory search: query, embedding space, each hit's document, page, offsets and "
        "cosine score, and the confidence (0-1) with its level (high/medium/low/none).",
    )


class Envelope(BaseModel):
    """The semantic envelope: HTTP says the request was processed; `status` says whether the output is usable."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "status": "partial_success",
                    "result": {"summary": "..."},
                    "errors": [
                        {
                            "type": "timeout",
                            "message": "document 3 timed out after 30 s",
                            "severity": "warning",
                            "recovery_suggested": True,
                            "step": "summarise-3",
                        }
                    ],
                    "metadata": {
                        "steps": [],
                        "tools_called": [],
                        "duration_ms": 21034.5,
                        "model_ids": [],
                        "tokens": {"input": 0, "output": 0, "total": 0},
                        "cost_usd": 0.0,
                    },
                }
            ]
        },
    )
    status: EnvelopeStatus
    result: Any = None
    errors: list[EnvelopeErrorModel] = Field(default_factory=list)
    metadata: EnvelopeMetadata = Field(default_factory=EnvelopeMetadata)


_ENVELOPE_STATUS = {
    TaskStatus.succeeded: "success",
    TaskStatus.partial_success: "partial_success",
    TaskStatus.failed: "failed",
    TaskStatus.needs_clarification: "needs_clarification",
    TaskStatus.waiting_for_approval: "needs_clarification",  # provisional: a person must answer before it goes on
}


def build_envelope(
    status: TaskStatus,
    ctx: WorkflowContext,
    result: Any,
    started: float,
    extra_errors: list[EnvelopeError],
    *,
    tenant: dict[str, Any] | None = None,
) -> dict[str, Any]:
    errors = [asdict(e) for e in [*ctx.errors, *extra_errors]]
    if status is TaskStatus.cancelled:
        # A cancelled task's output is usable only as far as its partial result goes.
        env_status = "partial_success" if result else "failed"
    else:
        env_status = _ENVELOPE_STATUS[status]
    used = ctx.meter.used
    return {
        "status": env_status,
        "result": pydantic_core.to_jsonable_python(result),
        "errors": errors,
        "metadata": {
            "steps": [asdict(s) for s in ctx.steps],
            "tools_called": ctx.metadata["tools_called"],
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "model_ids": ctx.metadata["model_ids"],
            "model_calls": ctx.metadata["model_calls"],
            "tenant_usage": tenant,
            "tokens": {"input": used.input_tokens, "output": used.output_tokens, "total": used.tokens},
            "cost_usd": round(used.cost_usd, 10),
            "budget": ctx.meter.snapshot(),
            "reductions": ctx.metadata["reductions"],
            "plan": ctx.metadata.get("plan"),
            "retrieval": ctx.metadata.get("retrieval", []),
        },
    }
