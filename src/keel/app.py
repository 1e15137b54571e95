"""Wires the three layers into one ASGI app with the embedded runtime in-process.

:func:`running` opens the store, the memory layer, the tools and the engine, and builds the application service
(:class:`keel.service.Keel`) on them; :func:`create_app` puts the HTTP and MCP edges in front of it. This is the
one module that picks drivers; everything behind an edge reaches them only through the service."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel import __version__, logs, observability
from keel.backends import open_stores
from keel.errors import ConfigError, NotInstalled
from keel.files import private_dir, private_file
from keel.interaction import problems
from keel.interaction.endpoint_routes import router as endpoint_router
from keel.interaction.key_routes import router as key_router
from keel.interaction.limit_routes import router as limit_router
from keel.interaction.limits import BodyLimit
from keel.interaction.mcp import build_mcp
from keel.interaction.memory_routes import router as memory_router
from keel.interaction.metrics import router as metrics_router
from keel.interaction.openai_compat import router as openai_router
from keel.interaction.openapi import KeelAPI, add_docs, add_webhooks, operation_id
from keel.interaction.ratelimit import RateLimitHeaders, rate_limited
from keel.interaction.routes import router
from keel.interaction.tool_calls import TaskToolBackend
from keel.interaction.tool_routes import router as tool_router
from keel.interaction.ui import add_ui
from keel.interaction.webhooks import WebhookDispatcher
from keel.interaction.wire_json import StrictJson
from keel.memory.embeddings import Embedder, EmbeddingSpace, open_embedder
from keel.memory.ingest.pdf import ParseLimits
from keel.memory.ingest.pipeline import Ingestor, IngestSettings
from keel.memory.retrieval import ConfidencePolicy, Memory
from keel.memory.stores import Stores
from keel.netguard import AllowList
from keel.observability import Observer
from keel.observability.asgi import ObserveRequests
from keel.orchestration.engine import Engine
from keel.orchestration.engine.runtime import EmbeddedEngine, Notifier
from keel.orchestration.engine.workflow import WorkflowRegistry
from keel.orchestration.llm.models import ModelRegistry
from keel.orchestration.llm.models.circuit import CircuitBreaker
from keel.orchestration.tools import ToolCatalog
from keel.orchestration.tools.builtins import builtin_tools, load_tools
from keel.orchestration.tools.email import EmailRelay, Sender
from keel.orchestration.tools.fetch import FetchLimits, document_fetcher
from keel.orchestration.tools.services import Services
from keel.orchestration.workflows import default_registry
from keel.secretbox import KEY_FILE, SecretBox
from keel.service import Keel
from keel.settings import Settings

DESCRIPTION = """
keel turns a slow, costly, non-deterministic reasoning engine into a plain REST contract:
`POST /v1/tasks` answers **202** with a task id at once; poll `GET /v1/tasks/{id}` (with `Retry-After`),
stream `GET /v1/tasks/{id}/events` (SSE, resumable with `Last-Event-ID`), or receive a signed webhook.
Every terminal task carries a semantic envelope: `success | partial_success | failed | needs_clarification`
plus `errors[]`. Every non-2xx response is RFC 9457 `application/problem+json`.

**Idempotency.** Send `Idempotency-Key` on `POST /v1/tasks`. The same key with the same body returns the same
task (`Idempotent-Replayed: true`); with a different body, 422; while the first is still in flight, 409.
Keys are scoped to the API key's tenant and kept for `KEEL_IDEMPOTENCY_TTL_HOURS` (default and minimum 24 h).

**Authentication.** `Authorization: Bearer <key>` (the **Authorize** button): a key from `keel keys create`.
Each operation's security requirement names the scope it needs (`tasks:read`, `tasks:write`, `tasks:approve`,
`admin`).
"""


log = logging.getLogger("keel.app")


class Readiness(BaseModel):
    """What `/readyz` answers when keel is ready (200). Not ready, it answers 503 with a problem whose
    ``not_ready`` member lists the parts that are not, and whose ``checks`` member holds every part's answer."""

    status: Literal["ready"]
    checks: dict[str, str] = Field(
        default_factory=dict,
        description="Each part checked (store; redis and temporal when configured; model; embedder) and `ok`, or "
        "why it is not ready.",
    )
    model: dict[str, Any] | None = Field(None, description="With a local default model: `{spec, loadable, error?}`.")


