"""Tokens/s of the embedded model through keel against llama-cpp-python on its own; writes its figures into
docs/benchmarks.md (between the ``bench_local_model`` markers).

Run: ``.venv/bin/python bench/bench_local_model.py`` (about 5 minutes on 2 idle cores; ``--runs N``,
``--max-tokens N``, ``--note TEXT`` to add to the section's line on the machine's conditions, ``--skip-threads`` to
leave out the all-cores and busy-process runs, ``--no-doc`` to print without rewriting the doc). On a machine that
something else keeps busy, generating on all cores collapses (see below) and those runs alone take half an hour.

Same GGUF (SmolLM2-135M-Instruct Q4_1, ``local:smollm2``), same prompt, same chat layout, same sampling (greedy:
temperature 0, fixed seed, repeat penalty 1.1 — keel's default — and llama-cpp-python's top-k/top-p/min-p
defaults), same ``max_tokens``, same ``n_ctx`` and threads. keel's ``LocalModel`` generates in its child process
(``keel.orchestration.llm.models.local_worker``, started by the first call, which is the warm-up); the baseline is a
``Llama`` on the same file in this process, opened with the thread counts keel sends its child. Paths measured,
alternating in every round (the order flips each round), after one warm-up each:

- **raw**: ``Llama.create_chat_completion(stream=True)`` iterated in this process, counting chunks with text.
- **keel stream**: ``stream_response(LocalModel, ...)``: generation in keel's child process, every token sent as a
  JSON line on its pipe, read by a thread of this process and handed to the event loop and to an ``on_event``
  callback.
- **keel ctx.generate**: a durable model step on a ``WorkflowContext`` over ``InMemoryStore`` (leased task,
  ``StoreJournal``): the same stream, plus a ``token`` event per token into the task's log, the checkpoint and
  the envelope record.

tokens/s = output tokens / seconds from the call to the end of the stream (prompt evaluation included; the prompt
is the same each time, so after the warm-up llama.cpp reuses its KV cache for all but one of its tokens on every
path alike). Figures are medians over the rounds; the ratio to raw is judged as the median of per-round ratios,
which the machine's drift (a shared 2-core VM) moves far less than the medians themselves. CPU per token: for a
keel call, this process's (the event loop and the threads on the child's pipes: the server's share) and the
child's (from /proc); for the raw path, this process's (llama.cpp's). Then: with all cores generating instead of
all but one (a second ``LocalModel`` on the same file, with its own child), raw tokens/s beside a busy process, and
cancellation: how long a cancelled call takes to end (the child has then confirmed that it stopped), and how soon
a request sent at the moment of cancelling gets its first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import llama_cpp
from _doc import cpu_model, write_section

from keel.memory.types import NewTask
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.runtime import StoreJournal
from keel.orchestration.llm.models import Message, ModelSettings, StreamEvent, TextDelta, stream_response
from keel.orchestration.llm.models.local import DEFAULT_REPEAT_PENALTY, LocalModel, default_threads
from keel.testing.inmemory import InMemoryStore

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- bench_local_model:start -->", "<!-- bench_local_model:end -->"

NAME = "smollm2"
PROMPT = "Explain, in a few paragraphs, the main risks of a fixed-price supplier contract for the buyer."
SEED = 1234
TARGET = 0.95
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system, every thread, ended ones included) process ``pid`` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_cpu(model: LocalModel) -> tuple[int | None, float]:
    pid = model.worker.pid
    return pid, (cpu_of(pid) if pid is not None else math.nan)


@dataclass
class Sample:
    tokens: int
    seconds: float
    ttft: float | None
    text: str
    gen_cpu: float = math.nan
    """CPU seconds of the process that generated over the call: this one for raw, keel's child for keel."""
    server_cpu: float | None = None
    """For keel: CPU seconds of this process over the call (event loop, pipe threads, store): the server's share."""

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Series:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def median_rate(self) -> float:
        return statistics.median(s.rate for s in self.samples)

    def rates(self) -> list[float]:
        return [s.rate for s in self.samples]

    def gen_cpu_per_token(self) -> float:
        values = [s.gen_cpu / s.tokens for s in self.samples if not math.isnan(s.gen_cpu)]
        return statistics.median(values) if values else math.nan

    def server_cpu_per_token(self) -> float | None:
        values = [s.server_cpu / s.tokens for s in self.samples if s.server_cpu is not None]
        return statistics.median(values) if values else None

    def paired_ratio(self, base: Series) -> float:
        """Median over rounds of this path's rate over the baseline's in the same round."""
        return statistics.median(a.rate / b.rate for a, b in zip(self.samples, base.samples, strict=True))

    def median_ttft(self) -> float | None:
        ttfts = [s.ttft for s in self.samples if s.ttft is not None]
        return statistics.median(ttfts) if ttfts else None


