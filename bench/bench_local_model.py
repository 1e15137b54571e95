"""Tokens/s of the embedded model through keel against llama-cpp-python on its own; writes its figures into
docs/benchmarks.md (between the ``bench_local_model`` markers).

Run: ``.venv/bin/python bench/bench_local_model.py`` (about 4 minutes on 2 cores; ``--runs N``, ``--max-tokens N``,
``--no-doc`` to print without rewriting the doc).

Same GGUF (SmolLM2-135M-Instruct Q4_1, ``local:smollm2``), same prompt, same chat layout, same sampling (greedy:
temperature 0, fixed seed, repeat penalty 1.1 — keel's default — and llama-cpp-python's top-k/top-p/min-p
defaults), same ``max_tokens``, same ``n_ctx`` and threads. keel's ``LocalModel`` loads its own ``Llama``; the
baseline is a second ``Llama`` on the same file. Paths measured, alternating in every round (the order flips each
round), after one warm-up each:

- **raw**: ``Llama.create_chat_completion(stream=True)`` iterated in the calling thread, counting chunks with text.
- **keel stream**: ``stream_response(LocalModel, ...)``: generation in keel's worker thread, every token handed to
  the event loop and to an ``on_event`` callback.
- **keel ctx.generate**: a durable model step on a ``WorkflowContext`` over ``InMemoryStore`` (leased task,
  ``StoreJournal``): the same stream, plus a ``token`` event per token into the task's log, the checkpoint and
  the envelope record.

tokens/s = output tokens / seconds from the call to the end of the stream (prompt evaluation included; the prompt
is the same each time, so after the warm-up llama.cpp reuses its KV cache for all but one of its tokens on every
path alike). Figures are medians over the rounds; the ratio to raw is judged as the median of per-round ratios,
which the machine's drift (a shared 2-core VM) moves far less than the medians themselves. Then: with all cores
generating (the previous default) instead of all but one, and how long a cancelled call takes to free the model's
thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
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
from keel.orchestration.context import WorkflowContext
from keel.orchestration.models import Message, ModelSettings, StreamEvent, TextDelta, stream_response
from keel.orchestration.models.local import DEFAULT_REPEAT_PENALTY, LocalModel, default_threads, resolve
from keel.orchestration.runtime import StoreJournal
from keel.testing.inmemory import InMemoryStore

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- bench_local_model:start -->", "<!-- bench_local_model:end -->"

NAME = "smollm2"
PROMPT = "Explain, in a few paragraphs, the main risks of a fixed-price supplier contract for the buyer."
SEED = 1234
TARGET = 0.95


@dataclass
class Sample:
    tokens: int
    seconds: float
    ttft: float | None
    text: str
    loop_cpu: float = 0.0
    """CPU seconds of the calling (event-loop) thread over the call: for keel, its share on top of the worker."""

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

    def loop_cpu_per_token(self) -> float:
        return statistics.median(s.loop_cpu / s.tokens for s in self.samples)

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
    return Sample(len(parts), ended - started, ttft, "".join(parts))


def settings_for(max_tokens: int) -> ModelSettings:
    return ModelSettings(max_tokens=max_tokens, temperature=0.0, seed=SEED)


async def keel_stream_run(model: LocalModel, max_tokens: int) -> Sample:
    first: float | None = None

    async def on_event(event: StreamEvent) -> None:
        nonlocal first
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter()

    cpu = time.thread_time()
    started = time.perf_counter()
    resp = await stream_response(
        model, [Message(role="user", content=PROMPT)], on_event=on_event, settings=settings_for(max_tokens)
    )
    ended = time.perf_counter()
    ttft = None if first is None else first - started
    return Sample(resp.output_tokens, ended - started, ttft, resp.text, time.thread_time() - cpu)


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
        cpu = time.thread_time()
        started = time.perf_counter()
        text = await self.ctx.generate(f"gen-{self.calls}", model, PROMPT, settings=settings_for(max_tokens))
        ended = time.perf_counter()
        tokens = int(self.ctx.metadata["model_calls"][-1]["output_tokens"])
        return Sample(tokens, ended - started, None, str(text), time.thread_time() - cpu)

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


async def compare(
    model: LocalModel, llama: Any, runs: int, max_tokens: int, durable: bool, threads: tuple[int, int]
) -> Comparison:
    raw, stream = Series("raw"), Series("keel stream")
    gen = Series("keel ctx.generate") if durable else None
    dctx = DurableContext()
    if durable:
        await dctx.open()
    # Warm-up: first prompt evaluation, grammar-free code paths, allocator.
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


async def cancellation(model: LocalModel, runs: int) -> list[tuple[float, float, int]]:
    """(seconds from cancel to the task done, seconds from cancel to the worker thread free, tokens seen)."""
    out = []
    settings = ModelSettings(max_tokens=4000, temperature=0.0, extra={"repeat_penalty": 1.0})
    messages = [Message(role="user", content="Count from 1 to 1000, one number per line.")]
    for _ in range(runs):
        seen = 0
        several = asyncio.Event()

        async def consume(several: asyncio.Event) -> None:
            nonlocal seen
            async for event in model.stream(messages, settings=settings):
                if isinstance(event, TextDelta):
                    seen += 1
                    if seen == 5:
                        several.set()

        task = asyncio.create_task(consume(several))
        await several.wait()
        cancelled = time.perf_counter()
        task.cancel()
        probe = model._thread.submit(time.perf_counter)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        done = time.perf_counter()
        free = await asyncio.wrap_future(probe)
        out.append((done - cancelled, free - cancelled, seen))
    return out


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


async def bench(runs: int, max_tokens: int) -> dict[str, Any]:
    load = os.getloadavg()
    started = time.perf_counter()
    model = LocalModel.load(NAME)
    load_s = time.perf_counter() - started
    spec = resolve(NAME)
    threads = (model._llama.n_threads, model._llama.n_threads_batch)
    assert threads == default_threads()
    say(f"keel loaded {model.model_id} in {load_s:.2f} s; threads {threads}")
    llamas = {threads: open_llama(spec.path, model.context_window, threads)}
    main = await compare(model, llamas[threads], runs, max_tokens, durable=True, threads=threads)

    cores = os.cpu_count() or 2
    all_threads = (cores, cores)
    alt: Comparison | None = None
    busy: dict[str, float] = {}
    if all_threads != threads:
        wide = LocalModel(spec, open_llama(spec.path, model.context_window, all_threads), NAME)
        llamas[all_threads] = open_llama(spec.path, model.context_window, all_threads)
        alt = await compare(wide, llamas[all_threads], runs, max_tokens, durable=False, threads=all_threads)
        del wide
        busy = beside_busy_process(llamas, max(3, runs // 3), max_tokens)
    cancels = await cancellation(model, 7)
    return {
        "main": main,
        "alt": alt,
        "busy": busy,
        "cancel": cancels,
        "load_s": load_s,
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "model_id": model.model_id,
        "n_ctx": model.context_window,
        "runs": runs,
        "max_tokens": max_tokens,
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
                f"{statistics.median(x.tokens for x in s.samples)}",
                f"**{s.median_rate():.1f}**",
                f"{min(rates):.1f}–{max(rates):.1f}",
                "—" if ttft is None else f"{ttft * 1000:.0f} ms",
                "—" if s is c.raw else f"{s.loop_cpu_per_token() * 1e6:.0f} µs",
                "1.00×" if s is c.raw else f"{s.median_rate() / base:.3f}×",
                "—" if s is c.raw else f"{s.paired_ratio(c.raw):.3f}×",
            ]
        )
    return rows


def render(r: dict[str, Any], elapsed: float) -> str:
    main: Comparison = r["main"]
    alt: Comparison | None = r["alt"]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = rows_for(main) + (rows_for(alt) if alt else [])
    ratio = main.stream.median_rate() / main.raw.median_rate()
    durable_ratio = main.durable.median_rate() / main.raw.median_rate() if main.durable else float("nan")
    paired = main.stream.paired_ratio(main.raw)
    durable_paired = main.durable.paired_ratio(main.raw) if main.durable else float("nan")
    loop_us = main.stream.loop_cpu_per_token() * 1e6
    durable_us = main.durable.loop_cpu_per_token() * 1e6 if main.durable else 0.0
    token_ms = 1000 / main.raw.median_rate()
    cancels = r["cancel"]
    done = [c[0] for c in cancels]
    free = [c[1] for c in cancels]
    before, after = r["loadavg_before"], r["loadavg_after"]
    calls = len(main.durable.samples) + 1 if main.durable else 1  # the warm-up call logged its tokens too
    parts = [
        START_MARK,
        "## Embedded model: tokens/s through keel vs llama-cpp-python (`bench/bench_local_model.py`)",
        "",
        f"Generated by `.venv/bin/python bench/bench_local_model.py` on {stamp} in {elapsed:.0f} s.",
        "",
        f"**Machine:** {machine()}. Load average {before[0]:.2f} before the run, {after[0]:.2f} after (the "
        "machine is shared; every round runs all paths back to back, in alternating order).",
        "",
        f"**Model:** `local:{NAME}` = `{r['model_id']}`, n_ctx {r['n_ctx']}, loaded by keel in {r['load_s']:.2f} s. "
        f"Greedy, seed {SEED}, repeat penalty {DEFAULT_REPEAT_PENALTY}, max_tokens {r['max_tokens']}, "
        f"median of {r['runs']} rounds after a warm-up.",
        "",
        table(
            [
                "threads (gen / prompt)",
                "path",
                "tokens",
                "tokens/s (median)",
                "range",
                "first token",
                "event-loop CPU per token",
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
        "- **Where keel's time goes.** Tokens are produced in keel's worker thread and handed to the event loop one "
        f"by one (`call_soon_threadsafe`). The event loop's side costs {loop_us:.0f} µs of CPU per token for "
        f"`stream()` and {durable_us:.0f} µs for `ctx.generate` with its token log, against {token_ms:.1f} ms per "
        "token of generation, and it runs on the core llama.cpp leaves free, so generation does not wait for it. "
        "Single rounds vary by ±15% on this shared machine, so the targets are judged on the median of per-round "
        "ratios (each keel run over the raw run beside it, which drifts with it); the ratio of medians is shown "
        "too.",
    ]
    if alt is not None:
        alt_ratio = alt.stream.paired_ratio(alt.raw)
        busy = r["busy"]
        mine, wide = f"{main.threads[0]}/{main.threads[1]}", f"{alt.threads[0]}/{alt.threads[1]}"
        parts.append(
            f"- **Threads.** Generating on all {alt.threads[0]} cores (keel's default before this benchmark), raw "
            f"llama-cpp-python made {alt.raw.median_rate():.1f} tokens/s and keel {alt.stream.median_rate():.1f} "
            f"({alt_ratio:.3f}× per round): faster than on {main.threads[0]} thread(s) "
            f"({main.raw.median_rate():.1f}), the shared machine's own load aside. Beside one busy process (a "
            f"Python busy loop, started by this script) it is the other way round: raw "
            f"{busy.get(wide, float('nan')):.1f} "
            f"tokens/s on {alt.threads[0]} threads against {busy.get(mine, float('nan')):.1f} on "
            f"{main.threads[0]}. llama.cpp's threads meet at a barrier at every step, so one preempted thread stalls "
            "them all. keel therefore generates on the usable cores but one (and reads the prompt on all of them): "
            "a bounded loss on an idle machine against a collapse on a busy one. `KEEL_LOCAL_THREADS` sets both "
            "counts on a machine dedicated to the model."
        )
    parts += [
        f"- **Cancellation.** Cancelling a `stream()` consumer after 5 tokens of a 4,000-token generation, "
        f"{len(cancels)} times: the cancelled task finished {statistics.median(done) * 1000:.0f} ms after "
        f"`cancel()` (median; max {max(done) * 1000:.0f} ms), and a job queued on the model's worker thread at the "
        f"moment of cancelling started {statistics.median(free) * 1000:.0f} ms after it (max "
        f"{max(free) * 1000:.0f} ms): the thread checks the stop flag before every token.",
        END_MARK,
    ]
    return "\n".join(parts)


def write_doc(section: str) -> None:
    write_section(section, START_MARK, END_MARK, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds per comparison (median over them)")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--no-doc", action="store_true", help=f"print the section, do not rewrite {DOC.name}")
    args = parser.parse_args()
    started = time.monotonic()
    report = asyncio.run(bench(args.runs, args.max_tokens))
    section = render(report, time.monotonic() - started)
    print(section)
    if not args.no_doc:
        write_doc(section)
        say(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