def registry_for(settings: Settings) -> WorkflowRegistry:
    """The built-in workflows and those ``KEEL_WORKFLOWS`` names."""
    registry = default_registry()
    for spec in settings.workflows:
        registry.load(spec)
    return registry


def _lock_data_dir(settings: Settings) -> IO[str]:
    lock = private_file(private_dir(settings.data_dir) / "keel.lock")
    handle = open(lock, "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"another keel process is serving {settings.data_dir}; the embedded runtime needs it to itself"
        ) from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


async def _tools(settings: Settings, stack: contextlib.AsyncExitStack) -> ToolCatalog:
    """Built-ins, then ``KEEL_TOOLS``, then the tools of every mounted MCP server (sessions kept on ``stack``)."""
    catalog = ToolCatalog([*builtin_tools(), *load_tools(settings.tools)])
    if settings.mcp_servers:
        from keel.orchestration.tools.mcp_client import McpMounts, McpServerConfig

        mounts = McpMounts(McpServerConfig.parse_many(settings.mcp_servers))
        stack.push_async_callback(mounts.aclose)
        for tool in await mounts.start():
            catalog.add(tool)
    return catalog


def _smtp(settings: Settings) -> Sender | None:
    if not settings.smtp_url:
        return None
    from keel.backends.smtp import SmtpSender

    return SmtpSender(settings.smtp_url, sender=settings.smtp_sender)


class Embedders:
    """``spec -> Embedder``, opened once per spec (the default one first); closed with the app."""

    def __init__(self, default: Embedder) -> None:
        self._open: dict[str, Embedder] = {}
        self.default = default

    def __call__(self, spec: str) -> Embedder:
        if spec not in self._open:
            self._open[spec] = open_embedder(spec)
        return self._open[spec]

    async def aclose(self) -> None:
        for embedder in {id(e): e for e in [self.default, *self._open.values()]}.values():
            await embedder.aclose()


class WithoutWeights:
    """The default embedder when its weights are not installed (a fresh ``pip install keel-runtime``): keel serves
    every workflow that does not touch memory, and whatever does gets the install hint (503 over HTTP)."""

    max_tokens = 256

    def __init__(self, spec: str, missing: NotInstalled) -> None:
        self.space = EmbeddingSpace(model=spec, version="not-installed", dim=0)
        self.missing = missing

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        raise NotInstalled(self.missing.message)

    async def embed(self, texts: Sequence[str]) -> Any:
        raise NotInstalled(self.missing.message)

    async def aclose(self) -> None:
        pass


def _memory(settings: Settings, stores: Stores, clock: Callable[[], float]) -> tuple[Memory, Embedders]:
    embedder: Embedder
    try:
        embedder = open_embedder(settings.embedding_model)
    except NotInstalled as exc:
        log.warning("memory is unavailable until the embedder is installed: %s", exc.message)
        embedder = WithoutWeights(settings.embedding_model, exc)
    embedders = Embedders(embedder)
    fetch_limits = FetchLimits(
        max_bytes=settings.ingest_max_bytes,
        timeout_s=settings.fetch_timeout_s,
        allow=AllowList.parse(settings.fetch_allow_hosts),
        content_types=("application/pdf", "text/plain", "text/markdown", "application/octet-stream"),
    )
    ingestor = Ingestor(
        stores.backend,
        embedder,
        settings=IngestSettings(
            chunk_tokens=settings.chunk_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
            ttl_s=settings.vector_ttl_days * 86_400 or None,
            max_bytes=settings.ingest_max_bytes,
            retries=settings.ingest_fetch_retries,
            limits=ParseLimits(
                max_bytes=settings.ingest_max_bytes,
                max_pages=settings.ingest_max_pages,
                max_decompressed_bytes=settings.ingest_max_decompressed_bytes,
                memory_mb=settings.ingest_memory_mb,
                cpu_s=settings.ingest_cpu_s,
                timeout_s=settings.ingest_timeout_s,
                ocr=settings.ocr,
                ocr_lang=settings.ocr_lang,
                ocr_min_word_confidence=settings.ocr_min_confidence,
            ),
        ),
        fetcher=document_fetcher(fetch_limits),
        clock=clock,
        scratch_dir=settings.data_dir / "tmp",
    )
    memory = Memory(
        sessions=stores.sessions,
        documents=stores.documents,
        vectors=stores.vectors,
        embedder=embedder,
        ingestor=ingestor,
        clock=clock,
        session_ttl_s=settings.session_ttl_hours * 3600,
        confidence=ConfidencePolicy(high=settings.retrieval_high, low=settings.retrieval_low),
    )
    return memory, embedders


