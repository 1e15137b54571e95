"""The wire shapes the client returns, and the request parts it takes.

Responses are pydantic models that keep members they do not know (``extra="allow"``): a newer server adding a
field never breaks an older client, and nothing it sent is lost. Request parts are ``TypedDict``s, so a plain dict
literal type-checks. ``TaskStatus`` and ``Verdict`` are the server's own wire enums (from ``keel.memory.types``,
which imports nothing but the standard library), so which statuses are terminal is decided in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from keel.memory.types import TaskStatus, Verdict

__all__ = [
    "Budget",
    "Decision",
    "Document",
    "Envelope",
    "EnvelopeError",
    "Event",
    "Links",
    "Task",
    "TaskHandle",
    "TaskPage",
    "TaskStatus",
    "Verdict",
    "Webhook",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# -- what the server returns ------------------------------------------------------------------------------------


class Links(_Wire):
    """Where a task lives: paths relative to the server's base URL."""

    self: str
    events: str
    cancel: str


class EnvelopeError(_Wire):
    """One problem with a task's output."""

    type: str = Field(description="Machine-readable kind: `timeout`, `schema_violation`, `document_encrypted`, …")
    message: str
    severity: Literal["info", "warning", "error"] = "error"
    recovery_suggested: bool = False
    step: str | None = None
    pointer: str | None = None


class Envelope(_Wire):
    """The semantic envelope: whether the output is usable (``status``), the output, and what went wrong."""

    status: Literal["success", "partial_success", "failed", "needs_clarification"]
    result: Any = None
    errors: list[EnvelopeError] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Steps, model calls, tokens, cost, …")


class TaskHandle(_Wire):
    """What ``submit`` answers: the task's id, status and links."""

    id: str
    status: TaskStatus
    links: Links
    estimated_duration_s: float | None = None
    replayed: bool = Field(False, description="From `Idempotent-Replayed`: the key's earlier task came back.")
    cached: bool = Field(False, description="From `Cache-Status`: an identical earlier result answered (200).")


class Task(_Wire):
    """A task as ``GET /v1/tasks/{id}`` shows it; ``envelope`` once it is terminal (a provisional one while it
    waits for approval, listing ``result["pending_decisions"]``)."""

    id: str
    workflow: str
    status: TaskStatus
    progress: float
    current_step: str | None = None
    attempts: int = 0
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    estimated_duration_s: float | None = None
    dead_lettered: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    links: Links
    envelope: Envelope | None = None

    @property
    def settled(self) -> bool:
        """Terminal, or parked until a person decides: either way it will not move by itself soon."""
        return self.status.terminal or self.status is TaskStatus.waiting_for_approval


class TaskPage(_Wire):
    """One page of ``GET /v1/tasks``; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[Task]
    next_cursor: str | None = None


class Document(_Wire):
    """A document in vector memory. ``status`` is ``ingested``, or ``skipped``/``failed`` with the reason in
    ``errors``/``warnings`` (an encrypted PDF is skipped with a warning, not refused)."""

    id: str
    status: str
    pages: int = 0
    chunks: int = 0
    source: str = ""
    media_type: str = ""
    size: int = 0
    sha256: str = ""
    space: str | None = None
    warnings: list[dict[str, Any]] = Field(default_factory=list)
    errors: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None

    @property
    def ingested(self) -> bool:
        return self.status == "ingested"


class Decision(_Wire):
    """A tool call a task asked a person about; ``verdict`` is ``None`` until decided."""

    call_id: str
    kind: str = Field(description="`approval`, or `outcome_unknown` for an interrupted write.")
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    step: str = ""
    reason: str = ""
    effect_key: str | None = None
    verdict: Verdict | None = None
    note: str | None = None
    decided_by: str | None = None
    requested_at: float = 0.0
    decided_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One event of a task's durable log, as its SSE frame carried it."""

    id: int
    """The event's sequence number in the task's log (the SSE ``id:``): resume after it with ``after=id``."""
    type: str
    """``status``, ``step_started``, ``progress``, ``token``, ``decision_requested``, …, and ``end`` last."""
    data: dict[str, Any]

    @classmethod
    def of(cls, id: int, type: str, data: str) -> Event:
        parsed = json.loads(data) if data else {}
        return cls(id=id, type=type, data=parsed if isinstance(parsed, dict) else {"value": parsed})

    @property
    def envelope(self) -> Envelope | None:
        """The task's envelope, on the ``end`` event."""
        raw = self.data.get("envelope") if self.type == "end" else None
        return Envelope.model_validate(raw) if isinstance(raw, dict) else None


# -- what the client sends --------------------------------------------------------------------------------------


class Webhook(TypedDict):
    """Where keel POSTs the task's updates (Standard Webhooks, signed with ``secret``: ``whsec_`` + base64)."""

    url: str
    secret: str


class Budget(TypedDict, total=False):
    """Per-task caps; crossing one ends the task ``budget_exceeded`` with its partial result."""

    max_steps: int
    max_tool_calls: int
    max_tokens: int
    max_cost_usd: float
    deadline_s: float
