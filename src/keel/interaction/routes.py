"""The task API: submit (202), poll (Retry-After), list, stream (SSE), cancel."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from keel.errors import IdempotencyInFlight, IdempotencyKeyReused, InputError, NotFound
from keel.interaction.auth import require
from keel.interaction.schemas import ModelStatsView, SubmitTask, TaskAccepted, TaskPage, TaskView, accepted, view
from keel.memory.types import ApiKey, CreateOutcome, IdempotencyClaim, NewTask, Task, TaskStatus
from keel.netguard import resolve_target
from keel.orchestration.tools import ToolCatalog, permitted

router = APIRouter(prefix="/v1")
PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key", **PROBLEM},
    403: {"description": "The key lacks a scope", **PROBLEM},
    404: {"description": "No such task for this tenant", **PROBLEM},
}

Reader = Annotated[ApiKey, Depends(require("tasks:read"))]
Writer = Annotated[ApiKey, Depends(require("tasks:write"))]
IdempotencyKey = Annotated[
    str | None, Header(max_length=255, description="Retries with the same key return the same task.")
]


def _keel(request: Request) -> Any:
    return request.app.state.keel


def _request_hash(body: SubmitTask) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "/tasks",
    status_code=202,
    response_model=TaskAccepted,
    responses={
        **ERRORS,
        200: {"description": "Answered from the result cache (`cache.max_age_s` allowed it): the earlier task"},
        409: {"description": "A request with this Idempotency-Key is still in flight", **PROBLEM},
        413: {"description": "Body too large", **PROBLEM},
        422: {"description": "Invalid body, or Idempotency-Key reused with a different body", **PROBLEM},
    },
    summary="Submit a task",
)
async def submit(
    body: SubmitTask, request: Request, key: Writer, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Validate, store durably, and return 202 with the task's handle. Nothing is stored if validation fails."""
    task, headers, status = await create_task(_keel(request), key, body, idempotency_key)
    payload = view(task) if status == 200 else accepted(task)
    return JSONResponse(payload.model_dump(mode="json"), status_code=status, headers=headers)


