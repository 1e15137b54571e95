"""The endpoint families: chat, agent, reason, function-call and stream.

Each is a thin, documented shape over the task API: the request becomes a task of a workflow (``ask``, ``agent``,
``reason``, ``function_call``) through the same :meth:`keel.service.Keel.submit` as ``POST /v1/tasks``
(validation before anything is stored, ``Idempotency-Key``, tool policy), so every call is durable, listed by
``GET /v1/tasks`` and answered with the envelope. A synchronous answer only waits for the task
(:meth:`~keel.service.Keel.wait`): when it is not done within ``wait_s`` the caller gets the 202 handle, and nothing
that was accepted is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Body, Depends, Response
from fastapi.responses import JSONResponse
from fastapi.types import DecoratedCallable
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keel.errors import InputError
from keel.interaction.auth import Writer
from keel.interaction.deps import App, errors, new_session, problem
from keel.interaction.openapi import EventStream, event_stream
from keel.interaction.routes import IdempotencyKey, submit_task, submitted_headers
from keel.interaction.schemas import (
    BudgetSpec,
    Envelope,
    Links,
    RequestBody,
    SubmitTask,
    TaskAccepted,
    WebhookSpec,
    accepted,
    links,
)
from keel.interaction.sse import event_response
from keel.memory.types import ApiKey, TaskStatus
from keel.orchestration.workflows.endpoints import ChatMessage, check_output_schema
from keel.service import Keel

router = APIRouter(prefix="/v1", tags=["endpoints"])

SESSION_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
ModelSpec = Annotated[
    str | None,
    Field(max_length=500, description="A model spec (e.g. `openai:gpt-4o-mini-2024-07-18`); the server's default."),
]
WaitS = Annotated[
    float,
    Field(
        ge=0,
        le=120,
        description="Seconds to wait for the answer. Done in time: 200 with the envelope; not: 202 with the task "
        "handle (the task goes on; poll it, stream it, or wait for its webhook).",
    ),
]


# -- wire schemas -------------------------------------------------------------------------------------------------


class ChatRequest(RequestBody):
    """Body of `POST /v1/chat`."""

    model_config = ConfigDict(extra="forbid")
    message: str = Field(min_length=1, max_length=20_000, description="The user's message.")
    session: str | None = Field(
        None,
        pattern=SESSION_PATTERN,
        description="A session id: its last turns go along as context and this turn joins it. Omitted: a new "
        "session is started (`ses_…`, returned in the body and in `X-Keel-Session`).",
    )
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    model: ModelSpec = None
    max_tokens: int = Field(256, ge=1, le=8192, description="Cap on the answer's length, in tokens.")
    history_turns: int = Field(20, ge=0, le=200, description="How many earlier turns of the session to send.")
    stream: bool = Field(
        False, description="Answer `text/event-stream`: the task's events (`token`s, then `end` with the envelope)."
    )
    wait_s: WaitS = 30


class AgentRequest(RequestBody):
    """Body of `POST /v1/agent`."""

    model_config = ConfigDict(extra="forbid")
    goal: str = Field(min_length=1, max_length=20_000, description="What the agent should achieve.")
    tools: list[str] | None = Field(
        None,
        max_length=200,
        description="Allowlist of tools the agent may call (see `GET /v1/tools`); all the key may use when omitted.",
    )
    max_turns: int = Field(8, ge=1, le=50, description="Model turns at most; past them the task fails (`max_turns`).")
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    model: ModelSpec = None
    webhook: WebhookSpec | None = None
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Step, tool, token, cost and time caps.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Opaque to keel; returned as given.")
    approval: Literal["auto", "always"] = Field(
        "auto",
        description="`auto`: a write tool needs a person's approval once the task has read untrusted content; "
        "`always`: every write does.",
    )


class ReasonRequest(RequestBody):
    """Body of `POST /v1/reason`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=20_000, description="The question or instruction.")
    output_schema: dict[str, Any] = Field(
        alias="schema",
        description="The JSON Schema the answer must satisfy: a valid schema, at most 32 KiB and 32 levels deep, "
        "`$ref`s only inside it. Checked before any task is created.",
    )
    context: str | None = Field(None, max_length=200_000, description="Material to reason over, sent as is.")
    model: ModelSpec = None
    repairs: int = Field(1, ge=0, le=3, description="Re-asks, with the violations listed, before giving up.")
    max_tokens: int = Field(1024, ge=1, le=8192, description="Cap on each answer's length, in tokens.")
    wait_s: WaitS = 30

    @field_validator("output_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_output_schema(v)


class FunctionCallRequest(RequestBody):
    """Body of `POST /v1/function-call`: `prompt` or `messages`, not both."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, min_length=1, max_length=20_000, description="A single user message.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=200, description="A conversation, instead of `prompt`."
    )
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    tools: list[str] | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The tools offered to the model (see `GET /v1/tools`); all the key may use when omitted.",
    )
    execute: bool = Field(
        False,
        description="Run the valid calls through the effect ledger and the approval rules, and attach their "
        "results; a call that needs a person's approval parks the task (202).",
    )
    approval: Literal["auto", "always"] = Field("auto", description="As for `POST /v1/tasks`.")
    model: ModelSpec = None
    wait_s: WaitS = 30

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class StreamRequest(RequestBody):
    """Body of `POST /v1/stream`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=20_000, description="What to ask.")
    system: str | None = Field(None, max_length=20_000, description="An optional system prompt.")
    model: ModelSpec = None
    max_tokens: int = Field(256, ge=1, le=8192, description="Cap on the answer's length, in tokens.")


