"""The OpenAI-compatible edge: ``/v1/responses``, ``/v1/chat/completions`` and ``/v1/models``, so that the
official ``openai`` SDK (and whatever speaks its protocol) works against keel with a keel API key as its
``api_key`` and keel's ``/v1`` as its ``base_url``.

A response is a keel task (``resp_X`` is task ``tsk_X``): ``model`` is a model spec answered by the ``respond``
workflow, or ``keel:<workflow>`` to run that workflow. Submission goes through :meth:`keel.service.Keel.submit`
like every other edge (validation before anything is stored, ``Idempotency-Key``, the tool policy), so a response is
durable, listed by ``GET /v1/tasks``, cancellable, and its stream resumable from the durable event log for as long
as keel keeps it. The mapping itself is :mod:`keel.interaction.openai_stream`'s; errors are RFC 9457 problems with
the status codes the SDK maps onto its exception types (401, 403, 404, 409, 422).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from keel.errors import InputError, NotFound
from keel.interaction.auth import Reader, Writer
from keel.interaction.deps import App, errors, new_session, problem
from keel.interaction.openai_schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatKeel,
    ChatMessageOut,
    ChatUsage,
    CreateResponse,
    DeletedResponse,
    FormatJsonObject,
    FormatJsonSchema,
    FunctionToolRef,
    InputMessage,
    ModelCard,
    ModelList,
    ResponseObject,
)
from keel.interaction.openai_stream import (
    ChunkEncoder,
    chat_id,
    numbered,
    response_id_of,
    response_of,
    streamed_text,
    streams_answer,
    task_id_of,
)
from keel.interaction.problems import problem as problem_response
from keel.interaction.routes import IdempotencyKey, submit_task
from keel.interaction.schemas import Envelope, SubmitTask
from keel.interaction.sse import MAX_EVENT_ID, event_id
from keel.interaction.wire_json import render
from keel.memory.types import ApiKey, Task, TaskStatus
from keel.service import Keel

router = APIRouter(prefix="/v1", tags=["openai"])

SYNC_WAIT_S = 300.0
"""How long a request that is neither ``background`` nor ``stream`` waits for its answer; past it, the response
comes back as it is (``in_progress``) and the client polls it."""
CANCEL_WAIT_S = 10.0
"""How long ``cancel`` waits for a running task to stop, so that it answers ``cancelled`` with the partial output."""
WORKFLOW_PREFIX = "keel:"

UNPROCESSABLE = problem("An invalid body (with JSON pointers): nothing was stored, no model was called.")


async def _task(keel: Keel, tenant: str, resp_id: str) -> Task:
    task_id = task_id_of(resp_id)
    if task_id is None:
        raise NotFound(f"no response {resp_id}")
    try:
        return await keel.get(tenant, task_id)
    except NotFound:
        raise NotFound(f"no response {resp_id}") from None


async def _response(keel: Keel, task: Task) -> ResponseObject:
    """The task as a Response; a stopped answer keeps the text it had streamed."""
    if task.status.terminal and streams_answer(task) and not ((task.envelope or {}).get("result")):
        return response_of(task, await streamed_text(task, keel.events(task.id)))
    return response_of(task)


def _sse(events: AsyncIterator[dict[str, Any]], keel: Keel, headers: dict[str, str]) -> EventSourceResponse:
    async def frames() -> AsyncIterator[ServerSentEvent]:
        async for ev in events:
            yield ServerSentEvent(id=str(ev["sequence_number"]), event=ev["type"], data=json.dumps(ev))

    return EventSourceResponse(frames(), headers=headers, ping=keel.settings.sse_heartbeat_s, send_timeout=30)


def _stream(keel: Keel, task: Task, after: int = -1) -> EventSourceResponse:
    """The response's events after sequence number ``after``, from the task's log walked from its start."""
    headers = {"X-Keel-Task-Id": task.id, "Location": f"/v1/responses/{response_id_of(task.id)}"}
    return _sse(numbered(task, keel.events(task.id), after), keel, headers)


# -- POST /v1/responses ------------------------------------------------------------------------------------------


def _tool_names(body: CreateResponse) -> list[str] | None:
    if body.tools is None or body.tool_choice == "none":
        return None
    return [t.name if isinstance(t, FunctionToolRef) else t for t in body.tools]


def _workflow_input(body: CreateResponse) -> dict[str, Any]:
    """A ``keel:<workflow>``'s input: ``input`` as a JSON object, or a JSON object in its text, or in
    ``metadata.input``."""
    if isinstance(body.input, dict):
        return body.input
    texts = [body.input] if isinstance(body.input, str) else [m.text() for m in body.input if m.role == "user"][-1:]
    texts += [body.metadata["input"]] if body.metadata and "input" in body.metadata else []
    for text in texts:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise InputError(
        "a keel workflow's input is a JSON object: give it as `input`, as a message's text, or as `metadata.input`",
        detail={"errors": [{"pointer": "/input", "message": "expected a JSON object"}]},
    )


def _messages(body: CreateResponse) -> list[dict[str, str]]:
    if isinstance(body.input, dict):
        raise InputError(
            "`input` is a string or message items (a JSON object is the input of a `keel:<workflow>` model)",
            detail={"errors": [{"pointer": "/input", "message": "expected a string or a list of messages"}]},
        )
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not items:
        raise InputError("`input` holds no message", detail={"errors": [{"pointer": "/input", "message": "empty"}]})
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in items]


async def _previous_session(keel: Keel, tenant: str, previous: str) -> str:
    task = await _task(keel, tenant, previous)
    session = task.input.get("session") if task.workflow == "respond" else None
    if not isinstance(session, str):
        raise InputError(
            f"response {previous} holds no conversation to continue",
            detail={"errors": [{"pointer": "/previous_response_id", "message": "not a conversation's response"}]},
        )
    return session


async def _submission(keel: Keel, key: ApiKey, body: CreateResponse, idempotency_key: str | None) -> SubmitTask:
    echo: dict[str, Any] = {
        "model": body.model or keel.settings.default_model,
        "background": body.background,
        "instructions": body.instructions,
        "metadata": body.metadata or {},
        "previous_response_id": body.previous_response_id,
        "text": body.text.model_dump(mode="json", by_alias=True) if body.text else None,
        "tools": _tool_names(body),
        "temperature": body.temperature,
        "max_output_tokens": body.max_output_tokens,
    }
    metadata = {"via": "responses", "openai": echo}
    tools = _tool_names(body)
    if body.model and body.model.startswith(WORKFLOW_PREFIX):
        if body.previous_response_id or body.text or body.instructions:
            raise InputError(
                "`previous_response_id`, `text` and `instructions` apply to a model, not to a keel workflow",
                detail={"errors": [{"pointer": "/model", "message": "a keel workflow takes its own input"}]},
            )
        workflow = body.model.removeprefix(WORKFLOW_PREFIX)
        return SubmitTask(workflow=workflow, input=_workflow_input(body), metadata=metadata, tools=tools)
    if body.previous_response_id:
        session = await _previous_session(keel, key.tenant, body.previous_response_id)
    else:
        session = new_session(key.tenant, idempotency_key)
    fmt = body.text.format if body.text else None
    schema = (
        fmt.json_schema
        if isinstance(fmt, FormatJsonSchema)
        else {"type": "object"}
        if isinstance(fmt, FormatJsonObject)
        else None
    )
    inp = {
        "messages": _messages(body),
        "instructions": body.instructions,
        "model": body.model,
        "max_output_tokens": body.max_output_tokens or 1024,
        "temperature": body.temperature,
        "session": session,
        "output_schema": schema,
        "use_tools": bool(tools),
    }
    return SubmitTask(workflow="respond", input=inp, metadata=metadata, tools=tools)


@router.post(
    "/responses",
    operation_id="createResponse",
    response_model=ResponseObject,
    responses={
        200: {
            "description": "The Response: `queued` at once with `background`, else once done (or `in_progress` "
            "after 300 s: poll it). With `stream`: `text/event-stream` of Responses events, each with a "
            "`sequence_number` (resume with `GET /v1/responses/{id}?stream=true&starting_after=N`).",
            "content": {"text/event-stream": {}},
        },
        **errors("No such `previous_response_id`"),
        409: problem("A request with this Idempotency-Key is still in flight"),
        422: UNPROCESSABLE,
    },
    summary="Create a response (OpenAI Responses API)",
)
async def create_response(
    body: CreateResponse, keel: App, key: Writer, idempotency_key: IdempotencyKey = None
) -> Response:
    """Run a model (or, with `model: keel:<workflow>`, a keel workflow) as a durable keel task. keel's envelope
    is in the `keel` field; keel's own events stream as `keel.event`."""
    submit = await _submission(keel, key, body, idempotency_key)
    task = (await submit_task(keel, key, submit, idempotency_key)).task
    if body.stream:
        return _stream(keel, task)
    if not body.background:
        task = await keel.wait(task, wait_s=SYNC_WAIT_S, tenant=key.tenant)
    return render(await _response(keel, task))


