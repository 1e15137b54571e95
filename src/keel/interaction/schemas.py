"""Wire schemas (pydantic at the edge)."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from keel.memory.types import EffectStatus, ModelStats, Task, TaskStatus, Verdict
from keel.orchestration.engine.envelope import Envelope
from keel.orchestration.llm.reliability import SloReport
from keel.service import Submission, Webhook

__all__ = [
    "RequestBody",
    "BudgetSpec",
    "Envelope",
    "ModelStatsView",
    "SloView",
    "SubmitTask",
    "TaskAccepted",
    "TaskView",
    "TaskPage",
    "WebhookSpec",
    "Links",
]


class RequestBody(BaseModel):
    """The base of every JSON request body: strict types, so ``true`` is not ``1``, ``false`` not ``0.0`` and
    ``"5"`` not ``5`` (pydantic's lax mode coerces them, and a client's mistake would pass unseen). Unknown members
    are refused. The body's bytes were already held to strict JSON (:mod:`keel.interaction.wire_json`).

    FastAPI validates the decoded body as Python data, where strict mode wants an enum member rather than its
    value: an enum field says ``Field(strict=False)``; a ``Literal`` needs nothing."""

    model_config = ConfigDict(extra="forbid", strict=True)


class WebhookSpec(RequestBody):
    model_config = ConfigDict(extra="forbid")
    url: AnyHttpUrl = Field(description="Receiver; refused if it resolves to a private address (SSRF).")
    secret: str = Field(
        description="Standard Webhooks secret: `whsec_` + base64 of 24 to 64 random bytes.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: str) -> str:
        if not v.startswith("whsec_"):
            raise ValueError("secret must start with 'whsec_'")
        raw = v.removeprefix("whsec_")
        try:
            key = base64.b64decode(raw, validate=True)
        except ValueError:
            raise ValueError("secret must be 'whsec_' followed by base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError("secret must decode to 24..64 bytes")
        return v


class BudgetSpec(RequestBody):
    """Per-task caps. Crossing any of them stops the task (`budget_exceeded`), keeping its partial result."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int | None = Field(None, ge=1, le=100_000, description="Durable steps, all kinds together.")
    max_tool_calls: int | None = Field(20, ge=0, le=10_000, description="Tool calls (default 20).")
    max_tokens: int | None = Field(None, ge=1, description="Model tokens, input and output together.")
    max_cost_usd: float | None = Field(None, ge=0, description="Model spend in USD.")
    deadline_s: float | None = Field(None, gt=0, le=7 * 86400, description="Wall-clock seconds from submission.")


class CacheSpec(RequestBody):
    """Permission to answer from the result cache."""

    model_config = ConfigDict(extra="forbid")
    max_age_s: int = Field(
        ge=0,
        le=30 * 86_400,
        description="Accept the stored result of an identical request (same workflow, input, document contents, "
        "model and settings) that succeeded at most this many seconds ago. The answer is then 200 with that task "
        "and `Cache-Status: keel; hit`, and nothing runs again.",
    )