class TaskResult(BaseModel):
    """A synchronous answer: the finished task and its envelope."""

    task_id: str
    status: TaskStatus = Field(description="The task's terminal status.")
    links: Links
    envelope: Envelope = Field(description="`status` says whether `result` is usable; `errors[]` says what is not.")


class ChatResult(TaskResult):
    session: str = Field(description="The session this turn joined; send it with the next message.")


class ChatAccepted(TaskAccepted):
    session: str


# -- helpers ------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Caller:
    """Who calls an endpoint, with which ``Idempotency-Key``: what every endpoint family submits its task with,
    and how it answers."""

    keel: Keel
    key: ApiKey
    idempotency_key: str | None

    async def run(
        self, body: SubmitTask, *, wait_s: float | None = None, stream: bool = False, session: str | None = None
    ) -> Response:
        """Submit ``body`` as a task, then answer: its events as SSE from the first one (``stream``); 202 with its
        handle at once (``wait_s`` None); or 200 with the envelope when it is done within ``wait_s``, else 202.
        A ``session`` goes along in ``X-Keel-Session`` and in the body."""
        submitted = await submit_task(self.keel, self.key, body, self.idempotency_key)
        task, headers = submitted.task, submitted_headers(submitted)
        extra = {} if session is None else {"session": session}
        if session is not None:
            headers["X-Keel-Session"] = session
        if stream:
            return event_response(self.keel, task.id, 0, {**headers, "X-Keel-Task-Id": task.id})
        if wait_s is not None:
            task = await self.keel.wait(task, wait_s=wait_s, tenant=self.key.tenant)
            if task.status.terminal and task.envelope is not None:
                done = TaskResult(
                    task_id=task.id,
                    status=task.status,
                    links=links(task.id),
                    envelope=Envelope.model_validate(task.envelope),
                )
                return JSONResponse({**done.model_dump(mode="json"), **extra}, status_code=200, headers=headers)
            headers["Retry-After"] = "30" if task.status is TaskStatus.waiting_for_approval else "1"
        return JSONResponse({**accepted(task).model_dump(mode="json"), **extra}, status_code=202, headers=headers)


async def _caller(keel: App, key: Writer, idempotency_key: IdempotencyKey = None) -> Caller:
    return Caller(keel=keel, key=key, idempotency_key=idempotency_key)


Call = Annotated[Caller, Depends(_caller)]


def _responses(ok: dict[str, Any], *, sync: bool = True, sse: bool = False) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        200: ok,
        202: {
            "model": TaskAccepted,
            "description": "Accepted as a task (not finished within `wait_s`, or waiting for a person's approval): "
            "poll `Location`, stream its events, or wait for the webhook.",
        },
        **errors(),
        409: problem("A request with this Idempotency-Key is still in flight"),
        413: problem("Body too large"),
        422: problem(
            "Malformed JSON, an invalid body (with JSON pointers), or an Idempotency-Key reused "
            "with a different body. Nothing was stored."
        ),
    }
    if not sync:
        del out[200]
        out[202] = {
            "model": TaskAccepted,
            "description": "Accepted as a durable task: poll `Location`, stream its events, or wait for the webhook.",
        }
    if sse:
        del out[202]
    return out


