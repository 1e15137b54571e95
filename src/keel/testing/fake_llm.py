"""Loopback fake LLM provider servers, for tests only.

Two real HTTP servers on ``127.0.0.1`` (uvicorn in a daemon thread), speaking the real wire formats of

* the OpenAI Chat Completions API (``POST /v1/chat/completions``; also spoken by vLLM, Ollama, llama.cpp
  server and LM Studio) -- :class:`FakeOpenAIServer`, and
* the Anthropic Messages API (``POST /v1/messages``) -- :class:`FakeAnthropicServer`,

both non-streamed and streamed (SSE), so that keel's real HTTP adapters can be exercised end to end. The OpenAI fake
also serves ``POST /v1/embeddings`` (deterministic vectors from :class:`~keel.testing.embedders.HashEmbedder`, with
its own script queue: see :meth:`FakeOpenAIServer.script_embeddings`).

The fakes are scripted: every request that passes the auth/shape checks consumes the next behaviour queued with
:meth:`script` -- a :class:`Reply`, a :class:`Fail` (provider-shaped error), a :class:`Cut` (the connection dies
mid-body) or a :class:`Hang` (stall, for timeout/cancellation tests). An empty queue answers 500
``"fake server: script exhausted"``. Every received body and its headers are recorded, in order.

What a :class:`Cut` looks like from httpx: the server closes the TCP connection without finishing the HTTP body
(no terminating zero-length chunk for streams, fewer bytes than ``Content-Length`` otherwise), so reading the body
raises ``httpx.RemoteProtocolError`` ("peer closed connection without sending complete message body ...").
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from keel.testing.embedders import HashEmbedder

__all__ = [
    "Cut",
    "EmbeddingReply",
    "Fail",
    "FakeAnthropicServer",
    "FakeOpenAIServer",
    "Hang",
    "Reply",
    "ToolCallSpec",
]


@dataclass(kw_only=True)
class ToolCallSpec:
    """One tool call in a scripted reply.

    ``arguments`` given as a dict is JSON-encoded; given as a str it is sent verbatim (it may be invalid JSON on
    purpose). An empty ``id`` is filled with ``call_<n>`` (OpenAI) or ``toolu_<n>`` (Anthropic).
    """

    name: str
    arguments: dict[str, Any] | str
    id: str = ""


@dataclass(kw_only=True)
class Reply:
    """A successful scripted completion.

    ``finish_reason`` uses the OpenAI vocabulary (``stop | length | tool_calls | content_filter``) and is reported
    verbatim -- script ``finish_reason="tool_calls"`` yourself alongside tool calls. The Anthropic fake maps it to
    ``end_turn | max_tokens | tool_use | refusal`` (other values pass through unchanged). ``refusal`` is
    ``message.refusal`` for OpenAI; for Anthropic it forces ``stop_reason="refusal"`` and is appended to the text.
    When streamed, text (and refusal, and tool arguments) are split into deltas of ``chunk_chars`` characters.
    """

    text: str = ""
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    finish_reason: str = "stop"
    model: str = "gpt-4o-mini-2024-07-18"
    input_tokens: int = 10
    output_tokens: int = 5
    refusal: str | None = None
    chunk_chars: int = 4


@dataclass(kw_only=True)
class Fail:
    """A scripted error response: ``status`` with the provider's JSON error body (also for streamed requests,
    as the real APIs fail before the stream starts) and a ``retry-after`` header (seconds) when ``retry_after``
    is set (the OpenAI fake also sends ``retry-after-ms``)."""

    status: int
    retry_after: float | None = None
    message: str = "scripted failure"


@dataclass(kw_only=True)
class Cut:
    """The connection dies mid-body.

    Streamed: the preamble and ``after_chunks`` content deltas are sent, then the TCP connection is closed without
    the final chunk, ``[DONE]`` / ``message_stop`` or the chunked-encoding terminator. Non-streamed: the headers
    (with the full ``Content-Length``) and the first half of the JSON body are sent, then the connection is closed.
    Either way httpx raises ``httpx.RemoteProtocolError`` while reading the body. On the embeddings endpoint the
    embeddings body is cut in half and ``reply`` is ignored.
    """

    reply: Reply = field(default_factory=Reply)
    after_chunks: int = 2


@dataclass(kw_only=True)
class Hang:
    """Stall for ``seconds``, for timeout and cancellation tests.

    Streamed: the preamble and the first content delta are sent, then the stream stalls; non-streamed: nothing (not
    even the status line) is sent during the stall. If the stall runs out the response completes normally with
    ``reply`` (default ``Reply(text="hung reply")``). Stopping the server aborts any stall promptly: a stalled stream
    is dropped mid-body, a stalled non-streamed request gets a 503 error.
    """

    seconds: float = 30.0
    reply: Reply | None = None


@dataclass(kw_only=True)
class EmbeddingReply:
    """A successful scripted ``/v1/embeddings`` answer (also what an empty embeddings queue answers).

    Vectors are :class:`~keel.testing.embedders.HashEmbedder`'s for the requested model and dimension, so they are
    deterministic and lexically meaningful. ``reverse`` lists ``data`` in reverse order (each item keeps its
    ``index``), to check that clients reorder by ``index``; ``model`` overrides the model name in the answer.
    """

    reverse: bool = False
    model: str | None = None


Behaviour = Reply | Fail | Cut | Hang
EmbeddingBehaviour = EmbeddingReply | Fail | Cut | Hang

_EventKind = Literal["meta", "content", "end"]
_Event = tuple[bytes, _EventKind]
_STALL_TICK = 0.02
_WORDS = re.compile(r"\w+")


class _CutConnection(Exception):
    """Raised inside a response body to make uvicorn drop the connection mid-response."""


class _QuietCuts(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" records caused by our deliberate connection cuts."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_cut(exc)


def _is_cut(exc: BaseException | None) -> bool:
    if isinstance(exc, _CutConnection):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cut(e) for e in exc.exceptions)
    return False


_log_filter_lock = threading.Lock()


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    with _log_filter_lock:
        if not any(isinstance(f, _QuietCuts) for f in logger.filters):
            logger.addFilter(_QuietCuts())


def _pieces(text: str, size: int) -> list[str]:
    step = max(1, size)
    return [text[i : i + step] for i in range(0, len(text), step)]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _arguments_json(call: ToolCallSpec) -> str:
    return call.arguments if isinstance(call.arguments, str) else _dumps(call.arguments)


def _seconds_header(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class _FakeServer:
    """Shared machinery: the uvicorn thread, the script queue, the request log and the streaming/cut/hang logic."""

    _route: ClassVar[str] = ""
    _tool_id_prefix: ClassVar[str] = ""

    def __init__(self, *, api_key: str | None) -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._queue: collections.deque[Behaviour] = collections.deque()
        self._responder: Callable[[dict[str, Any]], Behaviour] | None = None
        self._lock = threading.Lock()
        self._counter = 0
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free loopback port and serve in a daemon thread; returns once the server accepts connections."""
        if self._thread is not None:
            return self
        _install_log_filter()
        # proto must be IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
        # and without it every keep-alive request pays a 40 ms delayed-ACK stall.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=self._port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"{type(self).__name__}-{self._port}"
        )
        self._stopping.clear()
        self._server, self._thread, self._sock = server, thread, sock
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__} failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Abort any stalls, shut the server down and join its thread. Idempotent."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None or self._thread is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    # -- scripting -----------------------------------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """Append behaviours to the queue; each accepted request consumes the next one."""
        for b in behaviours:
            if not isinstance(b, Reply | Fail | Cut | Hang):
                raise TypeError(f"not a scripted behaviour: {b!r}")
        with self._lock:
            self._queue.extend(behaviours)

    def respond_with(self, responder: Callable[[dict[str, Any]], Behaviour] | None) -> None:
        """Answer requests the queue has nothing for with ``responder(body)``: a script that depends on what was
        asked, for concurrent callers whose order is not fixed. Called in the server's thread."""
        with self._lock:
            self._responder = responder

    def reset(self) -> None:
        """Forget the queued script, the responder and the recorded requests/headers."""
        with self._lock:
            self._responder = None
            self._queue.clear()
            self.requests.clear()
            self.headers.clear()

    @property
    def pending(self) -> int:
        """How many scripted behaviours are still queued."""
        with self._lock:
            return len(self._queue)

    def _next_behaviour(self) -> Behaviour | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def _next_n(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def _tool_id(self, call: ToolCallSpec) -> str:
        return call.id or f"{self._tool_id_prefix}{self._next_n()}"

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        return Starlette(
            routes=[
                Route(self._route, self._handle, methods=["POST"]),
                *self._extra_routes(),
                Route("/{path:path}", self._not_found, methods=methods),
            ]
        )

    async def _not_found(self, request: Request) -> Response:
        return self._error(404, f"fake server: no route {request.method} {request.url.path}")

    async def _admit(
        self,
        request: Request,
        requests: list[dict[str, Any]],
        headers: list[dict[str, str]],
        validate: Callable[[dict[str, Any]], str | None],
    ) -> dict[str, Any] | Response:
        """Log the request, check its headers, that its body is a JSON object and what ``validate`` says of it: the
        body, or the error reply (which consumes no scripted behaviour)."""
        raw = await request.body()
        body: Any
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            requests.append(body if isinstance(body, dict) else {"_raw": raw.decode("utf-8", "replace")})
            headers.append({k.lower(): v for k, v in request.headers.items()})
        rejected = self._check_headers(request.headers)
        if rejected is not None:
            return rejected
        if not isinstance(body, dict):
            return self._error(400, "fake server: request body is not a JSON object")
        problem = validate(body)
        return body if problem is None else self._error(400, problem)

    async def _hold(self, hang: Hang) -> Response | None:
        """A non-streamed hang: nothing at all (not even headers) is sent during the stall; a 503 if the server is
        stopped during it, else None (the answer follows)."""
        try:
            await self._stall(hang.seconds)
        except _CutConnection:
            return self._error(503, "fake server: stopped during a scripted hang")
        return None

    async def _handle(self, request: Request) -> Response:
        body = await self._admit(request, self.requests, self.headers, self._validate)
        if isinstance(body, Response):
            return body
        behaviour = self._next_behaviour()
        if behaviour is None and self._responder is not None:
            behaviour = self._responder(body)
        if behaviour is None:
            return self._error(500, "fake server: script exhausted")
        if isinstance(behaviour, Hang) and body.get("stream") is not True:
            stopped = await self._hold(behaviour)
            if stopped is not None:
                return stopped
        return self._respond(behaviour, body)

    def _respond(self, behaviour: Behaviour, body: dict[str, Any]) -> Response:
        if isinstance(behaviour, Fail):
            return self._error(behaviour.status, behaviour.message, behaviour.retry_after)
        streamed = body.get("stream") is True
        if isinstance(behaviour, Reply):
            if streamed:
                return self._sse(self._emit(self._events(behaviour, body)))
            return JSONResponse(self._body(behaviour), headers=self._extra_headers())
        if isinstance(behaviour, Cut):
            if streamed:
                return self._sse(self._emit(self._events(behaviour.reply, body), cut_after=behaviour.after_chunks))
            return self._truncated(self._body(behaviour.reply))
        reply = behaviour.reply or Reply(text="hung reply")
        if streamed:
            return self._sse(self._emit(self._events(reply, body), hang=behaviour.seconds))
        return JSONResponse(self._body(reply), headers=self._extra_headers())  # the stall already happened

    def _sse(self, stream: AsyncIterator[bytes]) -> Response:
        headers = {"cache-control": "no-cache", **self._extra_headers()}
        return StreamingResponse(stream, media_type="text/event-stream; charset=utf-8", headers=headers)

    def _truncated(self, payload: dict[str, Any]) -> Response:
        data = _dumps(payload).encode()

        async def half() -> AsyncIterator[bytes]:
            yield data[: len(data) // 2]
            raise _CutConnection

        headers = {"content-length": str(len(data)), **self._extra_headers()}
        return StreamingResponse(half(), media_type="application/json", headers=headers)

    async def _stall(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping.is_set():
                raise _CutConnection
            await anyio.sleep(min(_STALL_TICK, remaining))

    async def _emit(
        self, events: list[_Event], *, cut_after: int | None = None, hang: float | None = None
    ) -> AsyncIterator[bytes]:
        """Yield SSE events; with ``cut_after`` drop the connection after that many content events (never sending
        an "end" event); with ``hang`` stall after the first content event (or before the end, if there is none)."""
        sent = 0
        hang_pending = hang is not None
        for data, kind in events:
            if cut_after is not None and (kind == "end" or (kind == "content" and sent >= cut_after)):
                raise _CutConnection
            if hang is not None and hang_pending and kind == "end":
                hang_pending = False
                await self._stall(hang)
            yield data
            if kind == "content":
                sent += 1
                if hang is not None and hang_pending:
                    hang_pending = False
                    await self._stall(hang)
        if cut_after is not None:
            raise _CutConnection

    # -- provider specifics --------------------------------------------------------------------------------------

    def _extra_headers(self) -> dict[str, str]:
        return {}

    def _extra_routes(self) -> list[Route]:
        return []

    def _check_headers(self, headers: Mapping[str, str]) -> Response | None:
        raise NotImplementedError

    def _validate(self, body: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def _error(self, status: int, message: str, retry_after: float | None = None) -> Response:
        raise NotImplementedError

    def _body(self, reply: Reply) -> dict[str, Any]:
        raise NotImplementedError

    def _events(self, reply: Reply, request: dict[str, Any]) -> list[_Event]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------------------
# OpenAI Chat Completions
# ------------------------------------------------------------------------------------------------------------------

_OPENAI_ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}


class FakeOpenAIServer(_FakeServer):
    """A scripted fake of the OpenAI Chat Completions API (``POST {base_url}/chat/completions``).

    ``base_url`` is ``http://127.0.0.1:<port>/v1``. If ``api_key`` is set, requests without
    ``Authorization: Bearer <api_key>`` get 401 ``invalid_api_key``; bodies missing ``model`` or ``messages`` get
    400. Neither consumes the script. Streamed replies honour ``stream_options.include_usage``.

    ``POST {base_url}/embeddings`` answers OpenAI-shaped embeddings (``data[].embedding``, ``index``, ``usage``), as
    floats or, with ``encoding_format="base64"``, little-endian float32. Vectors have ``dimensions`` entries if the
    request asks, else ``embedding_dim``. It has its own queue (:meth:`script_embeddings`) and log
    (:attr:`embedding_requests`, :attr:`embedding_headers`); unlike chat, an empty queue answers normally. The same
    auth check applies; a body without ``model``, with an ``input`` that is not a non-empty string or list of
    non-empty strings, or with a bad ``dimensions`` gets 400 without consuming the queue.
    """

    _route = "/v1/chat/completions"
    _tool_id_prefix = "call_"

    def __init__(self, *, api_key: str | None = "sk-test", embedding_dim: int = 64) -> None:
        super().__init__(api_key=api_key)
        self.embedding_dim = embedding_dim
        self.embedding_requests: list[dict[str, Any]] = []
        self.embedding_headers: list[dict[str, str]] = []
        self._embedding_queue: collections.deque[EmbeddingBehaviour] = collections.deque()
        self._embedders: dict[tuple[str, int], HashEmbedder] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- embeddings ----------------------------------------------------------------------------------------------

    def script_embeddings(self, *behaviours: EmbeddingBehaviour) -> None:
        """Queue behaviours for ``/v1/embeddings``: each accepted request consumes the next one; once the queue is
        empty, requests get a normal :class:`EmbeddingReply`. E.g. ``Fail(status=429, retry_after=0.01)`` twice,
        then success."""
        for b in behaviours:
            if not isinstance(b, EmbeddingReply | Fail | Cut | Hang):
                raise TypeError(f"not a scripted embeddings behaviour: {b!r}")
        with self._lock:
            self._embedding_queue.extend(behaviours)

    @property
    def embedding_pending(self) -> int:
        """How many scripted embeddings behaviours are still queued."""
        with self._lock:
            return len(self._embedding_queue)

    def reset(self) -> None:
        """Forget the queued scripts and the recorded requests/headers (chat and embeddings)."""
        super().reset()
        with self._lock:
            self._embedding_queue.clear()
            self.embedding_requests.clear()
            self.embedding_headers.clear()

    def expected_embeddings(self, texts: list[str], *, model: str, dimensions: int | None = None) -> np.ndarray:
        """The unit vectors this fake answers for ``texts`` (before any client-side processing)."""
        return self._embedder(model, dimensions or self.embedding_dim).embed_sync(texts)

    def _embedder(self, model: str, dim: int) -> HashEmbedder:
        with self._lock:
            embedder = self._embedders.get((model, dim))
            if embedder is None:
                embedder = self._embedders[(model, dim)] = HashEmbedder(dim=dim, model=model)
            return embedder

    def _extra_routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self._handle_embeddings, methods=["POST"])]

    @staticmethod
    def _validate_embeddings(body: dict[str, Any]) -> str | None:
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            return (
                "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
            )
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            return "Invalid value for 'dimensions': must be a positive integer."
        if body.get("encoding_format", "float") not in ("float", "base64"):
            return "Invalid value for 'encoding_format': expected 'float' or 'base64'."
        return None

    async def _handle_embeddings(self, request: Request) -> Response:
        body = await self._admit(request, self.embedding_requests, self.embedding_headers, self._validate_embeddings)
        if isinstance(body, Response):
            return body
        with self._lock:
            behaviour = self._embedding_queue.popleft() if self._embedding_queue else EmbeddingReply()
        if isinstance(behaviour, Fail):
            return self._error(behaviour.status, behaviour.message, behaviour.retry_after)
        if isinstance(behaviour, Hang):
            stopped = await self._hold(behaviour)
            if stopped is not None:
                return stopped
        payload = self._embeddings_body(body, behaviour if isinstance(behaviour, EmbeddingReply) else EmbeddingReply())
        if isinstance(behaviour, Cut):
            return self._truncated(payload)
        return JSONResponse(payload, headers=self._extra_headers())

    def _embeddings_body(self, request: dict[str, Any], reply: EmbeddingReply) -> dict[str, Any]:
        inputs = request["input"]
        texts: list[str] = [inputs] if isinstance(inputs, str) else list(inputs)
        model: str = request["model"]
        vectors = self.expected_embeddings(texts, model=model, dimensions=request.get("dimensions"))
        as_base64 = request.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        if reply.reverse:
            data.reverse()
        tokens = sum(max(1, len(_WORDS.findall(t))) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": reply.model or model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _extra_headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_fake_{self._next_n()}", "openai-processing-ms": "1"}

    def _check_headers(self, headers: Mapping[str, str]) -> Response | None:
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def _validate(self, body: dict[str, Any]) -> str | None:
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        if not isinstance(body.get("messages"), list):
            return "Missing required parameter: 'messages'."
        return None

    def _error(
        self, status: int, message: str, retry_after: float | None = None, *, code: str | None = None
    ) -> Response:
        kind = _OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        headers = self._extra_headers()
        if retry_after is not None:
            headers["retry-after"] = _seconds_header(retry_after)
            headers["retry-after-ms"] = str(int(retry_after * 1000))
        payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(payload, status_code=status, headers=headers)

    def _tool_calls(self, reply: Reply) -> list[dict[str, Any]]:
        return [
            {"id": self._tool_id(c), "type": "function", "function": {"name": c.name, "arguments": _arguments_json(c)}}
            for c in reply.tool_calls
        ]

    @staticmethod
    def _usage(reply: Reply) -> dict[str, Any]:
        return {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def _body(self, reply: Reply) -> dict[str, Any]:
        has_other = bool(reply.tool_calls) or reply.refusal is not None
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text if reply.text or not has_other else None,
            "refusal": reply.refusal,
            "annotations": [],
        }
        if reply.tool_calls:
            message["tool_calls"] = self._tool_calls(reply)
        return {
            "id": f"chatcmpl-{self._next_n()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": self._usage(reply),
            "system_fingerprint": "fp_fake",
        }

    def _events(self, reply: Reply, request: dict[str, Any]) -> list[_Event]:
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        base: dict[str, Any] = {
            "id": f"chatcmpl-{self._next_n()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.model,
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: dict[str, Any], kind: _EventKind, finish: str | None = None) -> _Event:
            payload = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                payload["usage"] = None
            return f"data: {_dumps(payload)}\n\n".encode(), kind

        events = [chunk({"role": "assistant", "content": "", "refusal": None}, "meta")]
        events += [chunk({"content": p}, "content") for p in _pieces(reply.text, reply.chunk_chars)]
        events += [chunk({"refusal": p}, "content") for p in _pieces(reply.refusal or "", reply.chunk_chars)]
        for i, call in enumerate(self._tool_calls(reply)):
            fn = call["function"]
            head = {"index": i, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
            events.append(chunk({"tool_calls": [head]}, "content"))
            events += [
                chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}, "content")
                for p in _pieces(fn["arguments"], reply.chunk_chars)
            ]
        events.append(chunk({}, "end", reply.finish_reason))
        if include_usage:
            events.append((f"data: {_dumps({**base, 'choices': [], 'usage': self._usage(reply)})}\n\n".encode(), "end"))
        events.append((b"data: [DONE]\n\n", "end"))
        return events


