"""Tools a workflow or a plan may call: a name, a description, a pydantic input model and an async function."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from keel.errors import ConfigError


@dataclass(kw_only=True, slots=True, frozen=True)
class Tool:
    name: str
    description: str
    input_model: type[BaseModel]
    fn: Callable[[Any], Awaitable[Any]]
    effect: Literal["read", "write"] = "read"
    """``write`` tools change the world; their effects must be applied exactly once."""
    cost: Literal["cheap", "expensive"] = "cheap"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "effect": self.effect,
            "input_schema": self.input_model.model_json_schema(),
        }


class ToolCatalog:
    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ConfigError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Any:
        return iter(self._tools.values())

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self._tools.values()]
