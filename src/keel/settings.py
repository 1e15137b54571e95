"""Settings from ``KEEL_*`` environment variables, an optional ``.env`` file, and an optional TOML file
named by ``KEEL_CONFIG``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from keel.errors import ConfigError
from keel.orchestration.llm.models.weights import DEFAULT_LOCAL
from keel.orchestration.llm.reliability import check_thresholds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEEL_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".keel"), description="All embedded state lives here.")
    store_url: str | None = Field(None, description="Defaults to sqlite:///<data_dir>/keel.db.")
    host: str = "127.0.0.1"
    port: int = 8000
    log_format: Literal["json", "text"] | None = Field(
        None,
        description="How log lines look on stderr: json (one object a line) or text. Default: text on a "
        "terminal, json otherwise.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="The level of keel's own loggers (keel.*); other libraries log at WARNING or above."
    )
    max_body_bytes: int = Field(1_048_576, description="Larger request bodies get 413.")
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="`keel serve`: a request's line and headers must arrive within this (else 408)."
    )
    http_body_timeout_s: float = Field(
        60.0, gt=0, description="`keel serve`: a request's body must arrive within this after its headers (else 408)."
    )
    http_max_header_bytes: int = Field(
        65_536, ge=1024, description="`keel serve`: larger request lines and headers get 431."
    )
    http_max_connections: int = Field(
        1000, ge=1, description="`keel serve`: connections (and requests in flight) past this get 503."
    )
    http_keep_alive_s: int = Field(
        5, ge=1, description="`keel serve`: an idle kept-alive connection closes after this."
    )
    workers: int = Field(4, ge=1, description="Concurrent tasks run by the in-process worker pool.")
    lease_seconds: float = Field(15.0, gt=0)
    max_task_attempts: int = Field(
        5, ge=1, description="Leases in a row that record no step before a crashing task is dead-lettered."
    )
    poll_interval_s: float = Field(0.5, gt=0)
    sse_heartbeat_s: float = Field(15.0, gt=0)
    sse_retry_ms: int = 2000
    idempotency_ttl_hours: float = Field(24.0, ge=24.0, description="Idempotency keys are kept at least 24 h.")
    secret_key: SecretStr | None = Field(
        None,
        description="Fernet keys sealing webhook secrets at rest, comma-separated, newest first (rotation: put a "
        "new one first; the others still open old secrets). Unset: <data_dir>/secret.key, made 0600 on first start. "
        "Processes sharing a store must share it. `keel keys secret-key` prints a new key.",
    )
    task_retention_days: float = Field(
        30.0,
        ge=0,
        description="Ended tasks are deleted this many days after they finished, with their events, steps, state, "
        "blobs and idempotency keys (0: kept until deleted).",
    )
    webhook_allow_hosts: str = Field("", description="Comma-separated hosts or CIDRs exempt from SSRF rules.")
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_backoff_base_s: float = Field(1.0, gt=0)
    webhook_backoff_max_s: float = Field(3600.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_concurrency: int = Field(32, ge=1, description="Webhook requests in flight at once, in all.")
    webhook_endpoint_concurrency: int = Field(
        1, ge=1, description="Webhook requests in flight at once to one endpoint (tenant and URL); 1 keeps order."
    )
    default_model: str = Field(
        f"local:{DEFAULT_LOCAL}",
        description="What `ctx.model()` answers with: openai:<model>, openai-compatible:<url>#<model>, "
        "anthropic:<model>, local:<name>, or a comma-separated fallback chain.",
    )
    model_prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='Extra or corrected model prices and windows: {"model-prefix": {"input": USD per 1M, '
        '"output": USD per 1M, "context_window": tokens}}.',
    )
    allow_floating_models: bool = Field(
        False, description="Accept floating model aliases (e.g. gpt-4o) without a warning in the envelope."
    )
    slo: dict[str, float] = Field(
        default_factory=dict,
        description='Statistical SLAs per pinned model, as rate thresholds: {"json_valid": 0.97, "error": 0.02}. '
        "Validity rates (json_valid, schema_valid) are floors, the others (error, error_429, error_5xx, "
        "error_timeout, error_cut, refusal, truncation, repair, fallback, cancelled) ceilings. GET /v1/slo judges "
        "each against its Wilson 95% interval; an error or validity rate that is violated opens the model's "
        "circuit in fallback chains.",
    )
    slo_window_h: float = Field(24.0, gt=0, le=168, description="The rolling window of GET /v1/slo, in hours.")
    breaker_cooldown_s: float = Field(
        60.0, gt=0, description="How long a fallback chain skips a model whose circuit opened, before probing it."
    )
    breaker_probes: int = Field(
        2, ge=1, description="Half-open probes that must answer in a row before a model's circuit closes again."
    )
    breaker_shared_s: float = Field(
        300.0,
        ge=0,
        description="How far back a circuit also counts every replica's calls, from the shared stats (read every "
        "15 s); 0: only this process's own calls.",
    )
    breaker_min_calls: int = Field(
        5, ge=1, description="Calls a rate needs before its violated verdict opens a circuit (a blip is not a trend)."
    )
    workflows: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra workflows to register, as comma-separated `package.module:attr` (a Workflow or a list).",
    )
    tools: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra tools to register, as comma-separated `package.module:attr` (a Tool or a list).",
    )
    mcp_servers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='External MCP servers mounted as tools: {"name": {"command": ["python", "srv.py"]}} for stdio '
        'or {"name": {"url": "https://.../mcp", "headers": {...}}} for streamable HTTP. Their tools are named '
        '`<name>__<tool>`; a tool is a write unless it says readOnlyHint (override with "effect").',
    )
    mcp_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call /mcp besides the server's own (comma-separated).",
    )
    approval_ttl_hours: float = Field(
        72.0, ge=0, description="A call nobody approves within this many hours is denied (0: wait forever)."
    )
    documents_dir: Path | None = Field(None, description="read_document may read local files under this folder.")
    fetch_allow_hosts: str = Field(
        "", description="Comma-separated hosts or CIDRs fetch_url may reach despite the SSRF rules (development)."
    )
    fetch_max_bytes: int = Field(5_000_000, ge=1, description="fetch_url and read_document body cap.")
    fetch_timeout_s: float = Field(20.0, gt=0, description="fetch_url total time cap, redirects included.")
    smtp_url: str | None = Field(
        None, description="smtp://user:pass@host:port or smtps://...; without it emails stay queued in the outbox."
    )
    smtp_sender: str = Field("keel@localhost", description="From address of send_email messages.")

    # -- memory (issue 6) --------------------------------------------------------------------------------------
    embedding_model: str = Field(
        "local:minilm",
        description="Embedder spec: local:minilm (all-MiniLM-L6-v2 on numpy), openai:<model>, "
        "openai-compatible:<base_url>#<model>, or hash:<dim> (a lexical fake for tests).",
    )
    session_ttl_hours: float = Field(24.0, gt=0, description="Session memory lives this long after its last write.")
    vector_ttl_days: float = Field(
        30.0, ge=0, description="Documents and their chunks live this long in vector memory (0: until deleted)."
    )
    chunk_tokens: int = Field(200, ge=16, le=8192, description="Chunk size in embedder tokens (capped by its window).")
    chunk_overlap_tokens: int = Field(32, ge=0, le=1024)
    ingest_max_bytes: int = Field(50_000_000, ge=1, description="Largest document accepted (upload or URL).")
    ingest_max_pages: int = Field(2000, ge=1)
    ingest_max_decompressed_bytes: int = Field(300_000_000, ge=1, description="PDF-bomb guard: decoded streams.")
    ingest_memory_mb: int = Field(1536, ge=128, description="Address-space limit of the PDF parser process.")
    ingest_cpu_s: int = Field(300, ge=1, description="CPU-time limit of the PDF parser process.")
    ingest_timeout_s: float = Field(600.0, gt=0, description="Wall-clock limit of one document's parse.")
    ingest_fetch_retries: int = Field(3, ge=0, le=10, description="Retries (with backoff) of an unreachable URL.")
    ocr: bool = Field(True, description="OCR pages without a text layer (needs Debian's tesseract-ocr).")
    ocr_lang: str = "eng"
    ocr_min_confidence: float = Field(60.0, ge=0, le=100, description="OCR words below this are dropped.")
    retrieval_high: float = Field(0.45, description="Cosine score at or above which retrieval is `high` confidence.")
    retrieval_low: float = Field(0.25, description="Cosine score below which retrieval is `low` confidence.")
    memory_sweep_s: float = Field(60.0, gt=0, description="How often expired sessions and chunks are deleted.")

    # -- per-tenant limits (issue 21): the defaults; `PUT /v1/tenants/{tenant}/limits` sets a tenant's own --------
    limit_rate_per_s: float | None = Field(
        None, gt=0, le=1e9, description="Requests per second per tenant (token bucket); over it: 429 with Retry-After."
    )
    limit_burst: int | None = Field(
        None,
        ge=1,
        le=10**9,
        description="Token bucket size: requests at once after a quiet spell (default: rate, at least 1).",
    )
    limit_max_tasks: int | None = Field(
        None, ge=1, le=10**9, description="Tasks per tenant queued or running at once; a submission beyond it: 429."
    )
    limit_daily_cost_usd: float | None = Field(
        None, ge=0, description="Model spend per tenant per UTC day; once spent, submissions get 429 until midnight."
    )
    limit_monthly_cost_usd: float | None = Field(
        None, ge=0, description="Model spend per tenant per UTC month; once spent, submissions get 429."
    )

    # -- scale-out (issue 8) ---------------------------------------------------------------------------------------
    engine: Literal["embedded", "temporal"] = Field(
        "embedded",
        description="What runs workflows: the embedded engine (in-process workers on the store's queue) or "
        "Temporal (each task a Temporal workflow, each step an activity; needs KEEL_TEMPORAL_ADDRESS).",
    )
    temporal_address: str = Field("127.0.0.1:7233", description="host:port of the Temporal frontend.")
    temporal_namespace: str = "default"
    temporal_task_queue: str = Field("keel", description="The task queue keel's workflows and activities use.")
    redis_url: str | None = Field(
        None,
        description="redis://host:port/db: session memory in Redis, and live event fan-out across API replicas "
        "(the event log in the store stays the source of truth).",
    )

    @field_validator("workflows", "tools", "mcp_allowed_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("slo", mode="before")
    @classmethod
    def _slo(cls, v: Any) -> Any:
        if isinstance(v, str):  # from a TOML file or the constructor; the environment's is JSON-decoded already
            v = json.loads(v) if v.strip() else {}
        if not isinstance(v, dict):
            raise ValueError('KEEL_SLO is a JSON object of rate thresholds, e.g. {"json_valid": 0.97}')
        try:
            return check_thresholds(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return (v.lower() or None) if isinstance(v, str) else v

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'keel.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        config = os.environ.get("KEEL_CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)