class SubmitTask(RequestBody):
    """Body of `POST /v1/tasks`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "workflow": "document_analysis",
                    "input": {
                        "request": "Analyse these 4 PDFs, compare insights, and tell me the risks.",
                        "documents": [
                            "doc_3f2a9c1e0b7d4a5f6e8c9d0a",
                            "doc_9b41e7c2d3f5a6b8c0d1e2f3",
                            "doc_77c0a1b2c3d4e5f6a7b8c9d0",
                            "https://example.com/contracts/vendor-c.pdf",
                        ],
                    },
                    "webhook": {
                        "url": "https://hooks.example.com/keel",
                        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    },
                    "budget": {"max_cost_usd": 0.5, "deadline_s": 900},
                },
                {"workflow": "diagnostic", "input": {"steps": 3, "step_seconds": 0.5}},
                {
                    "workflow": "diagnostic",
                    "input": {"steps": 5, "step_seconds": 1, "fail_at": 4},
                    "webhook": {
                        "url": "https://hooks.example.com/keel",
                        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    },
                    "budget": {"max_tool_calls": 10, "max_cost_usd": 0.5, "deadline_s": 600},
                    "metadata": {"ticket": "OPS-42"},
                },
            ]
        },
    )
    workflow: str = Field(min_length=1, max_length=100, description="Registered workflow name.")
    input: dict[str, Any] = Field(default_factory=dict, description="Validated against the workflow's schema.")
    webhook: WebhookSpec | None = None
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Step, tool, token, cost and time caps.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Opaque to keel; returned as given.")
    tools: list[str] | None = Field(
        None,
        max_length=200,
        description="Allowlist of tools the task may call (see `GET /v1/tools`); all the key may use when omitted.",
        examples=[["fetch_url", "read_document"]],
    )
    approval: Literal["auto", "always"] = Field(
        "auto",
        description="`auto`: a write tool needs a person's approval once the task has read untrusted content "
        "(documents, fetched pages); `always`: every write does.",
    )
    cache: CacheSpec | None = Field(
        None, description="Allow a stored result of an identical request; without it the task always runs."
    )

    def submission(self) -> Submission:
        """What the body asks the service for."""
        return Submission(
            workflow=self.workflow,
            input=self.input,
            webhook=Webhook(url=str(self.webhook.url), secret=self.webhook.secret) if self.webhook else None,
            budget=self.budget.model_dump(mode="json"),
            metadata=self.metadata,
            tools=self.tools,
            approval=self.approval,
            cache_max_age_s=self.cache.max_age_s if self.cache else None,
        )


class DecisionBody(RequestBody):
    """Body of `POST /v1/tasks/{id}/approvals/{call_id}`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"decision": "approve"}, {"decision": "deny", "note": "not to that address"}]},
    )
    decision: Verdict = Field(
        strict=False,
        description="`approve` runs the call (for an unknown outcome: again, with the same idempotency key); "
        "`deny` does not (the call fails as `approval_denied`); `applied` says an interrupted call did happen.",
    )
    note: str | None = Field(None, max_length=2000, description="Why; recorded with the decision.")
    result: Any = Field(None, description="With `applied`: the call's result, as the workflow should see it.")


class DecisionView(BaseModel):
    call_id: str
    kind: Literal["approval", "outcome_unknown"]
    tool: str
    args: dict[str, Any]
    step: str
    reason: str
    effect_key: str | None
    verdict: Verdict | None
    note: str | None
    decided_by: str | None
    requested_at: float
    decided_at: float | None


