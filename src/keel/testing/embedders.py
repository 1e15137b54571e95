"""A fake embedder for tests: :class:`HashEmbedder`, deterministic and instant, with lexical similarity.

Each text becomes a feature-hashed bag of its lowercased words (weight 1) and their character trigrams (weight 0.5),
signed and L2-normalised, so texts that share words (or word pieces) have a higher cosine than texts that do not.
The ``model`` and ``version`` strings salt the hash: two versions of the "same model" give different vectors, as a
changed model would, which is what tests of re-embedding need.

:data:`HASH_EMBEDDER_PROVIDER` is the ``hash:<dim>`` spec, declared as a ``keel.embedders`` entry point in
``pyproject.toml`` so that production code never imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from keel.errors import ConfigError
from keel.memory.embeddings import EmbeddingSpace
from keel.providers import Provider, Spec

__all__ = ["HASH_EMBEDDER_PROVIDER", "HashEmbedder"]

_WORD = re.compile(r"\w+")
_YIELD_EVERY = 256  # texts between event-loop yields in embed()


class HashEmbedder:
    """A deterministic feature-hashing embedder. Satisfies :class:`keel.memory.embeddings.Embedder`."""

    def __init__(
        self,
        *,
        dim: int = 64,
        model: str = "hash",
        version: str = "1",
        max_tokens: int = 256,
        trigrams: bool = True,
    ) -> None:
        """``dim`` is the vector length; ``model``/``version`` name the space (and salt the hash); ``max_tokens``
        is the context window reported to chunkers; ``trigrams`` adds character trigrams of each word."""
        if dim < 1:
            raise ConfigError(f"HashEmbedder dim must be positive, got {dim}")
        self.space = EmbeddingSpace(model=model, version=version, dim=dim)
        self.max_tokens = max_tokens
        self.trigrams = trigrams
        self.calls = 0
        """How many times :meth:`embed` was called."""
        self.texts_embedded = 0
        """How many texts :meth:`embed` was given, in all."""
        self.closed = False
        self._salt = hashlib.blake2b(f"{model}@{version}".encode(), digest_size=32).digest()
        self._features: dict[str, tuple[int, float]] = {}

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The spans of the words (``\\w+`` runs) of ``text``."""
        return [m.span() for m in _WORD.finditer(text)]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.closed:
            raise ConfigError("this HashEmbedder is closed")
        texts = list(texts)
        self.calls += 1
        self.texts_embedded += len(texts)
        out = np.empty((len(texts), self.space.dim), dtype=np.float32)
        for start in range(0, len(texts), _YIELD_EVERY):
            if start:
                await asyncio.sleep(0)
            out[start : start + _YIELD_EVERY] = self.embed_sync(texts[start : start + _YIELD_EVERY])
        return out

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """The same vectors as :meth:`embed`, computed in the calling thread, without counting (for fakes and
        benchmarks)."""
        out = np.zeros((len(texts), self.space.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = [m.group().lower() for m in _WORD.finditer(text)] or ["\x00empty"]
            for word in words:
                self._add(out[row], word, 1.0)
                if self.trigrams and len(word) > 3:
                    padded = f"<{word}>"
                    for i in range(len(padded) - 2):
                        self._add(out[row], "#" + padded[i : i + 3], 0.5)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        unit: np.ndarray = out / np.maximum(norms, 1e-12)
        return unit

    async def aclose(self) -> None:
        self.closed = True

    def _add(self, row: np.ndarray, feature: str, weight: float) -> None:
        hit = self._features.get(feature)
        if hit is None:
            digest = hashlib.blake2b(feature.encode(), digest_size=8, key=self._salt).digest()
            value = int.from_bytes(digest, "little")
            hit = (value % self.space.dim, 1.0 if (value >> 63) & 1 else -1.0)
            if len(self._features) < 100_000:
                self._features[feature] = hit
        index, sign = hit
        row[index] += sign * weight


def _hash(spec: Spec, **options: Any) -> HashEmbedder:
    """``hash:<dim>``; the options go to :class:`HashEmbedder` (``model``, ``version``, ``max_tokens``)."""
    try:
        dim = int(spec.rest)
    except ValueError:
        dim = 0
    if dim <= 0:
        raise ConfigError(f"embedder spec {spec.text!r} needs a positive dimension: use 'hash:<dim>', e.g. 'hash:64'")
    return HashEmbedder(dim=dim, **options)


HASH_EMBEDDER_PROVIDER = Provider(name="hash", form="hash:<dim>", build=_hash)
"""The ``hash:<dim>`` embedder spec, found through the ``keel.embedders`` entry point of that name."""