Role = Literal["all", "api", "worker"]


def _models(settings: Settings) -> ModelRegistry:
    """The process's models, built once per spec, and the circuit breaker of its fallback chains."""
    breaker = CircuitBreaker(
        thresholds=settings.slo,
        window_s=settings.slo_window_h * 3600,
        cooldown_s=settings.breaker_cooldown_s,
        probes=settings.breaker_probes,
        min_calls=settings.breaker_min_calls,
    )
    return ModelRegistry(
        settings.default_model,
        prices=settings.model_prices,
        allow_floating=settings.allow_floating_models,
        breaker=breaker,
    )


def _engine(
    settings: Settings,
    stores: Stores,
    registry: WorkflowRegistry,
    notifier: Notifier,
    tools: ToolCatalog,
    services: Services,
    models: ModelRegistry,
    *,
    run_workers: bool,
) -> Engine:
    """The engine ``KEEL_ENGINE`` names: the embedded one (the default) or Temporal."""
    common: dict[str, Any] = {
        "workers": settings.workers,
        "lease_s": settings.lease_seconds,
        "max_attempts": settings.max_task_attempts,
        "poll_s": settings.poll_interval_s,
        "notifier": notifier,
        "models": models,
        "tools": tools,
        "services": services,
        "memory": services.memory,
        "approval_ttl_s": settings.approval_ttl_hours * 3600 or None,
        "sweep_s": min(60.0, settings.memory_sweep_s),
        "task_retention_s": settings.task_retention_days * 86400 or None,
    }
    if settings.engine == "temporal":
        from keel.backends.temporal import TemporalEngine

        return TemporalEngine(
            stores.backend,
            registry,
            address=settings.temporal_address,
            namespace=settings.temporal_namespace,
            task_queue=settings.temporal_task_queue,
            run_workers=run_workers,
            **common,
        )
    return EmbeddedEngine(stores.backend, registry, **common)


async def _secrets(settings: Settings, stores: Stores, *, shared: bool) -> SecretBox:
    """The box sealing webhook secrets (:mod:`keel.secretbox`), after sealing what an older keel stored in plain
    text and re-encrypting what an older key sealed. A store whose secrets no configured key opens stops start-up
    here, with the setting to fix."""
    key = settings.secret_key.get_secret_value() if settings.secret_key else None
    if shared and not key:
        log.warning(
            "KEEL_SECRET_KEY is not set: webhook secrets are sealed with %s, which every process sharing this store "
            "needs too; set KEEL_SECRET_KEY (the same on every process) instead",
            settings.data_dir / KEY_FILE,
        )
    box = SecretBox.configured(key, settings.data_dir)
    if resealed := await stores.secrets.reseal_secrets(box.reseal):
        log.info("sealed %d stored webhook secret(s) with the current secret key", resealed)
    return box


def _shared(settings: Settings, role: Role) -> bool:
    """Whether other keel processes share this store. The embedded SQLite store belongs to one process."""
    url = settings.resolved_store_url
    if url.startswith("sqlite:"):
        if role != "all":
            raise ConfigError(
                f"role {role!r} needs a store shared by every process (KEEL_STORE_URL=postgresql://…); the embedded "
                "SQLite store belongs to one process, which serves the API and runs the workers itself"
            )
        return False
    return True


