"""The child process that runs llama.cpp for :class:`keel.orchestration.llm.models.local.LocalModel`:
``python -m keel.orchestration.llm.models.local_worker``. The server never decodes a token itself: on some CPUs
llama.cpp crashes inside ``decode``, and a crash here costs the calls in flight, not the server.

The protocol is JSON lines, one message an object with its kind under ``op``, defined by the dataclasses below.
The parent sends :class:`Load` first; the child answers :class:`Ready` (or :class:`LoadFailed` and exits), then
takes :class:`Generate` and :class:`Cancel` in any order. For each ``Generate`` it answers :class:`Prompt` (the
prompt's tokens), a :class:`Token` per piece of text, and one :class:`End` (or :class:`Failed`). Requests run one
at a time, in order (a llama.cpp context is not thread-safe); a ``Cancel`` stops its request before the next
token, or before it starts if it is still queued. End of input means the parent is gone: the child exits at once.

Native code prints to fd 1 and 2 as it pleases, so the channel is moved off them before llama.cpp is imported:
the protocol goes out on a private duplicate of the original stdout, fd 1 then points at stderr, and stdin is
read through a duplicate while fd 0 points at ``/dev/null``. Only the standard library is imported at module
level: the parent imports the message types from here.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

# -- the protocol ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class Load:
    """Parent → child, first: the GGUF to open and how."""

    path: str
    n_ctx: int
    n_threads: int
    n_threads_batch: int


@dataclass(kw_only=True, slots=True, frozen=True)
class Generate:
    """Parent → child: stream a chat completion. ``kwargs`` go to ``create_chat_completion``; ``grammar`` is GBNF
    text (built by the parent from the output schema)."""

    id: int
    kwargs: dict[str, Any]
    grammar: str | None = None


@dataclass(kw_only=True, slots=True, frozen=True)
class Cancel:
    """Parent → child: stop request ``id`` before its next token."""

    id: int


@dataclass(kw_only=True, slots=True, frozen=True)
class Ready:
    """Child → parent: the model is loaded."""

    n_ctx: int
    pid: int


@dataclass(kw_only=True, slots=True, frozen=True)
class LoadFailed:
    """Child → parent: the model could not be loaded (the child exits)."""

    error: str


@dataclass(kw_only=True, slots=True, frozen=True)
class Prompt:
    id: int
    tokens: int
    """The prompt as the model reads it: laid out by its chat template, special tokens included."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Token:
    id: int
    text: str
    finish: str | None = None
    """llama.cpp's finish reason (``stop``, ``length``) on the last piece."""


@dataclass(kw_only=True, slots=True, frozen=True)
class End:
    id: int
    reason: str
    """``done``, or ``cancelled`` when a :class:`Cancel` stopped it."""
    generated: int
    """Pieces drawn from llama.cpp for this request (about one a token), so a test can tell that a cancelled
    generation stopped early."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Failed:
    """Child → parent: request ``id`` raised; ``type`` is the exception's class name."""

    id: int
    type: str
    message: str


Message = Load | Generate | Cancel | Ready | LoadFailed | Prompt | Token | End | Failed
_KINDS: dict[str, type[Message]] = {
    cls.__name__.lower(): cls for cls in (Load, Generate, Cancel, Ready, LoadFailed, Prompt, Token, End, Failed)
}


def encode(message: Message) -> bytes:
    """One line of the protocol. Raises ``TypeError`` for a value JSON cannot carry."""
    return json.dumps({"op": type(message).__name__.lower(), **asdict(message)}).encode() + b"\n"


def decode(line: bytes) -> Message:
    """The message on ``line``; ``ValueError`` for anything else."""
    try:
        obj = json.loads(line)
        kind = _KINDS[obj.pop("op")]
        return kind(**obj)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a local model protocol message: {line[:200]!r}") from exc


# -- the child -------------------------------------------------------------------------------------------------