def say(msg: str) -> None:
    print(f"[bench_local_model] {msg}", file=sys.stderr, flush=True)


# -- the three paths -------------------------------------------------------------------------------------------


def raw_run(llama: Any, max_tokens: int) -> Sample:
    cpu = time.process_time()
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    for chunk in llama.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0.0,
        seed=SEED,
        repeat_penalty=DEFAULT_REPEAT_PENALTY,
        stream=True,
    ):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            if first is None:
                first = time.perf_counter()
            parts.append(text)
    ended = time.perf_counter()
    ttft = None if first is None else first - started
    return Sample(len(parts), ended - started, ttft, "".join(parts), gen_cpu=time.process_time() - cpu)


def settings_for(max_tokens: int) -> ModelSettings:
    return ModelSettings(max_tokens=max_tokens, temperature=0.0, seed=SEED)


def keel_sample(
    model: LocalModel, before: tuple[int | None, float], cpu: float, tokens: int, seconds: float, **kw: Any
) -> Sample:
    pid, child = child_cpu(model)
    gen_cpu = child - before[1] if pid is not None and pid == before[0] else math.nan  # nan: first call, or restart
    return Sample(tokens, seconds, gen_cpu=gen_cpu, server_cpu=time.process_time() - cpu, **kw)


async def keel_stream_run(model: LocalModel, max_tokens: int) -> Sample:
    first: float | None = None

    async def on_event(event: StreamEvent) -> None:
        nonlocal first
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter()

    before = child_cpu(model)
    cpu = time.process_time()
    started = time.perf_counter()
    resp = await stream_response(
        model, [Message(role="user", content=PROMPT)], on_event=on_event, settings=settings_for(max_tokens)
    )
    ended = time.perf_counter()
    ttft = None if first is None else first - started
    return keel_sample(model, before, cpu, resp.output_tokens, ended - started, ttft=ttft, text=resp.text)


class DurableContext:
    """A leased task on an in-memory store and a WorkflowContext over it, the way the engine runs a workflow."""

    def __init__(self) -> None:
        self.store = InMemoryStore()
        self.ctx: WorkflowContext | None = None
        self.calls = 0

    async def open(self) -> None:
        created = await self.store.create_task(
            NewTask(tenant="bench", workflow="bench-local", input={}, budget={}), None, time.time()
        )
        lease = await self.store.lease_next("bench-local", time.time(), 3600.0, 5)
        assert lease is not None and lease.task_id == created.task.id
        journal = StoreJournal(self.store, lease, time.time, lambda _: None)
        self.ctx = WorkflowContext(journal=journal, started_at=time.time(), clock=time.time)

    async def run(self, model: LocalModel, max_tokens: int) -> Sample:
        assert self.ctx is not None
        self.calls += 1
        before = child_cpu(model)
        cpu = time.process_time()
        started = time.perf_counter()
        text = await self.ctx.generate(f"gen-{self.calls}", model, PROMPT, settings=settings_for(max_tokens))
        ended = time.perf_counter()
        tokens = int(self.ctx.metadata["model_calls"][-1]["output_tokens"])
        return keel_sample(model, before, cpu, tokens, ended - started, ttft=None, text=str(text))

    async def token_events(self) -> int:
        assert self.ctx is not None
        events = await self.store.read(self.ctx.task_id, 0, limit=1_000_000)
        return sum(1 for e in events if e.type == "token")


