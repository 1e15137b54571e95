"""Providers picked by the word before a spec's colon: ``openai:gpt-4o-mini``, ``local:minilm``, ``hash:64``.

Each seam chosen from a string (models, embedders) keeps one :class:`Registry`: its built-in providers, registered
in code, and the providers that installed packages declare as entry points in the seam's group
(``[project.entry-points."keel.models"]``), each loaded the first time a spec names it.

Why entry points: keel's own test doubles (the ``test`` model, the ``hash:`` embedder) live in :mod:`keel.testing`,
which production code never imports. keel's ``pyproject.toml`` declares them instead, so they are found in tests,
in the servers tests start (``python -m keel``) and under ``keel serve`` alike, and a package of adapters adds a
provider the same way, without keel knowing its name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from keel.errors import ConfigError

__all__ = ["OPENAI_BASE_URL", "OpenAIEndpoint", "Provider", "Registry", "Spec", "chain", "openai_endpoint"]

OPENAI_BASE_URL = "https://api.openai.com/v1"

B = TypeVar("B")


@dataclass(kw_only=True, slots=True, frozen=True)
class Spec:
    """A spec as a provider reads it: ``openai-compatible:http://h/v1#m`` is provider ``openai-compatible``, rest
    ``http://h/v1#m``."""

    text: str
    """The spec as written, for error messages."""
    provider: str
    rest: str
    """What follows the first colon (empty when there is none)."""

    @classmethod
    def parse(cls, text: str) -> Spec:
        provider, _, rest = text.strip().partition(":")
        return cls(text=text, provider=provider, rest=rest)


def chain(spec: str) -> list[str]:
    """The specs of a fallback chain ``a,b`` in order (one spec when there is no comma). An ``openai-compatible:``
    spec is one model whatever it holds: its URL may contain a comma."""
    if "," in spec and not spec.strip().startswith("openai-compatible:"):
        return [s.strip() for s in spec.split(",") if s.strip()]
    return [spec.strip()]


@dataclass(kw_only=True, slots=True, frozen=True)
class Provider(Generic[B]):
    """One provider of a seam: its name, how a spec for it is written, and what builds from a spec."""

    name: str
    """The word before the colon."""
    form: str
    """How a spec for it is written (``"hash:<dim>"``), for the error that lists the accepted forms."""
    build: B
    """The seam's factory (see the seam's registry for its signature)."""


class Registry(Generic[B]):
    """The providers of one seam: built-ins, then those registered in code, then the group's entry points."""

    def __init__(self, group: str, builtins: Iterable[Provider[B]] = ()) -> None:
        self.group = group
        self._providers: dict[str, Provider[B]] = {p.name: p for p in builtins}
        self._lock = threading.Lock()

    def register(self, provider: Provider[B]) -> None:
        """Add a provider, or replace the one of that name (an entry point of that name is then never loaded)."""
        with self._lock:
            self._providers[provider.name] = provider

    def get(self, name: str) -> Provider[B] | None:
        """The provider called ``name``, its entry point loaded if need be; None when there is none."""
        with self._lock:
            found = self._providers.get(name)
            if found is None:
                found = next((self._load(ep) for ep in self._entry_points() if ep.name == name), None)
            return found

    def forms(self) -> list[str]:
        """Every accepted form, built-ins first (the entry points not loaded yet are loaded to say theirs)."""
        with self._lock:
            for ep in self._entry_points():
                self._load(ep)
            return [p.form for p in self._providers.values()]

    def _entry_points(self) -> list[EntryPoint]:
        return [ep for ep in entry_points(group=self.group) if ep.name not in self._providers]

    def _load(self, ep: EntryPoint) -> Provider[B]:
        try:
            loaded = ep.load()
        except ImportError as exc:
            raise ConfigError(f"the {self.group} provider {ep.name!r} ({ep.value}) cannot be imported: {exc}") from None
        if not isinstance(loaded, Provider) or loaded.name != ep.name:
            raise ConfigError(f"the {self.group} entry point {ep.name!r} ({ep.value}) is not a Provider named so")
        provider: Provider[B] = loaded
        self._providers.setdefault(ep.name, provider)
        return self._providers[ep.name]


@dataclass(kw_only=True, slots=True, frozen=True)
class OpenAIEndpoint:
    """Where an OpenAI-style spec's requests go, and the key they carry."""

    base_url: str
    model: str
    api_key: str | None


def openai_endpoint(spec: Spec, *, api_key: str | None = None) -> OpenAIEndpoint | None:
    """The endpoint an ``openai:<model>`` or ``openai-compatible:<base_url>#<model>`` spec names, with the settings
    read from the environment: one reading for chat models and embedders alike, so an embedder reaches whatever a
    chat model reaches. None for any other spec.

    ``openai:`` goes to ``OPENAI_BASE_URL`` (default the OpenAI API) with ``OPENAI_API_KEY``, which it needs;
    ``openai-compatible:`` goes to its own URL with ``OPENAI_COMPATIBLE_API_KEY``, else ``OPENAI_API_KEY``, else
    none (a server on your own machine may want none). ``api_key`` (passed in code) wins over the environment."""
    if spec.provider == "openai" and spec.rest:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ConfigError(f"{spec.text!r} needs an API key: set OPENAI_API_KEY")
        return OpenAIEndpoint(
            base_url=os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL, model=spec.rest, api_key=key
        )
    if spec.provider == "openai-compatible" and "#" in spec.rest:
        base_url, _, model = spec.rest.rpartition("#")
        key = api_key or os.environ.get("OPENAI_COMPATIBLE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return OpenAIEndpoint(base_url=base_url, model=model, api_key=key)
    return None