# -- GET, cancel, DELETE ---------------------------------------------------------------------------------------------


@router.get(
    "/responses/{response_id}",
    operation_id="getResponse",
    response_model=ResponseObject,
    responses={
        200: {
            "description": "The Response; with `stream=true`, its events after `starting_after` (SSE).",
            "content": {"text/event-stream": {}},
        },
        **errors("No such response for this tenant"),
        422: UNPROCESSABLE,
    },
    summary="Retrieve a response, or resume its stream",
)
async def get_response(
    response_id: str,
    keel: App,
    key: Reader,
    stream: Annotated[bool, Query(description="Stream the response's events (SSE).")] = False,
    starting_after: Annotated[
        int | None, Query(ge=-1, le=MAX_EVENT_ID, description="With `stream`: the events after this sequence number.")
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> Response:
    """Any keel task is readable as a Response. The stream is resumable with no gap and no duplicate for as long
    as keel keeps the task's events (`starting_after`, or `Last-Event-ID`)."""
    task = await _task(keel, key.tenant, response_id)
    if not stream:
        return render(await _response(keel, task))
    after = starting_after if starting_after is not None else -1
    if starting_after is None and last_event_id:
        after = event_id(last_event_id)
    return _stream(keel, task, after)


@router.post(
    "/responses/{response_id}/cancel",
    operation_id="cancelResponse",
    response_model=ResponseObject,
    responses=errors("No such response for this tenant"),
    summary="Cancel a response",
)
async def cancel_response(response_id: str, keel: App, key: Writer) -> ResponseObject:
    """Idempotent. A running response stops and keeps its partial output (`cancelled`); a finished one is
    returned as it is."""
    task = await _task(keel, key.tenant, response_id)
    task = await keel.cancel(key.tenant, task.id)
    task = await keel.wait(task, wait_s=CANCEL_WAIT_S, tenant=key.tenant)
    return await _response(keel, task)


@router.delete(
    "/responses/{response_id}",
    operation_id="deleteResponse",
    response_model=DeletedResponse,
    responses={
        **errors("No such response for this tenant"),
        409: problem("The response has not ended: cancel it first"),
    },
    summary="Delete a response",
)
async def delete_response(response_id: str, keel: App, key: Writer) -> DeletedResponse:
    """Forget an ended response: its task, event log, steps, state and effect rows (a webhook or email it already
    queued is still delivered). A response still running is a 409: cancel it, then delete it."""
    task = await _task(keel, key.tenant, response_id)
    await keel.delete(key.tenant, task.id)
    return DeletedResponse(id=response_id)


# -- POST /v1/chat/completions ---------------------------------------------------------------------------------------


def _chat_submission(body: ChatCompletionRequest) -> SubmitTask:
    fmt = body.response_format
    schema = None
    if fmt is not None and fmt.type == "json_object":
        schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InputError(
                "`response_format.json_schema` is required with type json_schema",
                detail={"errors": [{"pointer": "/response_format/json_schema", "message": "required"}]},
            )
        schema = fmt.json_schema.json_schema
    inp = {
        "messages": [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
        ],
        "model": body.model,
        "max_output_tokens": body.max_completion_tokens or body.max_tokens or 1024,
        "temperature": body.temperature,
        "session": body.session,
        "output_schema": schema,
    }
    metadata = {"via": "chat.completions", "openai": {"model": body.model, "metadata": body.metadata or {}}}
    return SubmitTask(workflow="respond", input=inp, metadata=metadata)


def _completion(task: Task, model: str, session: str | None) -> ChatCompletion:
    envelope = task.envelope or {}
    result = envelope.get("result") or {}
    tokens = (envelope.get("metadata") or {}).get("tokens") or {}
    return ChatCompletion(
        id=chat_id(task.id),
        created=int(task.created_at),
        model=model,
        choices=[ChatChoice(message=ChatMessageOut(content=str(result.get("answer", ""))))],
        usage=ChatUsage(
            prompt_tokens=int(tokens.get("input", 0)),
            completion_tokens=int(tokens.get("output", 0)),
            total_tokens=int(tokens.get("total", 0)),
        ),
        keel=ChatKeel(task_id=task.id, session=session, envelope=Envelope.model_validate(envelope)),
    )


@router.post(
    "/chat/completions",
    operation_id="createChatCompletion",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "The completion; with `stream`, `text/event-stream` of `chat.completion.chunk`s ending "
            "with `data: [DONE]`.",
            "content": {"text/event-stream": {}},
        },
        **errors(),
        409: problem("A request with this Idempotency-Key is still in flight"),
        422: UNPROCESSABLE,
        502: problem("The model failed to answer (the envelope's errors are in `context`)"),
        504: problem("No answer within 300 s; the task goes on (`context.task_id`)"),
    },
    summary="Create a chat completion (OpenAI Chat Completions)",
)
async def create_chat_completion(
    body: ChatCompletionRequest, keel: App, key: Writer, idempotency_key: IdempotencyKey = None
) -> Response:
    """One `respond` task over the messages (with keel's session memory when `session` is given). Streamed, the
    answer's tokens come as chunks; the task's events stay resumable at `GET /v1/tasks/{id}/events`."""
    task = (await submit_task(keel, key, _chat_submission(body), idempotency_key)).task
    model = body.model or keel.settings.default_model
    headers = {"X-Keel-Task-Id": task.id, **({"X-Keel-Session": body.session} if body.session else {})}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventSourceResponse(
            _chunks(keel, task, model, include_usage),
            headers=headers,
            ping=keel.settings.sse_heartbeat_s,
            send_timeout=30,
        )
    task = await keel.wait(task, wait_s=SYNC_WAIT_S, tenant=key.tenant)
    if not task.status.terminal:
        return problem_response(
            504,
            "Gateway Timeout",
            "no answer in time; the task goes on",
            type="urn:keel:problem:timeout",
            headers=headers,
            extensions={"task_id": task.id},
        )
    if task.status not in (TaskStatus.succeeded, TaskStatus.partial_success):
        errs = (task.envelope or {}).get("errors") or []
        return problem_response(
            502,
            "Bad Gateway",
            errs[0]["message"] if errs else "the task failed",
            type="urn:keel:problem:task_failed",
            headers=headers,
            extensions={"task_id": task.id, "task_status": task.status.value, "task_errors": errs},
        )
    done = _completion(task, model, body.session)
    return render(done, headers=headers)


