"""Pure mapping of keel tasks and their event logs onto OpenAI's wire objects: a task as a Response
(:func:`response_of`), its durable event log as Responses stream events (:class:`ResponseEncoder`) and as Chat
Completions chunks (:class:`ChunkEncoder`). No I/O: events in, objects out, testable without a server.

**Sequence numbers are a pure function of the log.** The encoder walks the task's log from its first event and
numbers what it emits 0, 1, 2, …; one keel event may become several OpenAI events (the ``end`` event closes the
message item and ends the response). A stream resumed ``starting_after=N`` walks the same log again and drops
everything numbered N or lower, so it has no gap and no duplicate, for as long as keel keeps the task's events.

**One rule per mapping.** A task's status maps onto a response status by :data:`STATUS`; its answer's text is the
``token`` events of the ``respond`` workflow's answer step while it runs (:func:`answer_delta`) and its envelope's
``result.answer`` (or the whole result, as JSON) once it is done (:func:`final_text`); keel's other events travel
as ``keel.event``, an extension event type the SDK passes through.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from keel.interaction.openai_schemas import (
    IncompleteDetails,
    KeelExtension,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
)
from keel.interaction.schemas import Envelope, links
from keel.memory.types import Event, Task, TaskStatus
from keel.orchestration.workflows.respond import ANSWER_STEP

__all__ = [
    "STATUS",
    "ChunkEncoder",
    "ResponseEncoder",
    "answer_delta",
    "final_text",
    "numbered",
    "response_id_of",
    "response_of",
    "task_id_of",
]

STATUS: dict[TaskStatus, ResponseStatus] = {
    TaskStatus.queued: "queued",
    TaskStatus.running: "in_progress",
    TaskStatus.waiting_for_approval: "in_progress",
    TaskStatus.succeeded: "completed",
    TaskStatus.partial_success: "incomplete",
    TaskStatus.needs_clarification: "incomplete",
    TaskStatus.failed: "failed",
    TaskStatus.cancelled: "cancelled",
}
TERMINAL_EVENT: dict[ResponseStatus, str] = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.cancelled",  # OpenAI defines none; keel's, like the status it reports
}
_TASK, _RESP = "tsk_", "resp_"


def response_id_of(task_id: str) -> str:
    """``tsk_…`` ↔ ``resp_…``: the same id, so a response is found without a lookup table."""
    return _RESP + task_id.removeprefix(_TASK)


def task_id_of(resp_id: str) -> str | None:
    """The task behind a response id, or None for an id keel never issued."""
    if not resp_id.startswith(_RESP) or len(resp_id) > 200:
        return None
    return _TASK + resp_id.removeprefix(_RESP)


def _message_id(task: Task) -> str:
    return "msg_" + task.id.removeprefix(_TASK)


def streams_answer(task: Task) -> bool:
    """Whether the task's answer streams as ``token`` events of one step (``respond`` without tools)."""
    return task.workflow == "respond" and not task.input.get("use_tools")


def answer_delta(task: Task, event: Event) -> str | None:
    """The piece of the answer's text this event carries, or None when it carries none."""
    if event.type == "token" and streams_answer(task) and event.data.get("step") == ANSWER_STEP:
        text = event.data.get("text")
        return text if isinstance(text, str) else None
    return None


def final_text(envelope: dict[str, Any] | None, streamed: str) -> str:
    """The response's text once the task is done: the result's ``answer``, else the whole result as JSON, else
    (a cancelled or failed answer) what was streamed before it stopped."""
    result = (envelope or {}).get("result")
    if isinstance(result, dict) and isinstance(result.get("answer"), str):
        return str(result["answer"])
    if result is not None:
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return streamed


def _request(task: Task) -> dict[str, Any]:
    """What the creating request said (echoed on the Response); empty for a task submitted another way."""
    echo = task.metadata.get("openai")
    return echo if isinstance(echo, dict) else {}