def redacted(url: str) -> str:
    """``url`` without its password, for logs (``postgresql://keel:***@db/keel``)."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, registry: WorkflowRegistry, *, role: Role = "all", observer: Observer | None = None
) -> AsyncIterator[Keel]:
    """Open the store, the memory layer and the tools, build the service on them, and run what ``role`` asks for:
    ``all`` (one process: the API and the workers, the embedded default), ``api`` (answers HTTP; the queue is
    worked elsewhere) or ``worker`` (runs tasks, webhooks and emails; no HTTP). Everything is stopped and closed
    on exit. ``observer`` (default: :func:`keel.observability.from_env`) is current for everything started here."""
    shared = _shared(settings, role)
    lock = None if shared else _lock_data_dir(settings)
    # With Redis, sessions live there (stores.sessions), and every process hears every task's new events at once
    # (SSE on any replica); the durable event log in the store stays the source of truth for resumption.
    stores = open_stores(settings.resolved_store_url, redis_url=settings.redis_url)
    notifier = Notifier()
    stack = contextlib.AsyncExitStack()
    try:
        if observer is None:  # a worker process: spans, no /metrics
            observer = observability.from_env()
            stack.callback(observer.shutdown)
        stack.enter_context(observability.use(observer))  # before the engine starts: its workers inherit it
        if settings.redis_url:
            from keel.backends.redis import RedisNotifier

            fanout = RedisNotifier(settings.redis_url)
            await fanout.start()
            stack.push_async_callback(fanout.stop)
            notifier = fanout
        secrets = await _secrets(settings, stores, shared=shared)
        tools = await _tools(settings, stack)
        memory, embedders = _memory(settings, stores, time.time)
        stack.push_async_callback(embedders.aclose)
        services = Services(
            memory=memory,
            embedders=embedders,
            store=stores.emails,
            documents_dir=settings.documents_dir,
            fetch_allow=AllowList.parse(settings.fetch_allow_hosts),
            fetch_max_bytes=settings.fetch_max_bytes,
            fetch_timeout_s=settings.fetch_timeout_s,
        )
        models = _models(settings)
        stack.push_async_callback(models.aclose)  # after the engine has stopped (callbacks run last first)
        runtime = _engine(settings, stores, registry, notifier, tools, services, models, run_workers=role != "api")
        allow = AllowList.parse(settings.webhook_allow_hosts)
        keel = Keel(
            settings=settings,
            stores=stores,
            registry=registry,
            runtime=runtime,
            notifier=notifier,
            tools=tools,
            memory=memory,
            webhook_allow=allow,
            secrets=secrets,
        )
        if role != "api" and models.breaker is not None and settings.slo and settings.breaker_shared_s:
            # The circuits count every replica's calls too; the first read before any task runs.
            await models.breaker.refresh(stores.stats, shared_s=settings.breaker_shared_s)
            follow = asyncio.create_task(models.breaker.follow(stores.stats, shared_s=settings.breaker_shared_s))
            stack.push_async_callback(_cancelled, follow)
        if role != "api" or settings.engine == "temporal":
            # A process that owns its store alone knows that whatever is still `running` belongs to a dead one;
            # with a shared store, other workers' leases simply run out. (An API process on Temporal only holds
            # a client, to cancel.)
            await runtime.start(recover=not shared)
            stack.push_async_callback(runtime.stop)
        if role != "api":
            relay = EmailRelay(stores.emails, _smtp(settings), poll_s=settings.poll_interval_s)
            webhooks = WebhookDispatcher(
                stores.outbox,
                allow=allow,
                max_attempts=settings.webhook_max_attempts,
                backoff_base_s=settings.webhook_backoff_base_s,
                backoff_max_s=settings.webhook_backoff_max_s,
                timeout_s=settings.webhook_timeout_s,
                poll_s=settings.poll_interval_s,
                open_secret=secrets.open,
                concurrency=settings.webhook_concurrency,
                per_endpoint=settings.webhook_endpoint_concurrency,
            )
            webhooks.start()
            stack.push_async_callback(webhooks.stop)
            relay.start()
            stack.push_async_callback(relay.stop)
        log.info(
            "keel started: role=%s store=%s engine=%s redis=%s model=%s embedder=%s workers=%d tools=%s",
            role,
            redacted(settings.resolved_store_url),
            settings.engine,
            redacted(settings.redis_url) if settings.redis_url else "off",
            redacted(settings.default_model),
            settings.embedding_model,
            settings.workers if role != "api" else 0,
            ",".join(sorted(tools.names())) or "none",
        )
        yield keel
    finally:
        await stack.aclose()
        await stores.aclose()
        if lock is not None:
            lock.close()
    log.info("keel stopped")


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _Probe:
    """A readiness check that is cached: a success for good, a failure for ``retry_s`` (an install or a restored
    file fixes it without a restart). Concurrent probes share one check."""

    def __init__(self, *, retry_s: float = 30.0) -> None:
        self.retry_s = retry_s
        self._checked: tuple[float, str | None] | None = None
        self._running: asyncio.Future[str | None] | None = None

    async def _problem(self, check: Callable[[], Awaitable[str | None]]) -> str | None:
        checked = self._checked
        if checked is not None and (checked[1] is None or time.monotonic() - checked[0] < self.retry_s):
            return checked[1]
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(check())
        problem = await asyncio.shield(self._running)
        self._checked = (time.monotonic(), problem)
        return problem


class ModelReadiness(_Probe):
    """Whether the default model can load, for ``/readyz``. Only ``local:`` models are checked (another provider
    would need a network call): the runtime imports and the weights resolve; the model itself is not loaded by a
    probe. Checked in a thread, once; a failure is checked again after ``retry_s``."""

    def __init__(self, spec: str, *, retry_s: float = 30.0) -> None:
        super().__init__(retry_s=retry_s)
        self.spec = spec
        chain = [spec] if spec.startswith("openai-compatible:") else spec.split(",")  # as infer_model reads it
        self._local: list[str] = []
        for part in chain:
            provider, _, rest = part.strip().partition(":")
            if provider == "local" and rest:
                self._local.append(rest)

    @property
    def local(self) -> bool:
        return bool(self._local)

    async def problem(self) -> str | None:
        """Why the model cannot load, or None when it can."""
        return await self._problem(lambda: asyncio.to_thread(self._check))

    def _check(self) -> str | None:
        from keel.orchestration.llm.models.weights import resolve

        for alias in self._local:
            try:
                importlib.import_module("keel.orchestration.llm.models.local")
                resolve(alias)
            except ImportError as exc:
                return f"local:{alias} needs the embedded llama.cpp runtime: pip install 'keel-runtime[local]' ({exc})"
            except ConfigError as exc:
                return f"local:{alias}: {exc.message}"
            except OSError as exc:  # the weights' files or the model cache cannot be read
                return f"local:{alias}: {exc}"
        return None


REMOTE_EMBEDDERS = ("openai:", "openai-compatible:")


class EmbedderReadiness(_Probe):
    """Whether the default embedder can embed, for ``/readyz``: it embeds one short text (a local embedder loads
    its weights then, as the first ingest would). A remote embedder is not probed: each probe would be a paid
    network call, and its failures show on the calls themselves."""

    def __init__(self, spec: str, *, retry_s: float = 30.0) -> None:
        super().__init__(retry_s=retry_s)
        self.spec = spec
        self.probed = not spec.startswith(REMOTE_EMBEDDERS)

    async def problem(self, embedder: Embedder) -> str | None:
        """Why ``embedder`` cannot embed, or None when it can (or is remote)."""
        if not self.probed:
            return None

        async def check() -> str | None:
            try:
                await embedder.embed(["readiness probe"])
            except Exception as exc:
                return f"{self.spec}: {_reason(exc)}"
            return None

        return await self._problem(check)


def _reason(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, ConfigError) else str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _answers(check: Awaitable[object], timeout_s: float = 5.0) -> str:
    """``ok``, or why the part did not answer within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await check
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except Exception as exc:
        return _reason(exc)
    return "ok"