# ------------------------------------------------------------------------------------------------------------------
# Anthropic Messages
# ------------------------------------------------------------------------------------------------------------------

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_ANTHROPIC_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


class FakeAnthropicServer(_FakeServer):
    """A scripted fake of the Anthropic Messages API (``POST {base_url}/v1/messages``).

    ``base_url`` is ``http://127.0.0.1:<port>``. If ``api_key`` is set, requests without a matching ``x-api-key``
    get 401 ``authentication_error``; requests without ``anthropic-version`` get 400, as do bodies missing
    ``model``, ``max_tokens`` or ``messages``. None of these consumes the script.

    Tool arguments given as a str are streamed verbatim as ``partial_json`` fragments; non-streamed they are parsed
    into ``input`` when valid JSON, otherwise ``input`` is the raw string itself (which the real API never does --
    it exists to exercise an adapter's handling of malformed tool input).
    """

    _route = "/v1/messages"
    _tool_id_prefix = "toolu_"

    def __init__(self, *, api_key: str | None = "sk-test") -> None:
        super().__init__(api_key=api_key)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _extra_headers(self) -> dict[str, str]:
        return {"request-id": f"req_fake_{self._next_n()}"}

    def _check_headers(self, headers: Mapping[str, str]) -> Response | None:
        if self.api_key is not None and headers.get("x-api-key") != self.api_key:
            return self._error(401, "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required")
        return None

    def _validate(self, body: dict[str, Any]) -> str | None:
        for name, kind in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(body.get(name), kind):
                return f"{name}: Field required"
        return None

    def _error(self, status: int, message: str, retry_after: float | None = None) -> Response:
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        headers = self._extra_headers()
        if retry_after is not None:
            headers["retry-after"] = _seconds_header(retry_after)
        payload = {"type": "error", "error": {"type": kind, "message": message}, "request_id": headers["request-id"]}
        return JSONResponse(payload, status_code=status, headers=headers)

    @staticmethod
    def _stop_reason(reply: Reply) -> str:
        if reply.refusal is not None:
            return "refusal"
        return _ANTHROPIC_STOP_REASONS.get(reply.finish_reason, reply.finish_reason)

    @staticmethod
    def _text(reply: Reply) -> str:
        return reply.text + (reply.refusal or "")

    @staticmethod
    def _usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": reply.input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    @staticmethod
    def _input(call: ToolCallSpec) -> Any:
        if not isinstance(call.arguments, str):
            return call.arguments
        try:
            return json.loads(call.arguments)
        except ValueError:
            return call.arguments

    def _message(self, reply: Reply, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": f"msg_{self._next_n()}",
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": self._usage(reply, reply.output_tokens if stop_reason else 1),
        }

    def _body(self, reply: Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if text := self._text(reply):
            content.append({"type": "text", "text": text})
        content += [
            {"type": "tool_use", "id": self._tool_id(c), "name": c.name, "input": self._input(c)}
            for c in reply.tool_calls
        ]
        return self._message(reply, content, self._stop_reason(reply))

    def _events(self, reply: Reply, request: dict[str, Any]) -> list[_Event]:
        def event(payload: dict[str, Any], kind: _EventKind) -> _Event:
            return f"event: {payload['type']}\ndata: {_dumps(payload)}\n\n".encode(), kind

        blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        if text := self._text(reply):
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(text, reply.chunk_chars)]
            blocks.append(({"type": "text", "text": ""}, deltas))
        for call in reply.tool_calls:
            start = {"type": "tool_use", "id": self._tool_id(call), "name": call.name, "input": {}}
            parts = _pieces(_arguments_json(call), reply.chunk_chars)
            blocks.append((start, [{"type": "input_json_delta", "partial_json": p} for p in parts]))

        events = [
            event({"type": "message_start", "message": self._message(reply, [], None)}, "meta"),
            event({"type": "ping"}, "meta"),
        ]
        for index, (start, deltas) in enumerate(blocks):
            events.append(event({"type": "content_block_start", "index": index, "content_block": start}, "meta"))
            events += [event({"type": "content_block_delta", "index": index, "delta": d}, "content") for d in deltas]
            events.append(event({"type": "content_block_stop", "index": index}, "meta"))
        delta = {"stop_reason": self._stop_reason(reply), "stop_sequence": None}
        events.append(
            event({"type": "message_delta", "delta": delta, "usage": {"output_tokens": reply.output_tokens}}, "end")
        )
        events.append(event({"type": "message_stop"}, "end"))
        return events