def response_of(task: Task, streamed: str = "") -> ResponseObject:
    """The task as an OpenAI Response. ``streamed``: the answer's text read from the log so far (what a cancelled
    or failed answer keeps)."""
    echo = _request(task)
    status = STATUS[task.status]
    envelope = task.envelope if task.status.terminal else None
    text = final_text(envelope, streamed) if envelope is not None else streamed
    output: list[OutputMessage] = []
    if text:
        item_status = {"completed": "completed", "queued": "in_progress", "in_progress": "in_progress"}
        output.append(
            OutputMessage(
                id=_message_id(task),
                status=item_status.get(status, "incomplete"),
                content=[OutputText(text=text)],
            )
        )
    error = incomplete = usage = None
    if envelope is not None:
        tokens = (envelope.get("metadata") or {}).get("tokens") or {}
        usage = ResponseUsage(
            input_tokens=int(tokens.get("input", 0)),
            output_tokens=int(tokens.get("output", 0)),
            total_tokens=int(tokens.get("total", 0)),
        )
        errors = envelope.get("errors") or []
        worst = next((e for e in errors if e.get("severity") == "error"), errors[0] if errors else None)
        if status == "failed":
            error = ResponseError(
                code=str((worst or {}).get("type", "failed")), message=str((worst or {}).get("message", ""))
            )
        elif status == "incomplete":
            incomplete = IncompleteDetails(reason=task.status.value)
    elif task.status is TaskStatus.waiting_for_approval:
        incomplete = IncompleteDetails(reason=task.status.value)
    return ResponseObject(
        id=response_id_of(task.id),
        created_at=int(task.created_at),
        completed_at=int(task.finished_at) if task.finished_at is not None and task.status.terminal else None,
        status=status,
        background=bool(echo.get("background", False)),
        model=str(echo.get("model") or f"keel:{task.workflow}"),
        instructions=echo.get("instructions"),
        metadata=echo.get("metadata") or {},
        output=output,
        output_text=text,
        usage=usage,
        error=error,
        incomplete_details=incomplete,
        previous_response_id=echo.get("previous_response_id"),
        text=echo.get("text") or {"format": {"type": "text"}},
        tools=[{"type": "function", "name": name} for name in echo.get("tools") or []],
        temperature=echo.get("temperature"),
        max_output_tokens=echo.get("max_output_tokens"),
        keel=KeelExtension(
            task_id=task.id,
            workflow=task.workflow,
            status=task.status,
            progress=task.progress,
            links=links(task.id),
            envelope=Envelope.model_validate(envelope) if envelope is not None else None,
        ),
    )