# -- rounds ----------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    threads: tuple[int, int]
    raw: Series
    stream: Series
    durable: Series | None
    same_text: bool
    token_events: int = 0


def threads_of(model: LocalModel) -> tuple[int, int]:
    """The thread counts keel's child generates and reads the prompt with."""
    return model.worker.load.n_threads, model.worker.load.n_threads_batch


async def compare(model: LocalModel, llama: Any, runs: int, max_tokens: int, durable: bool) -> Comparison:
    threads = threads_of(model)
    raw, stream = Series("raw"), Series("keel stream")
    gen = Series("keel ctx.generate") if durable else None
    dctx = DurableContext()
    if durable:
        await dctx.open()
    # Warm-up: keel's child starts and loads the model; first prompt evaluation, code paths, allocator.
    raw_run(llama, max_tokens)
    await keel_stream_run(model, max_tokens)
    if durable:
        await dctx.run(model, max_tokens)
    for rnd in range(runs):
        order = ["raw", "stream", "durable"] if rnd % 2 == 0 else ["durable", "stream", "raw"]
        for which in order:
            if which == "raw":
                raw.samples.append(raw_run(llama, max_tokens))
            elif which == "stream":
                stream.samples.append(await keel_stream_run(model, max_tokens))
            elif gen is not None:
                gen.samples.append(await dctx.run(model, max_tokens))
        say(
            f"threads {threads[0]}/{threads[1]} round {rnd + 1}/{runs}: raw {raw.samples[-1].rate:.1f}, "
            f"stream {stream.samples[-1].rate:.1f}"
            + (f", ctx.generate {gen.samples[-1].rate:.1f}" if gen is not None else "")
            + " tok/s"
        )
    texts = {s.text for s in raw.samples} | {s.text for s in stream.samples}
    if gen is not None:
        texts |= {s.text for s in gen.samples}
    result = Comparison(threads, raw, stream, gen, same_text=len(texts) == 1)
    if durable:
        result.token_events = await dctx.token_events()
    return result


# -- cancellation ----------------------------------------------------------------------------------------------

COUNT = [Message(role="user", content="Count from 1 to 1000, one number per line.")]
LONG = ModelSettings(max_tokens=4000, temperature=0.0, extra={"repeat_penalty": 1.0})
ONE = ModelSettings(max_tokens=1, temperature=0.0, extra={"repeat_penalty": 1.0})


@dataclass
class Cancelled:
    done_s: float
    """From ``cancel()`` to the cancelled task done: keel's stream waits for the child to say it stopped."""
    next_token_s: float
    """From ``cancel()`` to the first token of a request sent at that moment (queued in the child behind it)."""
    seen: int
    """Tokens the consumer had when it was cancelled."""
    drawn: int | None
    """Pieces the child drew from llama.cpp for the cancelled request in all (None if not told apart)."""


async def first_token(model: LocalModel) -> float:
    """When the first token of a one-token request on the counting prompt arrives (its KV cache prefix is warm)."""
    first = math.nan
    async for event in model.stream(COUNT, settings=ONE):
        if isinstance(event, TextDelta) and math.isnan(first):
            first = time.perf_counter()
    return first