def _answering(
    path: str, *, summary: str, ok: str, operation_id: str
) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A synchronous endpoint's route: 200 with the task's envelope when it is done within `wait_s`, else 202."""
    return router.post(
        path,
        response_model=TaskResult,
        responses=_responses({"description": ok}),
        summary=summary,
        operation_id=operation_id,
    )


SSE_OK = event_stream(
    "Server-sent events from the task's durable log: `token` events as the model writes, then `end` with the "
    "envelope. `id:` is the event's sequence number; after a dropped connection resume with "
    "`GET /v1/tasks/{id}/events` and `Last-Event-ID`. Headers: `Location` and `X-Keel-Task-Id`.",
    'id: 3\nevent: step_started\ndata: {"step": "answer", "kind": "model", "attempt": 1}\n\n'
    'id: 4\nevent: token\ndata: {"step": "answer", "text": "Hi"}\n\n'
    'id: 7\nevent: end\ndata: {"status": "succeeded", "envelope": {"status": "success", '
    '"result": {"answer": "Hi there."}, "errors": [], "metadata": {}}}\n\n',
)


# -- chat ---------------------------------------------------------------------------------------------------------

CHAT_EXAMPLES: dict[str, Any] = {
    "new": {"summary": "Start a conversation", "value": {"message": "What is an idempotency key?"}},
    "follow-up": {
        "summary": "Continue a session",
        "value": {"message": "And how long are they kept?", "session": "ses_3f9a1c0b7d2e4a6f8b1c2d3e"},
    },
    "streamed": {
        "summary": "Stream the answer (SSE)",
        "value": {"message": "Explain SSE in one paragraph.", "stream": True, "max_tokens": 200},
    },
}


@router.post(
    "/chat",
    response_model=ChatResult,
    responses={
        **_responses(
            {
                "description": "The answer (`envelope.result.answer`) with its session; or, with `stream: true`, "
                "`text/event-stream` (see `POST /v1/stream`).",
                "content": SSE_OK["content"],
            }
        ),
        202: {"model": ChatAccepted, "description": "Not done within `wait_s`: the task handle and the session."},
    },
    summary="Chat with session memory",
    operation_id="chat",
)
async def chat(
    body: Annotated[ChatRequest, Body(openapi_examples=CHAT_EXAMPLES)],
    call: Call,
) -> Response:
    """One conversational turn, run as a durable `ask` task. The session's last `history_turns` turns go along as
    context and the new question and answer join it (its TTL slides). Without `session` a new one is started.

    Not streamed: 200 with `{task_id, status, links, envelope, session}` when the answer is ready within `wait_s`,
    else 202 with the handle (`Location: /v1/tasks/{id}`). Streamed: `text/event-stream` relaying the task's
    events, with `Location` and `X-Keel-Task-Id` for resumption. Every answer carries `X-Keel-Session`."""
    session = body.session or new_session(call.key.tenant, call.idempotency_key)
    ask = {
        "question": body.message,
        "system": body.system,
        "max_tokens": body.max_tokens,
        "model": body.model,
        "session": session,
        "history_turns": body.history_turns,
    }
    submit = SubmitTask(workflow="ask", input=ask, metadata={"via": "chat", "session": session})
    return await call.run(submit, wait_s=body.wait_s, stream=body.stream, session=session)


# -- agent --------------------------------------------------------------------------------------------------------

AGENT_EXAMPLES: dict[str, Any] = {
    "research": {
        "summary": "A goal with two tools",
        "value": {"goal": "Summarise the quarterly report and list its risks.", "tools": ["read_document"]},
    },
    "with-writes": {
        "summary": "Writes under approval, with a webhook and a budget",
        "value": {
            "goal": "Email the summary of report.txt to ops@example.com.",
            "tools": ["read_document", "send_email"],
            "max_turns": 6,
            "approval": "always",
            "budget": {"max_tool_calls": 5, "max_cost_usd": 0.25},
            "webhook": {"url": "https://hooks.example.com/keel", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        },
    },
}


@router.post(
    "/agent",
    status_code=202,
    response_model=TaskAccepted,
    responses=_responses({}, sync=False),
    summary="Run a tool-using agent",
    operation_id="runAgent",
)
async def run(
    body: Annotated[AgentRequest, Body(openapi_examples=AGENT_EXAMPLES)],
    call: Call,
) -> Response:
    """Start an `agent` task: the model pursues `goal`, calling the allowed tools, for at most `max_turns` turns.
    Always 202 with the handle. Every turn and tool call is a durable step; a write tool keeps the effect ledger
    and the approval rules (the task parks as `waiting_for_approval`). The envelope's result is
    `{answer, turns, tool_calls}`."""
    goal = {"goal": body.goal, "max_turns": body.max_turns, "system": body.system, "model": body.model}
    submit = SubmitTask(
        workflow="agent",
        input=goal,
        webhook=body.webhook,
        budget=body.budget,
        metadata=body.metadata,
        tools=body.tools,
        approval=body.approval,
    )
    return await call.run(submit)


# -- reason -------------------------------------------------------------------------------------------------------

REASON_EXAMPLES: dict[str, Any] = {
    "classify": {
        "summary": "Classify a ticket",
        "value": {
            "prompt": "Classify this support ticket.",
            "context": "My invoice was charged twice this month.",
            "schema": {
                "type": "object",
                "properties": {
                    "category": {"enum": ["billing", "bug", "question"]},
                    "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
                },
                "required": ["category", "urgency"],
                "additionalProperties": False,
            },
            "repairs": 2,
        },
    }
}


@_answering(
    "/reason",
    summary="Structured reasoning against a JSON Schema",
    operation_id="reason",
    ok="Done within `wait_s`: `envelope.result` is the JSON answer. `success`: it satisfies the schema; "
    "`partial_success`: the best answer, with one `schema_violation` error (and its `pointer` into the result) per "
    "violation; `failed` with `invalid_json`: no answer was JSON.",
)
async def reason(
    body: Annotated[ReasonRequest, Body(openapi_examples=REASON_EXAMPLES)],
    call: Call,
) -> Response:
    """Ask for JSON that satisfies `schema`, validate it, and re-ask with the violations listed up to `repairs`
    times (each a durable step). An invalid schema is a 422 before any task exists or any model is called."""
    inp = {
        "prompt": body.prompt,
        "schema": body.output_schema,
        "context": body.context,
        "model": body.model,
        "repairs": body.repairs,
        "max_tokens": body.max_tokens,
    }
    submit = SubmitTask(workflow="reason", input=inp, metadata={"via": "reason"})
    return await call.run(submit, wait_s=body.wait_s)


# -- function-call ------------------------------------------------------------------------------------------------

FUNCTION_CALL_EXAMPLES: dict[str, Any] = {
    "plan-only": {
        "summary": "Which calls would the model make?",
        "value": {"prompt": "Find what our documents say about churn.", "tools": ["search_memory"]},
    },
    "execute": {
        "summary": "Make and run the calls",
        "value": {
            "messages": [
                {"role": "system", "content": "You file tickets."},
                {"role": "user", "content": "Read report.txt"},
            ],
            "tools": ["read_document"],
            "execute": True,
        },
    },
}


@_answering(
    "/function-call",
    summary="Tool calls from a model, checked (and optionally run)",
    operation_id="functionCall",
    ok="Done within `wait_s`: `envelope.result` is `{calls: [{id, tool, arguments, valid, problems?, ok?, result?, "
    "error?}], text, executed}`. Invalid calls are never run; each problem is also an envelope error with a "
    "`pointer` into `result`.",
)
async def function_call(
    body: Annotated[FunctionCallRequest, Body(openapi_examples=FUNCTION_CALL_EXAMPLES)],
    call: Call,
) -> Response:
    """One model turn offered the tools. Each call it asks for is checked against its tool's schema. Without
    `execute` nothing runs; with it, each valid call runs through the effect ledger and the approval rules (a
    write after untrusted content, or with `approval: always`, parks the task for a person: 202)."""
    if body.tools is None and not call.keel.tools_for(call.key):
        raise InputError(
            "no tool is available to this API key",
            detail={"errors": [{"pointer": "/tools", "message": "the key holds no scope any tool needs"}]},
        )
    inp = {
        "prompt": body.prompt,
        "messages": [m.model_dump() for m in body.messages] if body.messages is not None else None,
        "system": body.system,
        "execute": body.execute,
        "model": body.model,
    }
    submit = SubmitTask(
        workflow="function_call",
        input=inp,
        tools=body.tools,
        approval=body.approval,
        metadata={"via": "function-call"},
    )
    return await call.run(submit, wait_s=body.wait_s)


# -- stream -------------------------------------------------------------------------------------------------------

STREAM_EXAMPLES: dict[str, Any] = {
    "ask": {"summary": "Stream an answer", "value": {"prompt": "Write a haiku about durable logs.", "max_tokens": 64}}
}


@router.post(
    "/stream",
    responses=_responses(SSE_OK, sse=True),
    response_class=EventStream,
    summary="Stream a model's answer (SSE)",
    operation_id="streamAnswer",
)
async def stream(
    body: Annotated[StreamRequest, Body(openapi_examples=STREAM_EXAMPLES)],
    call: Call,
) -> Response:
    """Start an `ask` task and relay its events as server-sent events: `token`s as they come, then `end` with
    the envelope (`envelope.result.answer`). The task is durable: if the connection drops, resume at
    `GET /v1/tasks/{id}/events` with `Last-Event-ID`, or poll `GET /v1/tasks/{id}`."""
    ask = {"question": body.prompt, "system": body.system, "model": body.model, "max_tokens": body.max_tokens}
    submit = SubmitTask(workflow="ask", input=ask, metadata={"via": "stream"})
    return await call.run(submit, stream=True)
