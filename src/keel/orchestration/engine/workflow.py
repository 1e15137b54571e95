"""Workflows: plain async functions taking a context and a validated input model, and their registry.

See :mod:`keel.orchestration.engine.context` for what a workflow may do with its context.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from keel.errors import ConfigError
from keel.orchestration.engine.context import WorkflowContext

if TYPE_CHECKING:
    from keel.memory.types import DocumentRecord
    from keel.settings import Settings

__all__ = ["Admission", "Workflow", "WorkflowContext", "WorkflowRegistry", "workflow"]

I = TypeVar("I", bound=BaseModel)  # noqa: E741
WorkflowFn = Callable[[WorkflowContext, Any], Coroutine[Any, Any, Any]]


class Admission(Protocol):
    """What an ``admit`` hook may read at submission (:class:`keel.service.Keel` is one): the settings and the
    tenant's documents; nothing that runs or stores anything."""

    @property
    def settings(self) -> Settings: ...

    async def find_document(self, tenant: str, document_id: str) -> DocumentRecord | None:
        """The tenant's document, or None (unknown, expired or deleted)."""
        ...


@dataclass(kw_only=True, slots=True)
class Workflow(Generic[I]):
    name: str
    input_model: type[I]
    fn: Callable[[WorkflowContext, I], Coroutine[Any, Any, Any]]
    estimate: Callable[[I], float | None] = lambda _: None
    description: str = ""
    admit: Callable[[Admission, str, I], Awaitable[None]] | None = None
    """Checks at submission, before anything is stored or any model is called: ``admit(app, tenant, input)``
    raises a :class:`keel.errors.KeelError` (an :class:`~keel.errors.InputError` is a 422) for input that cannot
    work, such as a document id the tenant does not have, or a URL the SSRF rules refuse."""
    _input_schema: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def input_schema(self) -> dict[str, Any]:
        """The JSON Schema of the input (``GET /v1/workflows``), built on first use and kept: pydantic builds it
        anew on every call, about 5 ms for the built-in workflows together, on the event loop."""
        if self._input_schema is None:
            self._input_schema = self.input_model.model_json_schema()
        return self._input_schema


def workflow(
    fn: WorkflowFn | None = None,
    *,
    name: str | None = None,
    estimate: Callable[[Any], float | None] | None = None,
) -> Any:
    """Turn ``async def analyse(ctx: WorkflowContext, req: Request) -> Report`` into a registrable
    :class:`Workflow`; the input model is read from the second parameter's annotation.

    Usable bare (``@workflow``) or with options (``@workflow(name="analyse", estimate=lambda req: 30.0)``).
    """

    def wrap(f: WorkflowFn) -> Workflow[Any]:
        params = list(inspect.signature(f).parameters.values())
        if len(params) != 2:
            raise ConfigError(f"workflow {f.__name__} must take (ctx, input), not {len(params)} parameter(s)")
        hint = typing.get_type_hints(f).get(params[1].name)
        if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
            raise ConfigError(f"workflow {f.__name__}: annotate its input with a pydantic model, got {hint!r}")
        return Workflow(
            name=name or f.__name__,
            input_model=hint,
            fn=f,
            estimate=estimate or (lambda _: None),
            description=inspect.getdoc(f) or "",
        )

    return wrap(fn) if fn is not None else wrap


class WorkflowRegistry:
    def __init__(self) -> None:
        self._workflows: dict[str, Workflow[Any]] = {}

    def register(self, wf: Workflow[Any]) -> None:
        if wf.name in self._workflows:
            raise ConfigError(f"workflow {wf.name!r} is registered twice")
        self._workflows[wf.name] = wf

    def load(self, spec: str) -> None:
        """Register workflows from ``package.module:attr``: a Workflow, or a list of them."""
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
            obj = getattr(module, attr) if attr else None
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load workflows from {spec!r}: {exc}") from exc
        items = obj if isinstance(obj, list | tuple) else [obj]
        for item in items:
            if not isinstance(item, Workflow):
                raise ConfigError(f"{spec!r} is not a Workflow (decorate it with @keel.workflow)")
            self.register(item)

    def get(self, name: str) -> Workflow[Any] | None:
        return self._workflows.get(name)

    def names(self) -> list[str]:
        return sorted(self._workflows)