async def create_task(
    keel: Any, key: ApiKey, body: SubmitTask, idempotency_key: str | None
) -> tuple[Task, dict[str, str], int]:
    """What every task-creating endpoint shares: validate (the workflow, its input, its ``admit`` hook, the
    webhook target, the tool allowlist) before anything is stored, answer from the result cache when the body
    allows it, honour ``Idempotency-Key``, store the task durably and wake the runtime.

    Returns the task, the response headers (``Location``; ``Idempotent-Replayed`` or the cache headers) and the
    status: 202 for a new or replayed task, 200 for a cache hit (the earlier, finished task)."""
    wf = keel.registry.get(body.workflow)
    if wf is None:
        raise InputError(f"unknown workflow {body.workflow!r}", detail={"known": keel.registry.names()})
    try:
        parsed = wf.input_model.model_validate(body.input)
    except ValidationError as exc:
        raise InputError(
            "input does not match the workflow's schema",
            detail={
                "errors": [
                    {"pointer": "/input/" + "/".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()
                ]
            },
        ) from None
    if wf.admit is not None:
        await wf.admit(keel, key.tenant, parsed)
    if body.webhook is not None:
        await resolve_target(str(body.webhook.url), allow=keel.webhook_allow)
    policy = _policy(body, key, keel.tools)
    input_json = parsed.model_dump(mode="json")
    fingerprint = _fingerprint(keel, body, input_json)
    if body.cache is not None:
        cached = await keel.store.cached_result(key.tenant, fingerprint, keel.clock() - body.cache.max_age_s)
        if cached is not None:
            age = max(0, int(keel.clock() - (cached.finished_at or keel.clock())))
            headers = {"Location": f"/v1/tasks/{cached.id}", "Cache-Status": "keel; hit", "Age": str(age)}
            return cached, headers, 200

    claim = None
    if idempotency_key is not None:
        claim = IdempotencyClaim(
            key=idempotency_key,
            request_hash=_request_hash(body),
            expires_at=keel.clock() + keel.settings.idempotency_ttl_hours * 3600,
        )
        scope = (key.tenant, idempotency_key)
        if scope in keel.in_flight:
            raise IdempotencyInFlight("a request with this Idempotency-Key is still being processed; retry later")
        keel.in_flight.add(scope)
    try:
        result = await keel.store.create_task(
            NewTask(
                tenant=key.tenant,
                workflow=body.workflow,
                input=input_json,
                webhook_url=str(body.webhook.url) if body.webhook else None,
                webhook_secret=body.webhook.secret if body.webhook else None,
                budget=body.budget.model_dump(),
                metadata=body.metadata,
                estimated_duration_s=wf.estimate(parsed),
                policy=policy,
                cache_key=fingerprint,
            ),
            claim,
            keel.clock(),
        )
    finally:
        if claim is not None:
            keel.in_flight.discard((key.tenant, claim.key))
    if result.outcome is CreateOutcome.key_reused:
        raise IdempotencyKeyReused("this Idempotency-Key was already used with a different request body")
    task = result.task
    assert task is not None
    headers = {"Location": f"/v1/tasks/{task.id}"}
    if result.outcome is CreateOutcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    else:
        keel.runtime.wake()
    return task, headers, 202


def _fingerprint(keel: Any, body: SubmitTask, input_json: dict[str, Any]) -> str:
    """What makes two requests identical for the result cache: workflow, validated input (a document id is
    derived from the document's bytes, so equal ids mean equal contents), the model and embedding model that
    would answer, and every setting that shapes the result (budget, tool allowlist, approval rule)."""
    canonical = json.dumps(
        {
            "workflow": body.workflow,
            "input": input_json,
            "model": keel.settings.default_model,
            "embedding": keel.memory.embedder.space.key,
            "budget": body.budget.model_dump(mode="json"),
            "tools": body.tools,
            "approval": body.approval,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _policy(body: SubmitTask, key: ApiKey, catalog: ToolCatalog) -> dict[str, Any]:
    """What the task may do, fixed at submission: its tool allowlist, the submitting key's scopes, approvals."""
    if body.tools is not None:
        problems = []
        for i, name in enumerate(body.tools):
            tool = catalog.get(name)
            if tool is None:
                problems.append({"pointer": f"/tools/{i}", "message": f"no tool named {name!r}"})
            elif not permitted(tool, key.scopes):
                missing = ", ".join(sorted(tool.scopes - key.scopes))
                problems.append({"pointer": f"/tools/{i}", "message": f"{name} needs the scope(s) {missing}"})
        if problems:
            raise InputError("the tool allowlist names tools this key cannot use", detail={"errors": problems})
    return {"tools": body.tools, "scopes": sorted(key.scopes), "approval": body.approval}


@router.get("/workflows", responses=ERRORS, summary="List workflows")
async def list_workflows(request: Request, key: Reader) -> list[dict[str, Any]]:
    """Every workflow `POST /v1/tasks` accepts, with its description and the JSON Schema of its `input` (with
    examples where the workflow gives them): what a client needs to build a valid request without guessing."""
    registry = _keel(request).registry
    found = (registry.get(name) for name in registry.names())
    return [
        {"name": wf.name, "description": wf.description, "input_schema": wf.input_model.model_json_schema()}
        for wf in found
        if wf is not None
    ]


@router.get("/tasks", response_model=TaskPage, responses=ERRORS, summary="List tasks")
async def list_tasks(
    request: Request,
    key: Reader,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> TaskPage:
    tasks = await _keel(request).store.list_tasks(key.tenant, statuses=status or (), limit=limit + 1, before=cursor)
    items = [view(t) for t in tasks[:limit]]
    return TaskPage(items=items, next_cursor=items[-1].id if len(tasks) > limit else None)


@router.get("/tasks/{task_id}", response_model=TaskView, responses=ERRORS, summary="Poll a task")
async def get_task(task_id: str, request: Request, response: Response, key: Reader) -> TaskView:
    """Status, progress and timestamps; `Retry-After` while running; the envelope once terminal."""
    task = await _keel(request).store.get_task(task_id, key.tenant)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if not task.status.terminal:
        # A task waiting for a person will not move by itself soon: poll slowly.
        wait = {TaskStatus.running: "1", TaskStatus.waiting_for_approval: "30"}
        response.headers["Retry-After"] = wait.get(task.status, "2")
    return view(task)


@router.post(
    "/tasks/{task_id}/cancel",
    response_model=TaskView,
    responses={**ERRORS, 202: {"description": "Cancellation requested; the task is winding down"}},
    summary="Cancel a task",
)
async def cancel(task_id: str, request: Request, key: Writer) -> JSONResponse:
    """Idempotent. A running task stops at once and keeps its partial result."""
    keel = _keel(request)
    task = await keel.store.request_cancel(task_id, key.tenant)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if task.status in (TaskStatus.queued, TaskStatus.waiting_for_approval):
        waiting = task.status is TaskStatus.waiting_for_approval
        # A parked task keeps what it finished: its provisional envelope carries the partial result.
        partial = ((task.envelope or {}).get("result") or {}).get("partial") if waiting else None
        envelope = {
            "status": "partial_success" if partial else "failed",
            "result": partial,
            "errors": [
                {
                    "type": "cancelled",
                    "message": "cancelled while waiting for approval" if waiting else "cancelled before it started",
                    "severity": "warning",
                    "recovery_suggested": False,
                    "step": None,
                }
            ],
        }
        await keel.store.finish(None, task.id, TaskStatus.cancelled, envelope, keel.clock())
        keel.notifier.notify(task.id)
    elif task.status is TaskStatus.running:
        keel.runtime.cancel(task.id)
    task = await keel.store.get_task(task_id, key.tenant)
    assert task is not None
    return JSONResponse(view(task).model_dump(mode="json"), status_code=200 if task.status.terminal else 202)


@router.get(
    "/tasks/{task_id}/events",
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "SSE from the durable event log"},
        204: {"description": "The task is finished and nothing follows Last-Event-ID"},
    },
    summary="Stream a task's events (SSE)",
)
async def events(
    task_id: str,
    request: Request,
    key: Reader,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id_q: Annotated[int | None, Query(alias="last_event_id", ge=0)] = None,
) -> Response:
    """`id:` is the event's sequence number; resume with `Last-Event-ID` (header or query), even after a restart."""
    keel = _keel(request)
    task = await keel.store.get_task(task_id, key.tenant)
    if task is None:
        raise NotFound(f"no task {task_id}")
    after = last_event_id_q or 0
    if last_event_id:
        if not (last_event_id.strip().isascii() and last_event_id.strip().isdigit()):
            raise InputError("Last-Event-ID must be an event sequence number")
        after = int(last_event_id)
    if after and [e.seq for e in await keel.store.read(task_id, after - 1, limit=1)] != [after]:
        # Ids come only from this log, so a cursor it never issued is a client bug; refusing it here keeps the
        # stream loop below free of a per-poll "is the cursor past the end?" check.
        raise InputError(f"Last-Event-ID {after} is not an event of task {task_id}")
    if task.status.terminal and not await keel.store.read(task_id, after, limit=1):
        return Response(status_code=204)

    return event_stream(keel, task_id, after)


def event_stream(keel: Any, task_id: str, after: int = 0, headers: dict[str, str] | None = None) -> Response:
    """SSE relay of a task's durable event log after sequence number ``after``, up to and including ``end``:
    ``retry:`` first, then every event with ``id:`` = its sequence number, so a client whose connection drops
    resumes at ``GET /v1/tasks/{id}/events`` with ``Last-Event-ID`` and loses nothing."""

    async def stream() -> AsyncIterator[ServerSentEvent]:
        cursor = after
        yield ServerSentEvent(comment="keel event stream", retry=keel.settings.sse_retry_ms)
        while True:
            batch = await keel.store.read(task_id, cursor)
            for ev in batch:
                cursor = ev.seq
                yield ServerSentEvent(id=str(ev.seq), event=ev.type, data=json.dumps(ev.data))
                if ev.type == "end":
                    return
            if not batch:
                # Woken in-process at once; the poll interval catches writers in other processes.
                await keel.notifier.wait(task_id, keel.settings.poll_interval_s)

    return EventSourceResponse(stream(), headers=headers, ping=keel.settings.sse_heartbeat_s, send_timeout=30)


Admin = Annotated[ApiKey, Depends(require("admin"))]


@router.get(
    "/models/stats",
    response_model=list[ModelStatsView],
    responses={401: ERRORS[401], 403: ERRORS[403]},
    summary="Rolling per-model counters",
    tags=["models"],
)
async def model_stats(
    request: Request,
    key: Admin,
    model_id: Annotated[str | None, Query(description="One pinned model id; all models when omitted.")] = None,
    hours: Annotated[float, Query(gt=0, le=24 * 90, description="How far back, in hours.")] = 24,
) -> list[ModelStatsView]:
    """Per pinned model and hour: calls, errors, JSON- and schema-valid rates, refusals, truncations, latency,
    tokens and cost. The raw material for statistical SLAs on a model that may drift under a stable name."""
    keel = _keel(request)
    rows = await keel.store.model_stats(model_id, keel.clock() - hours * 3600)
    return [ModelStatsView.of(r) for r in rows]
