"""keel's single error root.

Every exception keel raises on purpose derives from :class:`KeelError`. The tree separates a developer's
mistakes (configuration, misuse of the API) from runtime failures (a task, a store, a network peer)::

    KeelError
    ├── ConfigError                 # bad settings or wiring; fix the code or the environment
    │   └── NotInstalled            # an optional part (weights, a driver) is missing: 503 where it is needed
    ├── InputError                  # a caller's request is invalid (HTTP 4xx)
    │   ├── NotFound                # no such resource for this tenant (404)
    │   ├── IdempotencyKeyReused    # same Idempotency-Key, different body (422)
    │   ├── IdempotencyInFlight     # same Idempotency-Key, original still being processed (409)
    │   ├── TaskNotFinished         # an operation that needs an ended task, on one still running (409)
    │   └── BlockedAddress          # a URL whose target the SSRF rules refuse (422)
    ├── AuthError                   # missing or bad credentials (401)
    │   └── Forbidden               # authenticated, but lacks a scope (403)
    ├── LimitExceeded               # a tenant's limit refuses the request for now (429, with Retry-After)
    │   ├── RateLimited             # the request rate (token bucket)
    │   ├── TooManyTasks            # queued and running tasks at the cap
    │   └── QuotaExceeded           # the daily or monthly cost quota is spent
    └── RuntimeFailure              # something failed while running work
        ├── StoreError              # the durable store could not do what was asked
        │   └── LeaseLost           # a fencing token no longer matches: another worker owns the task
        ├── WorkflowError           # a workflow step failed (becomes an envelope error)
        │   ├── StepFailed          # a durable step failed for good (after its retries); replays identically
        │   ├── BranchesFailed      # fewer parallel branches succeeded than ``min_success``
        │   ├── Nondeterminism      # the code took a different path than the recorded history
        │   ├── ClarificationNeeded # the plan is unsure or incomplete: ask the caller, run nothing expensive
        │   ├── ModelOutputError    # a 200 that is not usable: schema_violation, truncation, refusal, schema_drift
        │   ├── ModelUnavailable    # every model of a fallback chain has its circuit open: fail fast, not retried
        │   ├── DocumentRejected    # one document could not be ingested (encrypted, corrupt, a bomb, unreachable)
        │   └── ToolError           # a tool call failed; its message goes back to the model
        │       ├── ToolArgsInvalid # the arguments do not match the tool's schema (never retried)
        │       ├── ToolNotAllowed  # not in the task's allowlist, or the key lacks the tool's scopes
        │       └── ApprovalDenied  # a person denied the call
        ├── BudgetExceeded          # a per-task cap (steps, tool calls, tokens, cost, deadline) was crossed
        ├── UpstreamError           # a model provider or tool endpoint answered with an error (429, 5xx, ...)
        │   ├── ModelHTTPError      # a provider's HTTP error, mapped in one place per adapter
        │   └── StreamCut           # a model stream broke off before its end: never passed off as complete
        └── DeliveryError           # a webhook delivery attempt failed

Outside the tree, on purpose: :class:`AwaitingDecision` derives from ``BaseException`` (as
``asyncio.CancelledError`` does), because it is control flow, not failure: a workflow's ``except Exception``
must not swallow the pause that waits for a person's approval.

:mod:`keel.interaction.problems` maps this tree to RFC 9457 problem details in one place.
"""

from __future__ import annotations

import math