async def cancellation(model: LocalModel, runs: int) -> tuple[list[Cancelled], float]:
    """Cancel a long generation after 5 tokens, ``runs`` times. Also (seconds, median of 3) the one-token request's
    first token on an idle child whose KV cache is left as a cancel leaves it (the prompt and a few tokens, from a
    short generation run to its end), to set the queued request's figure against."""
    alone = []
    for _ in range(3):
        await model.request(COUNT, settings=ModelSettings(max_tokens=6, temperature=0.0, extra=LONG.extra))
        started = time.perf_counter()
        alone.append(await first_token(model) - started)
    out = []
    for _ in range(runs):
        seen = 0
        several = asyncio.Event()

        async def consume(several: asyncio.Event) -> None:
            nonlocal seen
            async for event in model.stream(COUNT, settings=LONG):
                if isinstance(event, TextDelta):
                    seen += 1
                    if seen == 5:
                        several.set()

        before = model.worker.tokens_generated
        task = asyncio.create_task(consume(several))
        await several.wait()
        cancelled = time.perf_counter()
        task.cancel()
        follow = asyncio.create_task(first_token(model))
        with contextlib.suppress(asyncio.CancelledError):
            await task
        done = time.perf_counter()
        # The count is summed as each request ends; the queued request's end cannot have come yet unless it is done.
        drawn = None if follow.done() else model.worker.tokens_generated - before
        first = await follow
        out.append(Cancelled(done - cancelled, first - cancelled, seen, drawn))
        say(f"cancelled after {seen} tokens: done in {(done - cancelled) * 1000:.0f} ms, drawn {drawn}")
    return out, statistics.median(alone)


# -- threads ---------------------------------------------------------------------------------------------------


def open_llama(path: Path, n_ctx: int, threads: tuple[int, int]) -> Any:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads[0], n_threads_batch=threads[1], verbose=False
    )


