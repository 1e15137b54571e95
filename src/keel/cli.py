"""The ``keel`` command: serve the API, manage keys, and act as a client of a running server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

if TYPE_CHECKING:  # imported when a command needs it: `keel --help` stays fast
    from keel.settings import Settings

app = typer.Typer(help="keel: a durable runtime for LLM-native REST APIs.", no_args_is_help=True)
tasks_app = typer.Typer(help="Inspect, cancel and approve tasks on a running server.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys (works directly on the data dir).", no_args_is_help=True)
tools_app = typer.Typer(help="The tools a running server offers.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(keys_app, name="keys")
app.add_typer(tools_app, name="tools")
memory_app = typer.Typer(help="Vector memory on a running server: spaces, search, re-embedding.", no_args_is_help=True)
documents_app = typer.Typer(help="Ingest documents into vector memory on a running server.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
app.add_typer(documents_app, name="documents")

WAITING_EXIT = 3
"""Exit status of `submit` and `tasks approve` when the task stopped to wait for a person's decision."""

err = Console(stderr=True)
out = Console()

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="State directory (default ./.keel).")]
Url = Annotated[str, typer.Option("--url", envvar="KEEL_URL", help="Base URL of a keel server.")]
ApiKeyOpt = Annotated[str, typer.Option("--api-key", envvar="KEEL_API_KEY", help="Bearer API key.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _settings(data_dir: Path | None, **overrides: Any) -> Settings:
    from keel.settings import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (loopback by default).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    data_dir: DataDir = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level (keel's own: KEEL_LOG_LEVEL).")] = "info",
    role: Annotated[
        str,
        typer.Option(
            help="all: the API and the workers in this process (the embedded default); api: the API only, with "
            "`keel worker` processes working the queue of a shared store (KEEL_STORE_URL=postgresql://…)."
        ),
    ] = "all",
) -> None:
    """Serve the HTTP API, with the runtime in-process unless --role api."""
    import signal

    import uvicorn

    from keel.app import create_app
    from keel.interaction.server import guarded

    if role not in ("all", "api"):
        _fail(f"--role must be all or api, not {role!r} (workers run with `keel worker`)", 2)
    settings = _start_settings(data_dir, host=host, port=port)

    async def run() -> None:
        app = create_app(settings, role="api" if role == "api" else "all")
        # The app starts here rather than in uvicorn's lifespan, which would print a start-up failure as a
        # traceback: the store, the engine and the models are up before the socket opens.
        async with app.router.lifespan_context(app):
            config = uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=log_level,
                log_config=None,
                lifespan="off",
                # Slow clients: deadlines for reading a request (uvicorn has none), a cap on connections.
                http=guarded(
                    header_timeout_s=settings.http_header_timeout_s,
                    body_timeout_s=settings.http_body_timeout_s,
                    max_header_bytes=settings.http_max_header_bytes,
                ),
                limit_concurrency=settings.http_max_connections,
                timeout_keep_alive=settings.http_keep_alive_s,
            )
            # uvicorn raises the signal that stopped it again once it has, which must not cut the app's close short.
            previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                await uvicorn.Server(config).serve()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    _start(run)


@app.command()
def worker(data_dir: DataDir = None) -> None:
    """Run tasks, webhooks and emails from a shared store (KEEL_STORE_URL=postgresql://…), without HTTP; as many
    as you like, on any machines. Stops gracefully on SIGTERM or Ctrl-C: in-flight runs go back to the queue."""
    import logging
    import signal

    from keel.app import redacted, registry_for, running

    settings = _start_settings(data_dir)
    log = logging.getLogger("keel.worker")

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with running(settings, registry_for(settings), role="worker"):
            log.info("keel worker %d is working the queue of %s", os.getpid(), redacted(settings.resolved_store_url))
            await stop.wait()
        log.info("keel worker stopped")

    _start(work)


def _start_settings(data_dir: Path | None, **overrides: Any) -> Settings:
    """The settings of a long-running command, and logging configured from them; a bad setting is one line."""
    from pydantic import ValidationError

    from keel import logs

    try:
        settings = _settings(data_dir, **overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        _fail(f"bad setting: {problems}", 2)
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _start(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a long-running command. A failure to start (a data dir in use, missing weights, an unreachable store)
    is one line on stderr and exit status 1, never a traceback; the traceback goes to the log at DEBUG."""
    import logging

    from keel.errors import KeelError

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except KeelError as exc:
        logging.getLogger("keel").debug("start-up failed", exc_info=exc)
        _fail(_one_line(exc.message))
    except Exception as exc:
        logging.getLogger("keel").debug("start-up failed", exc_info=exc)
        _fail(_one_line(f"keel stopped: {type(exc).__name__}: {exc} (KEEL_LOG_LEVEL=DEBUG logs the traceback)"))


def _one_line(message: str) -> str:
    return " ".join(message.split())


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant that owns the key's tasks.")],
    scopes: Annotated[
        str,
        typer.Option(
            help="Comma-separated: tasks:read, tasks:write, tasks:approve, tools:net, tools:email, metrics, admin."
        ),
    ] = "tasks:read,tasks:write,tasks:approve,tools:net",
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it on stdout (and nothing else). It is shown only once."""
    from keel.backends import open_store
    from keel.interaction.auth import SCOPES

    wanted = frozenset(s.strip() for s in scopes.split(",") if s.strip())
    unknown = wanted - SCOPES
    if unknown or not wanted:
        _fail(f"unknown or empty scopes {sorted(unknown)}; choose from {sorted(SCOPES)}", 2)
    if not tenant.strip():
        _fail("--tenant must not be empty", 2)
    settings = _settings(data_dir)

    async def create() -> str:
        store = open_store(settings.resolved_store_url)
        try:
            return await store.create_key(tenant.strip(), wanted, time.time())
        finally:
            await store.aclose()

    print(asyncio.run(create()))


def _client(url: str, api_key: str) -> httpx.Client:
    if not api_key:
        _fail("no API key: pass --api-key or set KEEL_API_KEY (create one with `keel keys create`)", 2)
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)


def _call(client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        response = client.request(method, path, **kw)
    except httpx.ConnectError:
        _fail(f"cannot reach keel at {client.base_url}: is `keel serve` running?")
    except httpx.HTTPError as exc:
        _fail(f"request to {client.base_url} failed: {exc}")
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail") or body.get("title")
            # RFC 9457 extension members (``errors[]`` with JSON pointers, ``known`` workflows, …) sit at the top.
            standard = ("type", "title", "status", "detail", "instance")
            extra = body.get("errors") or {k: v for k, v in body.items() if k not in standard} or None
        except ValueError:
            detail, extra = response.text[:300], None
        _fail(f"HTTP {response.status_code}: {detail}" + (f"\n{json.dumps(extra, indent=2)}" if extra else ""))
    return response


@app.command()
def submit(
    workflow: Annotated[str, typer.Argument(help="Workflow name, e.g. diagnostic.")],
    input: Annotated[str, typer.Option("--input", "-i", help="JSON input, or @file.json.")] = "{}",
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
    idempotency_key: Annotated[str | None, typer.Option(help="Idempotency-Key header.")] = None,
    follow: Annotated[bool, typer.Option(help="Follow the event stream until the task ends.")] = True,
    max_steps: Annotated[int | None, typer.Option(help="Budget: durable steps.")] = None,
    max_tool_calls: Annotated[int | None, typer.Option(help="Budget: tool calls (server default 20).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget: model tokens.")] = None,
    max_cost_usd: Annotated[float | None, typer.Option(help="Budget: model spend in USD.")] = None,
    deadline_s: Annotated[float | None, typer.Option(help="Budget: wall-clock seconds from submission.")] = None,
    tool: Annotated[
        list[str] | None, typer.Option("--tool", help="Allow only these tools (repeatable; see `keel tools list`).")
    ] = None,
    approve_writes: Annotated[
        bool, typer.Option("--approve-every-write", help="Every write tool call waits for a person's approval.")
    ] = False,
    document: Annotated[
        list[str] | None,
        typer.Option(
            "--document",
            "-d",
            help="A file to upload first (its id joins input.documents), or a URL the task fetches itself "
            "(repeatable).",
        ),
    ] = None,
) -> None:
    """Submit a task, follow its stream with a live progress bar, then print the envelope.

    Exits 1 when the task failed, and 3 when it stopped to wait for a person's approval (the command to answer
    is printed; `keel tasks approve` resumes it)."""
    raw = Path(input[1:]).read_text() if input.startswith("@") else input
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"--input is not valid JSON: {exc}", 2)
    except OSError as exc:
        _fail(f"cannot read --input file: {exc}", 2)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    budget = {
        k: v
        for k, v in {
            "max_steps": max_steps,
            "max_tool_calls": max_tool_calls,
            "max_tokens": max_tokens,
            "max_cost_usd": max_cost_usd,
            "deadline_s": deadline_s,
        }.items()
        if v is not None
    }
    body: dict[str, Any] = {"workflow": workflow, "input": payload, **({"budget": budget} if budget else {})}
    if tool:
        body["tools"] = tool
    if approve_writes:
        body["approval"] = "always"
    with _client(url, api_key) as client:
        if document:
            if not isinstance(payload, dict):
                _fail("--document needs --input to be a JSON object", 2)
            refs = [d if d.startswith(("http://", "https://")) else _ingest(client, d, None)["id"] for d in document]
            payload["documents"] = [*payload.get("documents", []), *refs]
            client.timeout = httpx.Timeout(30)
        accepted = _call(client, "POST", "/v1/tasks", json=body, headers=headers)
        task = accepted.json()
        err.print(f"[bold]submitted[/] {task['id']} ({task['status']})")
        if not follow:
            out.print_json(data=task)
            return
        _finish(client, task["id"])


def _finish(client: httpx.Client, task_id: str) -> None:
    """Follow to the end (or to a pause for approval), print the envelope, exit with the matching status."""
    envelope, waiting = _follow(client, task_id)
    out.print_json(data=envelope)
    if waiting:
        pending = (envelope.get("result") or {}).get("pending_decisions") or []
        err.print(f"[bold yellow]waiting for approval[/]: {len(pending)} call(s) need a person's decision")
        for d in pending:
            err.print(f"  {d['tool']} {json.dumps(d['args'])[:200]}\n    why: {d['reason']}")
            verdicts = "--deny" if d["kind"] == "approval" else "--deny | --applied"
            err.print(f"    keel tasks approve {task_id} {d['call_id']}   [dim](or {verdicts})[/]", soft_wrap=True)
        raise typer.Exit(WAITING_EXIT)
    if envelope.get("status") == "failed":
        raise typer.Exit(1)


def _follow(client: httpx.Client, task_id: str) -> tuple[dict[str, Any], bool]:
    """The task's envelope, and whether it is a provisional one (the task waits for a decision)."""
    last_id = ""
    with Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        view = _StreamView(progress)
        for _ in range(100):  # bounded reconnects; the log makes each one lossless
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events", headers=headers, timeout=None) as source:
                    if source.response.status_code == 204:
                        break
                    for sse in source.iter_sse():
                        last_id = sse.id or last_id
                        data = json.loads(sse.data) if sse.data else {}
                        seen = view.show(sse.event, data)
                        if seen == "end":
                            return dict(data["envelope"]), False
                        if seen == "parked" and _status(client, task_id) == "waiting_for_approval":
                            break  # parked now (not an old pause read back from the log): wait for a decision
                    else:
                        continue
                    break
            except httpx.HTTPError:
                progress.update(view.bar, description="reconnecting…")
                time.sleep(1)
    task = _call(client, "GET", f"/v1/tasks/{task_id}").json()
    return dict(task.get("envelope") or {}), task["status"] == "waiting_for_approval"


def _status(client: httpx.Client, task_id: str) -> str:
    return str(_call(client, "GET", f"/v1/tasks/{task_id}").json()["status"])


class _StreamView:
    """Turns a task's events into the progress bar's state."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bar = progress.add_task("queued", total=1.0)
        self.streamed = ""

    def show(self, event: str, data: dict[str, Any]) -> str | None:
        """Update the bar for one event; ``"end"`` when the task ended, ``"parked"`` when it waits for a person."""
        if event == "status" and data["status"] == "waiting_for_approval":
            self.progress.update(self.bar, description=data["status"])
            return "parked"
        if event == "end":
            self.progress.update(self.bar, completed=1.0, description=data["status"])
            return "end"
        if event == "progress":
            self.progress.update(self.bar, completed=data["progress"], description=str(data.get("step")))
            return None
        if event == "token":
            self.streamed = (self.streamed + data.get("text", ""))[-2000:]
            data = {**data, "tail": " ".join(self.streamed.split())[-48:]}
        if event == "plan" and "goal" in data.get("plan", {}):
            err.print(f"[dim]plan:[/] {data['plan']['goal']} [dim](confidence {data['plan'].get('confidence')})[/]")
        elif event == "partial_result" and str(data.get("key", "")).startswith("insight:"):
            points = len(data.get("value", {}).get("key_points", [])) if isinstance(data.get("value"), dict) else 0
            err.print(f"[green]✓[/] {data['key'].removeprefix('insight:')} read: {points} topic(s) found")
        describe = _DESCRIBE.get(event)
        if describe is not None:
            self.progress.update(self.bar, description=describe(data))
        return None


def _stage_line(data: dict[str, Any]) -> str:
    counts = f" {data['done']}/{data['total']}" if "total" in data and "done" in data else ""
    return f"{_STAGES.get(data['stage'], data['stage'])}{counts}"


_STAGES = {
    "plan": "planning",
    "ingest": "ingesting documents",
    "extract": "reading each document, topic by topic",
    "compare": "comparing",
    "risks": "wording the risks",
    "validate": "checking quotes",
}


_DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "step_started": lambda d: f"{d['step']} …",
    "token": lambda d: f"{d.get('step', '')}: …{d['tail']}",
    "budget": lambda d: _budget_line(d),
    "reindex_progress": lambda d: f"re-embedded {d['done']}/{d['total']} chunks",
    "ingest_progress": lambda d: f"{d.get('ref', '')} {d['phase']} {d['done']}/{d['total']}",
    "ingest_retry": lambda d: f"retrying {d['url']} (attempt {d['attempt']}): {d['error']}"[:100],
    "stage": lambda d: _stage_line(d),
    "decision_requested": lambda d: f"approval needed: {d.get('tool')}",
    "status": lambda d: str(d["status"]),
}


def _budget_line(data: dict[str, Any]) -> str:
    used, limits = data.get("used", {}), data.get("limits", {})
    parts = []
    for key, label in (("steps", "steps"), ("tool_calls", "tools"), ("tokens", "tokens")):
        if used.get(key) or key in limits:
            parts.append(f"{label} {used.get(key, 0)}" + (f"/{limits[key]}" if key in limits else ""))
    if used.get("cost_usd"):
        parts.append(f"${used['cost_usd']:.4f}")
    return " · ".join(parts)


@tasks_app.command("list")
def tasks_list(
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
    status: Annotated[list[str] | None, typer.Option(help="Filter by status (repeatable).")] = None,
    limit: int = 20,
) -> None:
    """List recent tasks."""
    with _client(url, api_key) as client:
        page = _call(client, "GET", "/v1/tasks", params={"status": status or [], "limit": limit}).json()
    table = Table("id", "workflow", "status", "progress", "step")
    for t in page["items"]:
        table.add_row(t["id"], t["workflow"], t["status"], f"{t['progress']:.0%}", t["current_step"] or "")
    out.print(table)


@tasks_app.command("show")
def tasks_show(task_id: str, url: Url = "http://127.0.0.1:8000", api_key: ApiKeyOpt = "") -> None:
    """Show one task, with its envelope once it is terminal."""
    with _client(url, api_key) as client:
        out.print_json(data=_call(client, "GET", f"/v1/tasks/{task_id}").json())


@tasks_app.command("cancel")
def tasks_cancel(task_id: str, url: Url = "http://127.0.0.1:8000", api_key: ApiKeyOpt = "") -> None:
    """Cancel a task (idempotent); it keeps its partial result."""
    with _client(url, api_key) as client:
        out.print_json(data=_call(client, "POST", f"/v1/tasks/{task_id}/cancel").json())


@tasks_app.command("approvals")
def tasks_approvals(task_id: str, url: Url = "http://127.0.0.1:8000", api_key: ApiKeyOpt = "") -> None:
    """The tool calls a task asked a person about, pending and decided."""
    with _client(url, api_key) as client:
        rows = _call(client, "GET", f"/v1/tasks/{task_id}/approvals").json()
    table = Table("call id", "kind", "tool", "args", "verdict", "reason")
    for d in rows:
        args = json.dumps(d["args"])
        table.add_row(d["call_id"], d["kind"], d["tool"], args[:60], d["verdict"] or "pending", d["reason"][:80])
    out.print(table)


@tasks_app.command("approve")
def tasks_approve(
    task_id: str,
    call_id: str,
    deny: Annotated[bool, typer.Option("--deny", help="Do not run the call; it fails as approval_denied.")] = False,
    applied: Annotated[
        bool, typer.Option("--applied", help="An interrupted call whose outcome was unknown did happen.")
    ] = False,
    note: Annotated[str | None, typer.Option(help="Why; recorded with the decision.")] = None,
    follow: Annotated[bool, typer.Option(help="Follow the task until it ends or waits again.")] = True,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
) -> None:
    """Approve (or deny) a call a paused task waits on; the task resumes once nothing it waits on is open.

    Needs a key with the tasks:approve scope."""
    if deny and applied:
        _fail("choose one of --deny and --applied", 2)
    decision = "deny" if deny else "applied" if applied else "approve"
    body = {"decision": decision, **({"note": note} if note else {})}
    with _client(url, api_key) as client:
        made = _call(client, "POST", f"/v1/tasks/{task_id}/approvals/{call_id}", json=body).json()
        said = {"approve": "approved", "deny": "denied", "applied": "marked as applied"}[made["verdict"]]
        err.print(f"[bold]{said}[/] {made['tool']} ({call_id})")
        if follow:
            _finish(client, task_id)


@tools_app.command("list")
def tools_list(url: Url = "http://127.0.0.1:8000", api_key: ApiKeyOpt = "") -> None:
    """Every tool the server offers: effect, scopes, approval rule, and whether this key may use it."""
    with _client(url, api_key) as client:
        rows = _call(client, "GET", "/v1/tools").json()
    table = Table(Column("name", no_wrap=True), "effect", "scopes", "approval", "permitted", "source", "description")
    for t in rows:
        table.add_row(
            t["name"],
            t["effect"],
            ",".join(t["scopes"]),
            t["approval"],
            "yes" if t["permitted"] else "no",
            t["source"],
            t["description"][:60],
        )
    out.print(table)


@tasks_app.command("replay")
def tasks_replay(task_id: str, data_dir: DataDir = None) -> None:
    """Replay a task's recorded history against the current workflow code, executing nothing.

    Exits 0 when the code makes the same decisions as the recorded run, 1 (with the divergence) when it does not:
    run it before deploying a workflow change that in-flight tasks will resume under.
    """
    from keel.app import registry_for
    from keel.backends import open_store
    from keel.errors import KeelError, NotFound
    from keel.orchestration.engine.replay import load_history, replay

    settings = _settings(data_dir)
    registry = registry_for(settings)

    async def run() -> dict[str, Any]:
        store = open_store(settings.resolved_store_url)
        try:
            history = await load_history(store, task_id)
            wf = registry.get(history.workflow)
            if wf is None:
                _fail(f"workflow {history.workflow!r} is not registered here (set KEEL_WORKFLOWS?)")
            result = await replay(wf, history, store=store)
            return {
                "task_id": task_id,
                "deterministic": True,
                "replayed_steps": result.steps,
                "reached_end": result.complete,
                "error": result.error,
            }
        finally:
            await store.aclose()

    try:
        out.print_json(data=asyncio.run(run()))
    except NotFound as exc:
        _fail(exc.message)
    except KeelError as exc:
        _fail(f"replay diverged: {exc.message}")


@memory_app.command("reindex")
def memory_reindex(
    model: Annotated[str, typer.Option("--model", help="Embedder spec to re-embed into, e.g. local:minilm.")],
    source: Annotated[
        str | None, typer.Option(help="Space (model@version) to copy from; default: the largest other one.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Chunks per durable step.")] = 64,
    prune: Annotated[bool, typer.Option(help="Delete the source space once every chunk has a twin.")] = False,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
) -> None:
    """Re-embed vector memory under another model or version, as a background task (resumable after a crash),
    with a progress bar. Queries keep using the configured model's space until KEEL_EMBEDDING_MODEL changes."""
    body = {"workflow": "memory_reindex", "input": {"model": model, "source": source, "batch": batch, "prune": prune}}
    steps = 100_000  # one durable step per batch: a large space needs more than the default step budget
    body["budget"] = {"max_steps": steps}
    with _client(url, api_key) as client:
        task = _call(client, "POST", "/v1/tasks", json=body).json()
        err.print(f"[bold]re-embedding[/] as task {task['id']}")
        _finish(client, task["id"])


@memory_app.command("spaces")
def memory_spaces(url: Url = "http://127.0.0.1:8000", api_key: ApiKeyOpt = "") -> None:
    """Every embedding space with chunks, and which one queries use."""
    with _client(url, api_key) as client:
        out.print_json(data=_call(client, "GET", "/v1/memory/spaces").json())


@memory_app.command("search")
def memory_search(
    query: str,
    k: Annotated[int, typer.Option(help="How many passages.")] = 5,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
) -> None:
    """The passages closest to QUERY, with scores and the retrieval confidence."""
    with _client(url, api_key) as client:
        out.print_json(data=_call(client, "POST", "/v1/memory/search", json={"query": query, "k": k}).json())


def _ingest(client: httpx.Client, source: str, password: str | None) -> dict[str, Any]:
    """Upload a file (or have the server fetch a URL) into vector memory; print one line about it."""
    client.timeout = httpx.Timeout(30, read=900)  # OCR of a long scan takes minutes
    if source.startswith(("http://", "https://")):
        response = _call(client, "POST", "/v1/documents", json={"url": source, "password": password})
    else:
        path = Path(source)
        if not path.is_file():
            _fail(f"no such file: {source}", 2)
        with err.status(f"ingesting {path.name} …"), path.open("rb") as fh:
            data = {"password": password} if password else {}
            response = _call(client, "POST", "/v1/documents", files={"file": (path.name, fh)}, data=data)
    doc: dict[str, Any] = response.json()
    why = "; ".join(p["message"] for p in [*doc["errors"], *doc["warnings"]][:3])
    colour = "green" if doc["status"] == "ingested" else "yellow"
    err.print(
        f"[{colour}]{doc['status']}[/] {doc['id']} {source}: {doc['pages']} page(s), {doc['chunks']} chunk(s)"
        + (f" [dim]({why})[/]" if why else ""),
        soft_wrap=True,
    )
    return doc


@documents_app.command("add")
def documents_add(
    sources: Annotated[list[str], typer.Argument(help="PDF or text files, or http(s) URLs.")],
    password: Annotated[str | None, typer.Option(help="Opens encrypted PDFs (sent once, never stored).")] = None,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
) -> None:
    """Ingest each source; prints one line per document (id, status, pages, chunks, why skipped) and exits 1
    when any was skipped or failed."""
    bad = 0
    with _client(url, api_key) as client:
        for source in sources:
            doc = _ingest(client, source, password)
            out.print(doc["id"])
            bad += doc["status"] != "ingested"
    if bad:
        raise typer.Exit(1)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
    sys.exit(0)