class KeelError(Exception):
    """Root of every error keel raises on purpose."""

    #: Stable, machine-readable slug; also the last segment of the problem ``type``.
    code: str = "keel_error"
    #: HTTP status used when the error crosses the HTTP edge.
    status: int = 500

    def __init__(self, message: str, *, detail: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class ConfigError(KeelError):
    code = "config_error"
    status = 500


class NotInstalled(ConfigError):
    """A part that only some requests need is not installed (the embedder's weights): keel serves the rest, and a
    request that needs it gets 503 with what to install."""

    code = "not_installed"
    status = 503


class InputError(KeelError):
    code = "invalid_request"
    status = 422


class NotFound(InputError):
    code = "not_found"
    status = 404


class IdempotencyKeyReused(InputError):
    code = "idempotency_key_reused"
    status = 422


class IdempotencyInFlight(InputError):
    code = "idempotency_in_flight"
    status = 409


class TaskNotFinished(InputError):
    code = "task_not_finished"
    status = 409


class BlockedAddress(InputError):
    code = "blocked_address"
    status = 422


class AuthError(KeelError):
    code = "unauthorized"
    status = 401


class Forbidden(AuthError):
    code = "forbidden"
    status = 403


class LimitExceeded(KeelError):
    """A tenant's limit refuses the request until ``retry_after_s`` has passed. ``headers`` go out with the
    problem: ``Retry-After`` always, the ``RateLimit`` headers for the request rate."""

    code = "limit_exceeded"
    status = 429

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        headers: dict[str, str] | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s))), **(headers or {})}


class RateLimited(LimitExceeded):
    code = "rate_limited"


class TooManyTasks(LimitExceeded):
    code = "too_many_tasks"


class QuotaExceeded(LimitExceeded):
    code = "quota_exceeded"


class RuntimeFailure(KeelError):
    code = "runtime_failure"
    status = 500


class StoreError(RuntimeFailure):
    code = "store_error"
    status = 503


class LeaseLost(StoreError):
    code = "lease_lost"


class WorkflowError(RuntimeFailure):
    """Raised by workflow code to fail a step with a typed, user-visible error."""

    code = "workflow_error"

    def __init__(
        self,
        message: str,
        *,
        type: str = "workflow_error",
        step: str | None = None,
        recovery_suggested: bool = False,
        pointer: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.type = type
        self.step = step
        self.recovery_suggested = recovery_suggested
        self.pointer = pointer
        """A JSON pointer into the output the error is about, when there is one."""


class StepFailed(WorkflowError):
    """A durable step failed after its retries. ``type`` classifies it (``timeout``, ``schema_violation``, ...).

    The failure is checkpointed like a result, so a resumed or replayed run sees the same failure again.
    """

    code = "step_failed"


class BranchesFailed(WorkflowError):
    code = "min_success_not_met"


class Nondeterminism(WorkflowError):
    code = "nondeterminism"


class ClarificationNeeded(WorkflowError):
    """Ends the task as ``needs_clarification``; ``questions`` go to the caller in the envelope."""

    code = "needs_clarification"

    def __init__(self, message: str, *, questions: list[str], confidence: float | None = None) -> None:
        super().__init__(message, type="needs_clarification", recovery_suggested=True)
        self.questions = questions
        self.confidence = confidence


class ToolError(WorkflowError):
    """A tool call failed. In an agent loop the message goes back to the model as the tool's result."""

    code = "tool_error"

    def __init__(
        self,
        message: str,
        *,
        type: str = "tool_error",
        tool: str | None = None,
        step: str | None = None,
        pointer: str | None = None,
        recovery_suggested: bool = False,
    ) -> None:
        super().__init__(message, type=type, step=step, pointer=pointer, recovery_suggested=recovery_suggested)
        self.tool = tool


class ToolArgsInvalid(ToolError):
    code = "invalid_tool_args"

    def __init__(
        self, message: str, *, tool: str, pointer: str | None = None, issues: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message, type="invalid_tool_args", tool=tool, pointer=pointer)
        self.issues = issues or []
        """Every problem as (JSON pointer into the arguments, message)."""


class ToolNotAllowed(ToolError):
    code = "tool_not_allowed"

    def __init__(self, message: str, *, tool: str) -> None:
        super().__init__(message, type="tool_not_allowed", tool=tool)


class ApprovalDenied(ToolError):
    code = "approval_denied"

    def __init__(self, message: str, *, tool: str) -> None:
        super().__init__(message, type="approval_denied", tool=tool)


class AwaitingDecision(BaseException):  # noqa: N818 - control flow, not an error
    """Not a failure: the run stops here until a person decides on ``requests`` (an approval, or a write whose
    outcome is unknown). The engine parks the task as ``waiting_for_approval``; a decision queues it again and
    the run resumes from its checkpoints."""

    def __init__(self, requests: list[object]) -> None:
        super().__init__(f"waiting for {len(requests)} decision(s)")
        self.requests = requests


class BudgetExceeded(RuntimeFailure):
    """A hard circuit breaker: the task stops, keeping what it finished."""

    code = "budget_exceeded"

    def __init__(self, budget: str, *, limit: float, used: float) -> None:
        super().__init__(f"{budget} budget exceeded: used {used:g} of {limit:g}", detail={"budget": budget})
        self.budget = budget
        self.limit = limit
        self.used = used


class UpstreamError(RuntimeFailure):
    """An HTTP-ish failure from a model provider or a tool endpoint. 429 and 5xx are retryable."""

    code = "upstream_error"
    status = 502

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, detail={"status_code": status_code})
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status_code is None or self.status_code == 429 or self.status_code >= 500


