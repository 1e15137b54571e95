"""Tools: typed functions a workflow, a plan or a model may call.

A tool is an async function whose first parameter is a pydantic model, so every tool has a JSON Schema and its
arguments are validated before it runs. It declares its ``effect`` (``read`` tools may be retried freely;
``write`` tools change the world and go through the effect ledger, so each call's effect happens once), the
``scopes`` a caller's API key needs, whether it needs a person's approval, and an optional ``reconcile`` hook
that tells, after a crash, whether a write with a given idempotency key happened::

    class SendArgs(BaseModel):
        to: str
        body: str

    @tool(effect="write", scopes={"email:send"})
    async def send(args: SendArgs, tc: ToolContext) -> dict[str, str]:
        "Send a message."
        await client.post(..., headers={"Idempotency-Key": tc.idempotency_key})
        return {"sent": args.to}

Tools that come from elsewhere (an MCP server) carry a JSON Schema instead of a model; both look the same to
the rest of keel.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
from pydantic import BaseModel

from keel.errors import ConfigError, ToolArgsInvalid
from keel.scopes import holds

Effect = Literal["read", "write"]
Approval = Literal["auto", "always", "never"]


@dataclass(kw_only=True, slots=True, frozen=True)
class Reconciled:
    """What a ``reconcile`` hook found out about a write whose outcome was unknown."""

    applied: bool | None
    """True: it happened (``result`` is its result). False: it did not; keel runs it. None: cannot tell."""
    result: Any = None


@dataclass(kw_only=True, slots=True, frozen=True)
class ToolContext:
    """What a tool's body may know about the call."""

    tool: str
    call_id: str
    task_id: str | None
    tenant: str
    idempotency_key: str | None
    """For write tools: pass it to downstream systems (``Idempotency-Key``), so they too apply it once."""
    services: Any = None
    """Process-wide services (the store, settings): :class:`keel.orchestration.toolbox.Services` when built-ins run."""


ToolFn = Callable[..., Awaitable[Any]]
ReconcileFn = Callable[[str, ToolContext], Awaitable[Reconciled]]


@dataclass(kw_only=True, slots=True)
class Tool:
    name: str
    description: str
    fn: ToolFn
    """``fn(args)`` or ``fn(args, tool_context)``; ``args`` is an ``input_model`` instance, or a dict when the
    tool has only ``input_schema``."""
    input_model: type[BaseModel] | None = None
    input_schema: dict[str, Any] = field(default_factory=dict)
    effect: Effect = "read"
    """``write`` tools change the world; their effects are applied exactly once (the effect ledger)."""
    scopes: frozenset[str] = frozenset()
    """API-key scopes the task's submitter must hold (``admin`` holds all)."""
    approval: Approval = "auto"
    """``auto``: a write needs a person's approval once the task has read untrusted content; ``always``: every
    call does; ``never``: none (only for writes that cannot be abused, such as a note to the task's own log)."""
    untrusted_output: bool = False
    """The result carries outside content (a fetched page, a document): reading it taints the task."""
    reconcile: ReconcileFn | None = None
    cost: Literal["cheap", "expensive"] = "cheap"
    takes_context: bool = False
    source: str = "python"
    """``python``, ``builtin`` or ``mcp:<server>``."""
    _validator: Any = None

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum() or len(self.name) > 64:
            raise ConfigError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if self.input_model is not None and not self.input_schema:
            self.input_schema = self.input_model.model_json_schema()
        if self.input_model is None:
            if not self.input_schema:
                raise ConfigError(f"tool {self.name!r} needs an input_model or an input_schema")
            import jsonschema

            cls = jsonschema.validators.validator_for(self.input_schema)
            cls.check_schema(self.input_schema)
            self._validator = cls(self.input_schema)
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.takes_context = self.takes_context or len(positional) >= 2

    def validate(self, raw: Mapping[str, Any] | BaseModel) -> Any:
        """Arguments as the tool's body takes them. Raises :class:`ToolArgsInvalid` naming what is wrong."""
        if isinstance(raw, BaseModel):
            raw = raw.model_dump(mode="json")
        if not isinstance(raw, Mapping):
            raise ToolArgsInvalid(f"{self.name}: arguments must be a JSON object", tool=self.name, pointer="")
        if self.input_model is not None:
            try:
                return self.input_model.model_validate(dict(raw))
            except pydantic.ValidationError as exc:
                issues = [("/" + "/".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
                raise self._invalid(issues) from None
        errors = sorted(self._validator.iter_errors(dict(raw)), key=lambda e: [str(p) for p in e.path])
        if errors:
            raise self._invalid([("/" + "/".join(str(p) for p in e.path), e.message) for e in errors])
        return dict(raw)

    def _invalid(self, issues: list[tuple[str, str]]) -> ToolArgsInvalid:
        text = "; ".join(f"{pointer}: {message}" for pointer, message in issues[:5])
        return ToolArgsInvalid(f"{self.name}: {text}", tool=self.name, pointer=issues[0][0], issues=issues)

    async def invoke(self, args: Any, tc: ToolContext) -> Any:
        return await (self.fn(args, tc) if self.takes_context else self.fn(args))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "effect": self.effect,
            "scopes": sorted(self.scopes),
            "approval": self.approval,
            "untrusted_output": self.untrusted_output,
            "reconcile": self.reconcile is not None,
            "source": self.source,
            "input_schema": self.input_schema,
        }


def tool(
    fn: ToolFn | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    effect: Effect = "read",
    scopes: Iterable[str] = (),
    approval: Approval = "auto",
    untrusted_output: bool = False,
    reconcile: ReconcileFn | None = None,
) -> Any:
    """Make a :class:`Tool` of ``async def f(args: Model[, tc: ToolContext])``; the docstring is its description."""

    def make(f: ToolFn) -> Tool:
        hints = typing.get_type_hints(f)
        params = list(inspect.signature(f).parameters)
        model = hints.get(params[0]) if params else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"tool {f.__name__!r}: the first parameter must be annotated with a pydantic model")
        return Tool(
            name=name or f.__name__,
            description=description or inspect.cleandoc(f.__doc__ or "") or f.__name__,
            fn=f,
            input_model=model,
            effect=effect,
            scopes=frozenset(scopes),
            approval=approval,
            untrusted_output=untrusted_output,
            reconcile=reconcile,
        )

    return make(fn) if fn is not None else make


def canonical_json(value: Any) -> str:
    """The arguments' canonical form: sorted keys, no whitespace, UTF-8; equal arguments, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def effect_key(task_id: str, step: str, tool_name: str, args: Any) -> str:
    """The idempotency key of a write: the same call at the same place in the same task always gets the same key."""
    material = "\x1f".join([task_id, step, tool_name, canonical_json(args)])
    return hashlib.sha256(material.encode()).hexdigest()


def call_id_of(key: str) -> str:
    return f"call_{key[:24]}"


class ToolCatalog:
    """Tools by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ConfigError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool

    def remove(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self._tools.values()]

    def only(self, names: Iterable[str] | None) -> ToolCatalog:
        """The catalog narrowed to ``names`` (None: all of it)."""
        if names is None:
            return ToolCatalog(self)
        wanted = set(names)
        return ToolCatalog(t for t in self if t.name in wanted)


def permitted(tool: Tool, scopes: Iterable[str]) -> bool:
    held = set(scopes)
    return all(holds(held, scope) for scope in tool.scopes)