class Channel:
    """The protocol's two ends, on private descriptors (see the module docstring)."""

    def __init__(self, inp: IO[bytes], out: IO[bytes]) -> None:
        self._in = inp
        self._out = out
        self._lock = threading.Lock()

    @classmethod
    def take_stdio(cls) -> Channel:
        out = os.fdopen(os.dup(1), "wb")
        inp = os.fdopen(os.dup(0), "rb")
        os.dup2(2, 1)  # whatever native code prints now lands on stderr, not in the protocol
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = sys.stderr
        return cls(inp, out)

    def send(self, message: Message) -> None:
        data = encode(message)
        with self._lock:
            self._out.write(data)
            self._out.flush()

    def receive(self) -> Message | None:
        """The next message, or None at end of input (the parent closed the pipe or died)."""
        while line := self._in.readline():
            if line.strip():
                return decode(line)
        return None


class Runner:
    """Generates for one request at a time, in a thread of its own; the main thread keeps reading, so a cancel
    arrives while a request is generating."""

    def __init__(self, llama: Any, formatter: Any, send: Callable[[Message], None]) -> None:
        self._llama = llama
        self._formatter = formatter
        self._send = send
        self._queue: queue.SimpleQueue[Generate] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        self._cancelled: set[int] = set()
        self._grammars: dict[str, Any] = {}

    def submit(self, request: Generate) -> None:
        with self._lock:
            self._pending.add(request.id)
        self._queue.put(request)

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._pending:
                self._cancelled.add(request_id)

    def run(self) -> None:
        while True:
            self._generate(self._queue.get())

    def _stopped(self, request_id: int) -> bool:
        return request_id in self._cancelled  # a set lookup, atomic under the GIL: cheap enough per token

    def _generate(self, request: Generate) -> None:
        from keel.orchestration.llm.models.local import prompt_token_count

        generated, chunks = 0, None
        try:
            if not self._stopped(request.id):
                chat = request.kwargs["messages"]
                self._send(Prompt(id=request.id, tokens=prompt_token_count(self._llama, self._formatter, chat)))
                kwargs = dict(request.kwargs)
                if request.grammar is not None:
                    kwargs["grammar"] = self._grammar(request.grammar)
                chunks = self._llama.create_chat_completion(**kwargs, stream=True)
                for chunk in chunks:
                    generated += 1
                    if self._stopped(request.id):
                        break
                    choice = chunk["choices"][0]
                    text = (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason")
                    if text or finish:
                        self._send(Token(id=request.id, text=text, finish=finish))
            reason = "cancelled" if self._stopped(request.id) else "done"
            self._send(End(id=request.id, reason=reason, generated=generated))
        except Exception as exc:  # reported to the parent; the child goes on with the next request
            self._send(Failed(id=request.id, type=type(exc).__name__, message=str(exc)))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            with self._lock:
                self._pending.discard(request.id)
                self._cancelled.discard(request.id)

    def _grammar(self, gbnf: str) -> Any:
        from llama_cpp import llama_grammar

        grammar = self._grammars.get(gbnf)
        if grammar is None:
            grammar = llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)
            if len(self._grammars) >= 64:
                self._grammars.clear()
            self._grammars[gbnf] = grammar
        return grammar


def _load(request: Load) -> tuple[Any, Any]:
    """The model and its chat formatter. Imported here, after the channel moved off fd 1."""
    from llama_cpp import llama_chat_format

    from keel.orchestration.llm.models.local import _chat_formatter, _open

    llama = _open(request.path, request.n_ctx, request.n_threads, request.n_threads_batch)
    formatter = _chat_formatter(llama)
    if formatter is not None:
        llama.chat_handler = llama_chat_format.chat_formatter_to_chat_completion_handler(formatter)
    return llama, formatter


def main() -> int:
    channel = Channel.take_stdio()
    first = channel.receive()
    if not isinstance(first, Load):
        return 2
    try:
        llama, formatter = _load(first)
    except BaseException as exc:  # a missing package, a bad file: said to the parent, which raises ConfigError
        channel.send(LoadFailed(error=f"{type(exc).__name__}: {exc}"))
        return 1
    runner = Runner(llama, formatter, channel.send)
    threading.Thread(target=runner.run, name="keel-generate", daemon=True).start()
    channel.send(Ready(n_ctx=int(llama.n_ctx()), pid=os.getpid()))
    while (message := channel.receive()) is not None:
        if isinstance(message, Generate):
            runner.submit(message)
        elif isinstance(message, Cancel):
            runner.cancel(message.id)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Not a normal interpreter exit: the generating thread may be inside llama.cpp, and finalizing its objects
    # under it would be the crash this process exists to contain.
    os._exit(code)