class ResponseEncoder:
    """A task's event log, walked from its first event, as Responses stream events (without their sequence
    numbers: :func:`numbered` gives those). Deterministic: the same log gives the same events."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.text = ""
        self._item_open = False
        self._running = False

    def _snapshot(self, task: Task) -> dict[str, Any]:
        return response_of(task, self.text).model_dump(mode="json")

    def start(self) -> list[dict[str, Any]]:
        created = dataclasses.replace(
            self.task, status=TaskStatus.queued, progress=0.0, envelope=None, finished_at=None
        )
        return [{"type": "response.created", "response": self._snapshot(created)}]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        delta = answer_delta(self.task, event)
        if delta is not None:
            return [*self._open_item(), self._delta(delta)]
        if event.type == "status" and event.data.get("status") == "running" and not self._running:
            self._running = True
            running = dataclasses.replace(
                self.task, status=TaskStatus.running, progress=0.0, envelope=None, finished_at=None
            )
            return [{"type": "response.in_progress", "response": self._snapshot(running)}]
        if event.type == "end":
            return self._end(event)
        return [
            {
                "type": "keel.event",
                "keel": {"seq": event.seq, "type": event.type, "data": event.data, "created_at": event.created_at},
            }
        ]

    def _ids(self) -> dict[str, Any]:
        return {"item_id": _message_id(self.task), "output_index": 0, "content_index": 0}

    def _item(self, status: str, text: str | None = None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        item_id = _message_id(self.task)
        return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _open_item(self) -> list[dict[str, Any]]:
        if self._item_open:
            return []
        self._item_open = True
        return [
            {"type": "response.output_item.added", "output_index": 0, "item": self._item("in_progress")},
            {
                "type": "response.content_part.added",
                **self._ids(),
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ]

    def _delta(self, text: str) -> dict[str, Any]:
        self.text += text
        return {"type": "response.output_text.delta", **self._ids(), "delta": text, "logprobs": []}

    def _end(self, event: Event) -> list[dict[str, Any]]:
        status = TaskStatus(event.data.get("status", "failed"))
        envelope = event.data.get("envelope") or {}
        done = dataclasses.replace(
            self.task, status=status, envelope=envelope, finished_at=event.created_at, progress=1.0
        )
        text = final_text(envelope, self.text)
        out: list[dict[str, Any]] = []
        if text or self._item_open:
            if not self._item_open:
                out += [*self._open_item(), self._delta(text)]
            self.text = text
            part = {"type": "output_text", "text": text, "annotations": []}
            item_status = "completed" if status is TaskStatus.succeeded else "incomplete"
            out += [
                {"type": "response.output_text.done", **self._ids(), "text": text, "logprobs": []},
                {"type": "response.content_part.done", **self._ids(), "part": part},
                {"type": "response.output_item.done", "output_index": 0, "item": self._item(item_status, text)},
            ]
        out.append({"type": TERMINAL_EVENT[STATUS[status]], "response": self._snapshot(done)})
        return out


async def numbered(task: Task, events: AsyncIterator[Event], after: int = -1) -> AsyncIterator[dict[str, Any]]:
    """The task's Responses stream events with their ``sequence_number`` (from 0), those after ``after`` only.
    ``events`` must be the task's log from its first event."""
    encoder = ResponseEncoder(task)
    n = -1

    def number(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal n
        out = []
        for ev in batch:
            n += 1
            if n > after:
                out.append({"type": ev["type"], "sequence_number": n, **ev})
        return out

    for ev in number(encoder.start()):
        yield ev
    async for event in events:
        for ev in number(encoder.feed(event)):
            yield ev


async def streamed_text(task: Task, events: AsyncIterator[Event]) -> str:
    """The answer's text as its ``token`` events carried it (what a cancelled answer had written)."""
    return "".join([d async for e in events if (d := answer_delta(task, e)) is not None])


class ChunkEncoder:
    """A ``respond`` task's log as Chat Completions chunks (``chat.completion.chunk``)."""

    def __init__(self, task: Task, model: str, *, include_usage: bool) -> None:
        self.task = task
        self.model = model
        self.include_usage = include_usage
        self.text = ""
        self._started = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": chat_id(self.task.id),
            "object": "chat.completion.chunk",
            "created": int(self.task.created_at),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def _content(self, text: str) -> list[dict[str, Any]]:
        first = [] if self._started else [self._chunk({"role": "assistant", "content": ""})]
        self._started = True
        self.text += text
        return [*first, self._chunk({"content": text})]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The chunks this event gives. A failed task gives one ``{"error": …}`` object, which the SDK raises."""
        delta = answer_delta(self.task, event)
        if delta is not None:
            return self._content(delta)
        if event.type != "end":
            return []
        status = TaskStatus(event.data.get("status", "failed"))
        envelope = event.data.get("envelope") or {}
        if status not in (TaskStatus.succeeded, TaskStatus.partial_success):
            first = (envelope.get("errors") or [{}])[0]
            return [{"error": {"type": status.value, "code": first.get("type"), "message": first.get("message")}}]
        text = final_text(envelope, self.text)
        out = self._content(text) if not self.text and text else []
        out.append(self._chunk({}, "stop"))
        if self.include_usage:
            tokens = (envelope.get("metadata") or {}).get("tokens") or {}
            usage = {
                "prompt_tokens": int(tokens.get("input", 0)),
                "completion_tokens": int(tokens.get("output", 0)),
                "total_tokens": int(tokens.get("total", 0)),
            }
            out.append({**self._chunk({}), "choices": [], "usage": usage})
        return out


def chat_id(task_id: str) -> str:
    return "chatcmpl-" + task_id.removeprefix(_TASK)