class EffectView(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # EffectView.model_validate(record): the ledger's fields as is
    key: str = Field(description="The idempotency key: hash of task id, step path, tool name and arguments.")
    step: str
    tool: str
    args: dict[str, Any]
    status: EffectStatus
    result: Any
    error: dict[str, Any] | None
    executions: int
    created_at: float
    updated_at: float


class ToolView(BaseModel):
    name: str
    description: str
    effect: Literal["read", "write"]
    scopes: list[str]
    approval: Literal["auto", "always", "never"]
    untrusted_output: bool
    reconcile: bool = Field(description="Whether the tool can tell, after a crash, if a write happened.")
    source: str
    input_schema: dict[str, Any]
    permitted: bool = Field(description="Whether this API key holds the scopes the tool needs.")


class Links(BaseModel):
    self: str
    events: str
    cancel: str


class TaskAccepted(BaseModel):
    id: str
    status: TaskStatus
    links: Links
    estimated_duration_s: float | None = None


class TaskView(BaseModel):
    id: str
    workflow: str
    status: TaskStatus
    progress: float = Field(ge=0, le=1)
    current_step: str | None
    attempts: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    estimated_duration_s: float | None
    dead_lettered: bool
    metadata: dict[str, Any]
    links: Links
    envelope: Envelope | None = Field(
        None,
        description="Present once the task is terminal; while it is `waiting_for_approval`, a provisional one "
        "(status `needs_clarification`) lists the pending decisions in `result.pending_decisions`.",
    )


class TaskPage(BaseModel):
    items: list[TaskView]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


def links(task_id: str) -> Links:
    base = f"/v1/tasks/{task_id}"
    return Links(self=base, events=f"{base}/events", cancel=f"{base}/cancel")


def view(task: Task) -> TaskView:
    return TaskView(
        id=task.id,
        workflow=task.workflow,
        status=task.status,
        progress=task.progress,
        current_step=task.current_step,
        attempts=task.attempts,
        created_at=task.created_at,
        updated_at=task.updated_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        estimated_duration_s=task.estimated_duration_s,
        dead_lettered=task.dead_lettered,
        metadata=task.metadata,
        links=links(task.id),
        envelope=Envelope.model_validate(task.envelope) if task.envelope else None,
    )


def accepted(task: Task) -> TaskAccepted:
    return TaskAccepted(
        id=task.id, status=task.status, links=links(task.id), estimated_duration_s=task.estimated_duration_s
    )


class ModelStatsView(BaseModel):
    """One model's counters over one hour."""

    model_id: str
    provider: str
    hour_start: float
    calls: int
    errors: int
    structured_calls: int
    json_valid_rate: float | None = Field(description="Of structured calls, the share that parsed as JSON.")
    schema_valid_rate: float | None = Field(description="Of structured calls, the share valid against the schema.")
    refusals: int
    truncations: int
    latency_ms_mean: float | None
    latency_ms_max: float
    input_tokens: int
    output_tokens: int
    cost_usd: float

    @classmethod
    def of(cls, s: ModelStats) -> ModelStatsView:
        return cls(
            model_id=s.model_id,
            provider=s.provider,
            hour_start=s.bucket,
            calls=s.calls,
            errors=s.errors,
            structured_calls=s.structured,
            json_valid_rate=round(s.json_valid / s.structured, 4) if s.structured else None,
            schema_valid_rate=round(s.schema_valid / s.structured, 4) if s.structured else None,
            refusals=s.refusals,
            truncations=s.truncations,
            latency_ms_mean=round(s.latency_ms_sum / s.calls, 3) if s.calls else None,
            latency_ms_max=s.latency_ms_max,
            input_tokens=s.input_tokens,
            output_tokens=s.output_tokens,
            cost_usd=round(s.cost_usd, 10),
        )


class RateView(BaseModel):
    """One rate over the window: the share of ``n`` calls, its Wilson 95% interval, and its verdict."""

    rate: float | None = Field(description="The measured share; null when no call counts toward it yet.")
    low: float = Field(description="Lower bound of the Wilson 95% interval.")
    high: float = Field(description="Upper bound of the Wilson 95% interval.")
    n: int = Field(description="Calls the rate is measured over (its denominator).")
    threshold: float | None = Field(
        description="From KEEL_SLO: a floor for json_valid and schema_valid, a ceiling for the others."
    )
    verdict: Literal["ok", "uncertain", "violated"] | None = Field(
        description="ok: the whole interval is on the right side of the threshold; violated: the whole interval is "
        "past it; uncertain: it straddles it. Null without a threshold."
    )


class LatencyView(BaseModel):
    p50: float | None = Field(description="Median latency of the answered calls, ms (from log-scale bins, ±5%).")
    p95: float | None = Field(description="95th percentile latency of the answered calls, ms.")
    n: int = Field(description="Answered calls timed (failed and cancelled calls are not).")


class SloModelView(BaseModel):
    provider: str
    model_id: str
    metrics: dict[str, RateView] = Field(
        description="json_valid, schema_valid (over structured answers); error, error_429, error_5xx, error_timeout, "
        "error_cut, refusal, truncation (over calls not cancelled); repair, fallback, cancelled (over all calls)."
    )
    latency_ms: LatencyView


class SloView(BaseModel):
    """Statistical SLAs per pinned model, over a rolling window."""

    window_s: float = Field(description="The window (KEEL_SLO_WINDOW_H), seconds.")
    models: list[SloModelView]

    @classmethod
    def of(cls, r: SloReport) -> SloView:
        return cls(
            window_s=r.window_s,
            models=[
                SloModelView(
                    provider=m.provider,
                    model_id=m.model_id,
                    metrics={k: RateView.model_validate(v.as_dict()) for k, v in m.metrics.items()},
                    latency_ms=LatencyView(p50=_ms(m.latency_p50_ms), p95=_ms(m.latency_p95_ms), n=m.latency_n),
                )
                for m in r.models
            ],
        )


def _ms(v: float | None) -> float | None:
    return round(v, 3) if v is not None else None