class ModelHTTPError(UpstreamError):
    """A provider answered with an HTTP error. 429 and 5xx are retryable; 4xx are not."""

    code = "model_http_error"

    def __init__(
        self, provider: str, status_code: int, body: str, *, retry_after: float | None = None, message: str = ""
    ) -> None:
        super().__init__(
            f"{provider} returned HTTP {status_code}: {message or body[:300]}",
            status_code=status_code,
            retry_after=retry_after,
        )
        self.provider = provider
        self.body = body[:2000]


class StreamCut(UpstreamError):
    """The stream ended or broke before the provider said it was finished. Retryable: a model call has no side
    effects, so asking again is safe; once retries run out it is reported as ``truncation``."""

    code = "stream_cut"

    def __init__(self, provider: str, partial_text: str, reason: str) -> None:
        super().__init__(f"{provider} stream was cut after {len(partial_text)} characters: {reason}")
        self.partial_text = partial_text


class DocumentRejected(WorkflowError):
    """One document could not be ingested; the others go on. ``reason`` is one of :data:`DOCUMENT_REASONS`, and
    the envelope error's ``type`` is ``document_<reason>``."""

    code = "document_rejected"
    status = 422

    def __init__(
        self, message: str, *, reason: str, document: str | None = None, detail: dict[str, object] | None = None
    ) -> None:
        super().__init__(message, type=f"document_{reason}", detail=detail)
        self.reason = reason
        self.document = document


DOCUMENT_REASONS = (
    "encrypted",  # needs a password and none was given
    "wrong_password",  # a password was given and does not open it
    "corrupt",  # not a readable PDF (or not the type it claims)
    "not_found",  # a document id the tenant does not have (unknown, expired, deleted, or another tenant's)
    "too_many_pages",  # over the page cap
    "too_large",  # over the byte cap, or decompresses past the decompressed-bytes cap
    "limit_exceeded",  # the parser hit its memory or CPU limit (a PDF bomb, usually)
    "timeout",  # parsing took longer than the wall-clock cap
    "unsupported_type",  # neither PDF nor text
    "unreachable",  # a URL that could not be fetched after its retries
    "empty",  # no text at all, even after OCR
)


class ModelOutputError(WorkflowError):
    """An answer that arrived but cannot be used. ``type`` is schema_violation, truncation, refusal or
    schema_drift; ``pointer`` locates the problem in the output."""

    code = "model_output_error"


class ModelUnavailable(WorkflowError):
    """No model of a fallback chain may be asked now: each one's circuit is open (or half-open with a probe in
    flight). Not retried: the cooldown, not a backoff, decides when a model is asked again. ``detail["models"]``
    names each model, its circuit state, why and its verdicts."""

    code = "model_unavailable"

    def __init__(self, models: list[dict[str, object]]) -> None:
        named = "; ".join(f"{m['provider']}:{m['model_id']} ({m['reason']})" for m in models)
        super().__init__(
            f"every model of the chain is unavailable: {named}", type="model_unavailable", detail={"models": models}
        )


class DeliveryError(RuntimeFailure):
    code = "delivery_error"

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after