class RequestId:
    """ASGI middleware: the request's id, from ``X-Request-ID`` (when it is a sane token) or minted, echoed in the
    response's ``X-Request-ID`` and set in :data:`keel.logs.request_id` for every line logged while serving it; a
    task submitted by the request keeps it (``Keel.submit``), so its run's lines carry it too."""

    HEADER = "x-request-id"
    VALID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # goes into logs and headers: no spaces, no control characters

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request = given if self.VALID.fullmatch(given) else logs.new_request_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request
            await send(message)

        token = logs.request_id.set(request)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


def create_app(
    settings: Settings | None = None,
    registry: WorkflowRegistry | None = None,
    *,
    role: Role = "all",
    observer: Observer | None = None,
) -> FastAPI:
    """The ASGI app: the API, and with ``role="all"`` (the default) the workers in the same process. ``observer``
    receives its metrics and spans (default: :func:`keel.observability.from_env`)."""
    settings = settings or Settings()
    observer = observer or observability.from_env()
    if role == "worker":
        raise ConfigError("a worker serves no HTTP: run `keel worker`")
    _shared(settings, role)  # refuse an impossible role now, not at start-up
    registry = registry or registry_for(settings)

    def service() -> Keel:
        keel: Keel = app.state.keel
        return keel

    # keel's tools over MCP, behind the same API keys; built now (the route must exist), served once the
    # lifespan has built the service.
    mcp = build_mcp(
        TaskToolBackend(service),
        rate_limited(service),  # an MCP request spends a token of its tenant's rate, as a REST one does
        allowed_origins=settings.mcp_allowed_origins,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(settings, registry, role=role, observer=observer) as keel:
            app.state.keel = keel
            async with mcp.running():  # stops (its calls cancelled) before the runtime and the store
                yield
        observer.shutdown()  # flushes the spans still batched

    app = KeelAPI(
        title="keel",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # add_docs serves them without a CDN
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.observer = observer
    problems.install(app)
    add_docs(app)
    add_webhooks(app)
    app.include_router(router)
    app.include_router(tool_router)
    app.include_router(key_router)
    app.include_router(memory_router)
    app.include_router(endpoint_router)
    app.include_router(metrics_router)
    app.include_router(limit_router)
    app.include_router(openai_router)  # after `router`: its /v1/models/stats wins over /v1/models/{id}
    app.router.routes.append(Route("/mcp", mcp.asgi, include_in_schema=False))  # every method of exactly /mcp
    add_ui(app)  # the live trace page at /ui/

    @app.get("/healthz", include_in_schema=True, tags=["ops"], operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # An API-only process runs no model: whether the workers can load theirs is for their own health.
    model = ModelReadiness(settings.default_model) if role != "api" else None
    embedder = EmbedderReadiness(settings.embedding_model)

    @app.get(
        "/readyz",
        tags=["ops"],
        operation_id="readyz",
        response_model=Readiness,
        responses={503: {"description": "Starting, or a part is not ready: the problem's `not_ready` names it."}},
    )
    async def readyz() -> JSONResponse:
        keel: Keel | None = getattr(app.state, "keel", None)
        if keel is None:
            return problems.problem(
                503, "Not ready", "keel is starting", type=NOT_READY, extensions={"not_ready": ["startup"]}
            )
        checks = {"store": await _answers(keel.ping())}
        if settings.redis_url:
            checks["redis"] = await _answers(keel.stores.sessions.get_session("readyz", "readyz", time.time()))
        if settings.engine == "temporal":
            checks["temporal"] = await _answers(_temporal_ping(keel))
        extra: dict[str, Any] = {}
        if model is not None and model.local:
            problem = await model.problem()
            checks["model"] = problem or "ok"
            extra["model"] = {"spec": model.spec, "loadable": problem is None} | ({"error": problem} if problem else {})
        checks["embedder"] = await embedder.problem(keel.memory.embedder) or "ok"
        failing = [part for part, answer in checks.items() if answer != "ok"]
        if failing:
            detail = "; ".join(f"{part}: {checks[part]}" for part in failing)
            log.warning("not ready: %s", detail)
            return problems.problem(
                503, "Not ready", detail, type=NOT_READY, extensions={"not_ready": failing, "checks": checks, **extra}
            )
        return JSONResponse({"status": "ready", "checks": checks, **extra})

    # A multipart upload carries the document plus its form framing.
    uploads = {"/v1/documents": settings.ingest_max_bytes + 64 * 1024}
    app.add_middleware(RateLimitHeaders)  # inside the error handlers' answers too: a 404 still spent a token
    app.add_middleware(StrictJson)  # inside the body limit: it reads only what the limit lets through
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, per_path=uploads)
    app.add_middleware(ObserveRequests, observer=observer)  # the request span covers everything inside
    app.add_middleware(RequestId)  # outermost: every answer carries the id, a refused body's too
    return app


NOT_READY = "urn:keel:problem:not_ready"


async def _temporal_ping(keel: Keel) -> None:
    from keel.backends.temporal import TemporalEngine

    if isinstance(keel.runtime, TemporalEngine):
        await keel.runtime.ping()
