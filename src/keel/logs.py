"""keel's logging: one handler on stderr, JSON or text, and the task and request a line is about.

A line about a task must say which task, whose, and which request created it, wherever in the code it is logged.
Passing those down every call would thread them through every seam, so they live in :mod:`contextvars` instead:
the HTTP edge sets ``request_id`` per request (:class:`RequestIdMiddleware` in ``app.py``), the runner sets all
three for the duration of a run (:func:`task_scope`), and :class:`ContextFilter` copies them onto every record.
asyncio copies the context into each task it creates, so a run's heartbeats and steps carry them too."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Literal

LogFormat = Literal["json", "text"]

task_id: ContextVar[str | None] = ContextVar("keel_task_id", default=None)
tenant: ContextVar[str | None] = ContextVar("keel_tenant", default=None)
request_id: ContextVar[str | None] = ContextVar("keel_request_id", default=None)

FIELDS = ("task_id", "tenant", "request_id")
"""The context every record carries (None when the line is about no task or request)."""

_VARS = {"task_id": task_id, "tenant": tenant, "request_id": request_id}
_HANDLER_NAME = "keel"


def new_request_id() -> str:
    """A request id for a request that brought none."""
    return uuid.uuid4().hex


@contextlib.contextmanager
def task_scope(task: str, owner: str, request: str | None = None) -> Iterator[None]:
    """Every line logged inside (and in the asyncio tasks started inside) is about task ``task`` of ``owner``,
    created by request ``request``. Restored on exit: a worker runs many tasks one after another."""
    tokens = [(task_id, task_id.set(task)), (tenant, tenant.set(owner))]
    if request is not None:
        tokens.append((request_id, request_id.set(request)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Puts ``task_id``, ``tenant`` and ``request_id`` on every record, from the context unless the call passed
    them (``log.info(..., extra={"task_id": ...})``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the context fields
    that are set, and ``exc_info`` (the formatted traceback, inside the object) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [task_id=… tenant=… request_id=…]`` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the stdlib's name
        context = " ".join(f"{n}={v}" for n in FIELDS if (v := getattr(record, n, None)) is not None)
        return super().formatMessage(record) + (f" [{context}]" if context else "")


class StderrHandler(logging.StreamHandler[IO[str]]):
    """Writes to whatever ``sys.stderr`` is when a record comes, not what it was when logging was configured: a
    test runner, or an embedding application, may swap it and close the old one."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def resolve_format(fmt: LogFormat | None, stream: IO[str]) -> LogFormat:
    """``fmt``, or text on a terminal and JSON otherwise (a file, a pipe, a log collector)."""
    if fmt is not None:
        return fmt
    return "text" if stream.isatty() else "json"


def configure(fmt: LogFormat | None = None, level: str = "INFO", *, stream: IO[str] | None = None) -> LogFormat:
    """Send every logger's records to one handler on ``stream`` (by default stderr, whatever it is at the time),
    formatted as ``fmt``.

    keel's own loggers (``keel.*``) emit at ``level``; other libraries at ``WARNING`` or above unless ``level`` is
    higher (httpx alone would log every request at INFO). uvicorn's loggers keep the level uvicorn sets and reach
    this handler by propagation. Calling it again replaces the handler. Returns the format chosen."""
    chosen = resolve_format(fmt, stream if stream is not None else sys.stderr)
    handler = logging.StreamHandler(stream) if stream is not None else StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("keel").setLevel(numeric)
    return chosen