async def _chunks(keel: Keel, task: Task, model: str, include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    encoder = ChunkEncoder(task, model, include_usage=include_usage)
    async for event in keel.events(task.id):
        for chunk in encoder.feed(event):
            yield ServerSentEvent(data=json.dumps(chunk))
            if "error" in chunk:
                return
    yield ServerSentEvent(data="[DONE]")


# -- GET /v1/models --------------------------------------------------------------------------------------------------


def _models(keel: Keel) -> list[ModelCard]:
    default = ModelCard(id=keel.settings.default_model, description="The server's default model (KEEL_DEFAULT_MODEL)")
    flows = [ModelCard(id=WORKFLOW_PREFIX + wf.name, description=wf.description or None) for wf in keel.workflows()]
    return [default, *flows]


@router.get("/models", operation_id="listModels", response_model=ModelList, responses=errors(), summary="List models")
async def list_models(keel: App, key: Reader) -> ModelList:
    """The default model and every keel workflow as `keel:<name>`. Any model spec keel accepts may also be used
    as `model`, listed or not."""
    return ModelList(data=_models(keel))


@router.get(
    "/models/{model_id:path}",
    operation_id="retrieveModel",
    response_model=ModelCard,
    responses=errors("No such model"),
    summary="Retrieve a model",
)
async def retrieve_model(model_id: str, keel: App, key: Reader) -> ModelCard:
    for card in _models(keel):
        if card.id == model_id:
            return card
    raise NotFound(f"no model {model_id!r} is listed")