def beside_busy_process(llamas: dict[tuple[int, int], Any], runs: int, max_tokens: int) -> dict[str, float]:
    """Raw tokens/s per thread setting while another process keeps one core busy (a Python busy loop)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        rates: dict[tuple[int, int], list[float]] = {t: [] for t in llamas}
        for rnd in range(runs):
            order = list(llamas) if rnd % 2 == 0 else list(reversed(llamas))
            for threads in order:
                rates[threads].append(raw_run(llamas[threads], max_tokens).rate)
            say(
                f"beside a busy process, round {rnd + 1}/{runs}: "
                + ", ".join(f"{t}: {r[-1]:.1f}" for t, r in rates.items())
            )
    finally:
        busy.terminate()
        busy.wait()
    return {f"{t[0]}/{t[1]}": statistics.median(r) for t, r in rates.items()}


async def bench(runs: int, max_tokens: int, threads_part: bool = True) -> dict[str, Any]:
    load = os.getloadavg()
    started = time.perf_counter()
    model = LocalModel.load(NAME)
    load_s = time.perf_counter() - started
    spec = model.spec
    threads = threads_of(model)
    assert threads == default_threads()
    started = time.perf_counter()
    llamas = {threads: open_llama(spec.path, model.context_window, threads)}
    raw_load_s = time.perf_counter() - started
    say(f"keel opened {model.model_id} in {load_s:.2f} s (vocabulary), llama-cpp-python in {raw_load_s:.2f} s")
    main = await compare(model, llamas[threads], runs, max_tokens, durable=True)
    say(f"keel's child (pid {model.worker.pid}) loaded the model in {model.worker.start_seconds:.2f} s")
    cancels, alone = await cancellation(model, 7)
    child = {
        "pid": model.worker.pid,
        "starts": model.worker.starts,
        "start_s": model.worker.start_seconds,
        "tokens_generated": model.worker.tokens_generated,
    }
    model.close()

    cores = len(os.sched_getaffinity(0))
    all_threads = (cores, cores)
    alt: Comparison | None = None
    busy: dict[str, float] = {}
    if threads_part and all_threads != threads:
        # Another name for the same file, so LocalModel.load gives a second model with its own child.
        wide = LocalModel.load(str(spec.path), n_threads=cores)
        assert threads_of(wide) == all_threads
        llamas[all_threads] = open_llama(spec.path, model.context_window, all_threads)
        alt = await compare(wide, llamas[all_threads], runs, max_tokens, durable=False)
        wide.close()
        busy = beside_busy_process(llamas, max(3, runs // 3), max_tokens)
    return {
        "main": main,
        "alt": alt,
        "busy": busy,
        "cancel": cancels,
        "cancel_alone_s": alone,
        "child": child,
        "load_s": load_s,
        "raw_load_s": raw_load_s,
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "model_id": model.model_id,
        "n_ctx": model.context_window,
        "runs": runs,
        "max_tokens": max_tokens,
        "threads_skipped": not threads_part,
    }


# -- the report ------------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = cpu_model()
    return (
        f"nproc={os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu}; Python {platform.python_version()} "
        f"on {platform.system()} {platform.release()}; llama-cpp-python {llama_cpp.__version__}"
    )


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.001 else f"{seconds * 1000:.1f} ms"


def rows_for(c: Comparison) -> list[list[str]]:
    base = c.raw.median_rate()
    rows = []
    for s in (c.raw, c.stream, c.durable):
        if s is None:
            continue
        rates = s.rates()
        ttft = s.median_ttft()
        rows.append(
            [
                f"{c.threads[0]} / {c.threads[1]}",
                s.label,
                f"{statistics.median(x.tokens for x in s.samples):.0f}",
                f"**{s.median_rate():.1f}**",
                f"{min(rates):.1f}–{max(rates):.1f}",
                "—" if ttft is None else f"{ttft * 1000:.0f} ms",
                duration(s.gen_cpu_per_token()),
                duration(s.server_cpu_per_token()),
                "1.00×" if s is c.raw else f"{s.median_rate() / base:.3f}×",
                "—" if s is c.raw else f"{s.paired_ratio(c.raw):.3f}×",
            ]
        )
    return rows


def render(r: dict[str, Any], elapsed: float, command: str, note: str) -> str:
    main: Comparison = r["main"]
    alt: Comparison | None = r["alt"]
    child: dict[str, Any] = r["child"]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = rows_for(main) + (rows_for(alt) if alt else [])
    ratio = main.stream.median_rate() / main.raw.median_rate()
    durable_ratio = main.durable.median_rate() / main.raw.median_rate() if main.durable else float("nan")
    paired = main.stream.paired_ratio(main.raw)
    durable_paired = main.durable.paired_ratio(main.raw) if main.durable else float("nan")
    server_us = (main.stream.server_cpu_per_token() or math.nan) * 1e6
    durable_us = (main.durable.server_cpu_per_token() or math.nan) * 1e6 if main.durable else math.nan
    child_ms = main.stream.gen_cpu_per_token() * 1000
    raw_cpu_ms = main.raw.gen_cpu_per_token() * 1000
    token_ms = 1000 / main.raw.median_rate()
    raw_ttft, keel_ttft = main.raw.median_ttft(), main.stream.median_ttft()
    cancels: list[Cancelled] = r["cancel"]
    done = [c.done_s for c in cancels]
    nxt = [c.next_token_s for c in cancels]
    drawn = [c.drawn for c in cancels if c.drawn is not None]
    seen = statistics.median(c.seen for c in cancels)
    before, after = r["loadavg_before"], r["loadavg_after"]
    calls = len(main.durable.samples) + 1 if main.durable else 1  # the warm-up call logged its tokens too
    shared = f"the machine is shared; {note}" if note else "the machine is shared"
    parts = [
        START_MARK,
        "## Embedded model: tokens/s through keel vs llama-cpp-python (`bench/bench_local_model.py`)",
        "",
        f"Generated by `{command}` on {stamp} in {elapsed:.0f} s.",
        "",
        f"**Machine:** {machine()}. Load average {before[0]:.2f} before the run, {after[0]:.2f} after ({shared}; "
        "every round runs all paths back to back, in alternating order).",
        "",
        f"**Model:** `local:{NAME}` = `{r['model_id']}`, n_ctx {r['n_ctx']}. keel's `LocalModel.load` opened the "
        f"vocabulary in {r['load_s']:.2f} s; its child process loaded the weights in {child['start_s']:.2f} s on "
        f"the first call (the warm-up) and "
        + (
            "served every keel call of the main rounds and the cancellations without a restart (`worker.starts` = 1)"
            if child["starts"] == 1
            else f"was started {child['starts']} times (`worker.starts`): it died and keel started it again"
        )
        + f"; the baseline `Llama` loaded in this process in "
        f"{r['raw_load_s']:.2f} s. Greedy, seed {SEED}, repeat penalty {DEFAULT_REPEAT_PENALTY}, max_tokens "
        f"{r['max_tokens']}, median of {r['runs']} rounds after a warm-up.",
        "",
        table(
            [
                "threads (gen / prompt)",
                "path",
                "tokens",
                "tokens/s (median)",
                "range",
                "first token",
                "CPU per token, generating process",
                "CPU per token, keel's process",
                "vs raw (medians)",
                "vs raw (median of per-round ratios)",
            ],
            rows,
        ),
        "",
        table(
            ["target", "wanted", "measured", "verdict"],
            [
                [
                    "keel stream / raw llama-cpp-python, tokens/s",
                    f"≥ {TARGET}×",
                    f"{paired:.3f}× (ratio of medians {ratio:.3f}×)",
                    "met" if paired >= TARGET else "**missed**",
                ],
                [
                    "keel `ctx.generate` (durable step, token log) / raw",
                    f"≥ {TARGET}×",
                    f"{durable_paired:.3f}× (ratio of medians {durable_ratio:.3f}×)",
                    "met" if durable_paired >= TARGET else "**missed**",
                ],
            ],
        ),
        "",
        f"- **Same output.** All paths produced {'the same text' if main.same_text else 'DIFFERENT texts'} "
        f"(greedy decoding, same layout){'' if alt is None or alt.same_text else '; the all-cores runs did not'}. "
        f"The `ctx.generate` task's log holds {main.token_events} `token` events "
        f"({main.token_events / calls:.0f} per call: one per token, committed in batches).",
        "- **Where keel's time goes.** Tokens are generated in keel's child process (`local_worker`, llama.cpp in a "
        "thread of its own there), each sent as a JSON line on the child's stdout pipe, read by a thread of keel's "
        "process and handed to the event loop (`call_soon_threadsafe`). The child spent "
        f"{child_ms:.1f} ms of CPU per token against {raw_cpu_ms:.1f} ms for llama-cpp-python in this process (the "
        "child's extra, a line written per token by its generating thread, is inside that figure); keel's own "
        f"process spent {server_us:.0f} µs per token on a `stream()` call (event loop and pipe threads) and "
        f"{durable_us:.0f} µs on `ctx.generate` with its token log, beside generation, on the core llama.cpp leaves "
        f"free. A raw token took {token_ms:.1f} ms of wall time"
        + (
            f" for those {raw_cpu_ms:.1f} ms of CPU: for the rest, {max(0.0, token_ms - raw_cpu_ms):.1f} ms, the "
            "one generating thread was off the CPU, waiting for a core"
            if main.threads[0] == 1
            else ""
        )
        + (
            f". keel's first token came {keel_ttft * 1000:.0f} ms after the call against "
            f"{raw_ttft * 1000:.0f} ms for raw (keel's includes the request's trip over the pipe and the child "
            "laying out and counting the prompt). "
            if keel_ttft is not None and raw_ttft is not None
            else ". "
        )
        + "Single rounds vary widely on this shared machine, so the targets are judged on the median of per-round "
        "ratios (each keel run over the raw run beside it, which drifts with it); the ratio of medians is shown "
        "too.",
    ]
    if alt is not None:
        alt_ratio = alt.stream.paired_ratio(alt.raw)
        busy = r["busy"]
        mine, wide = f"{main.threads[0]}/{main.threads[1]}", f"{alt.threads[0]}/{alt.threads[1]}"
        parts.append(
            f"- **Threads.** Generating on all {alt.threads[0]} cores (keel's default before the thread count was "
            f"measured here), raw llama-cpp-python made {alt.raw.median_rate():.1f} tokens/s and keel (a second "
            f"`LocalModel`, its child on {alt.threads[0]} threads) {alt.stream.median_rate():.1f} ({alt_ratio:.3f}× "
            f"per round), against {main.raw.median_rate():.1f} on {main.threads[0]} thread(s), the shared machine's "
            f"own load aside. Beside one busy process (a Python busy loop, started by this script), raw made "
            f"{busy.get(wide, float('nan')):.1f} tokens/s on {alt.threads[0]} threads against "
            f"{busy.get(mine, float('nan')):.1f} on {main.threads[0]}. llama.cpp's threads meet at a barrier at every "
            "step, so one preempted thread stalls them all. keel therefore generates on the usable cores but one "
            "(and reads the prompt on all of them): a bounded loss on an idle machine against a collapse on a busy "
            "one. `KEEL_LOCAL_THREADS` sets both counts on a machine dedicated to the model."
        )
    elif r["threads_skipped"]:
        parts.append(
            "- **Threads.** Not measured in this run (`--skip-threads`: no all-cores or busy-process rounds). keel "
            f"generates on the usable cores but one ({main.threads[0]} here) and reads the prompt on all of them, "
            "because llama.cpp's threads meet at a barrier at every step and one preempted thread stalls them all; "
            "see `default_threads` in `keel/orchestration/llm/models/local.py`. `KEEL_LOCAL_THREADS` sets both counts "
            "on a machine dedicated to the model."
        )
    parts += [
        f"- **Cancellation.** Cancelling a `stream()` consumer after {seen:.0f} tokens of a 4,000-token generation, "
        f"{len(cancels)} times: keel sends the child a cancel, which it checks before every token, and the "
        f"cancelled task finished once the child said it had stopped, {statistics.median(done) * 1000:.0f} ms "
        f"after `cancel()` (median; max {max(done) * 1000:.0f} ms)"
        + (
            f", the child having drawn {statistics.median(drawn):.0f} pieces from llama.cpp for that request in all "
            f"(median; max {max(drawn)}; the first piece is the reply's role, no text)"
            if drawn
            else ""
        )
        + ". A one-token request on the same prompt, sent at the moment of cancelling and queued in the child "
        f"behind the cancelled one, had its token {statistics.median(nxt) * 1000:.0f} ms after `cancel()` (max "
        f"{max(nxt) * 1000:.0f} ms), against {r['cancel_alone_s'] * 1000:.0f} ms for the same request on an idle "
        "child whose cache a finished 6-token generation of that prompt had left in the same state.",
        END_MARK,
    ]
    return "\n".join(parts)


def write_doc(section: str) -> None:
    write_section(section, START_MARK, END_MARK, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds per comparison (median over them)")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--note", default="", help="added to the section's line on the machine's conditions")
    parser.add_argument("--skip-threads", action="store_true", help="leave out the all-cores and busy-process runs")
    parser.add_argument("--no-doc", action="store_true", help=f"print the section, do not rewrite {DOC.name}")
    args = parser.parse_args()
    shown = [f"--runs={args.runs}"] if args.runs != parser.get_default("runs") else []
    shown += [f"--max-tokens={args.max_tokens}"] if args.max_tokens != parser.get_default("max_tokens") else []
    shown += ["--skip-threads"] if args.skip_threads else []
    command = shlex.join([".venv/bin/python", "bench/bench_local_model.py", *shown])
    started = time.monotonic()
    report = asyncio.run(bench(args.runs, args.max_tokens, threads_part=not args.skip_threads))
    section = render(report, time.monotonic() - started, command, args.note)
    print(section)
    if not args.no_doc:
        write_doc(section)
        say(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
