"""reduce_stats / stats_graph: one Dask pass from chunked expression to SummaryStats.

Checked against R FLASHMM 1.3.0's summary statistics (tests/reference), against
SummaryStats.from_arrays (R's sslmm) and a plain dense NumPy computation, by invariances
(chunking, dense vs sparse, cell order, halves), by counting block reads, and on bad data.
"""

from __future__ import annotations

import pickle
import threading
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from reference_cases import as_array, load_case

from flashmm_dask.errors import DataError, DesignError, InputError
from flashmm_dask.stats.reduce import reduce_stats, stats_graph
from flashmm_dask.stats.summary import SummaryStats

STATS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")
FIXED = "~ 0 + log(libsize) + cls + cls:trt"
RANDOM = {"simu_reml_k1": "~ 0 + sam", "simu_reml_k2": ["~ 0 + sam", "~ 0 + sam:time"]}


# -- stand-ins for the inputs (Expression and Design interfaces) ------------------------


@dataclass
class Expression:
    data: Any
    features: pd.Index
    obs: pd.DataFrame


@dataclass
class SimuDesign:
    """R's model matrices of the simu cases, written directly in NumPy.

    X = [log(libsize), cls1..3, cls1..3 * (trt == B)]; Z = [sam indicators] and, when
    ``with_time``, [sam indicators * time]. Column names are R's, from the reference.
    """

    covariates: tuple[str, ...]
    random_names: tuple[str, ...]
    components: tuple[str, ...]
    d: tuple[int, ...]
    with_time: bool

    def X(self, obs: pd.DataFrame) -> np.ndarray:
        cls = np.column_stack([obs["cls"].to_numpy() == k for k in "123"]).astype(float)
        trt_b = (obs["trt"].to_numpy() == "B").astype(float)[:, None]
        return np.column_stack([np.log(obs["libsize"].to_numpy(float)), cls, cls * trt_b])

    def Z(self, obs: pd.DataFrame) -> sp.csr_matrix:
        levels = [name[len("sam") :] for name in self.random_names[: self.d[0]]]
        sam = np.column_stack([obs["sam"].to_numpy() == lv for lv in levels]).astype(float)
        if self.with_time:
            sam = np.hstack([sam, sam * obs["time"].to_numpy(float)[:, None]])
        return sp.csr_matrix(sam)


@dataclass
class ToyDesign:
    """X = [1, x, g indicators but the first]; Z = [subject indicators, subject * x]."""

    n_groups: int = 3
    n_subjects: int = 5
    calls: Counter | None = None

    @property
    def covariates(self) -> tuple[str, ...]:
        return ("(Intercept)", "x", *(f"g{k}" for k in range(1, self.n_groups)))

    @property
    def random_names(self) -> tuple[str, ...]:
        s = range(self.n_subjects)
        return (*(f"s{k}" for k in s), *(f"s{k}:x" for k in s))

    @property
    def components(self) -> tuple[str, ...]:
        return ("s", "s:x")

    @property
    def d(self) -> tuple[int, ...]:
        return (self.n_subjects, self.n_subjects)

    def X(self, obs: pd.DataFrame) -> np.ndarray:
        if self.calls is not None:
            self.calls["X"] += 1
        g = obs["g"].to_numpy()
        groups = np.column_stack([g == k for k in range(1, self.n_groups)]).astype(float)
        return np.column_stack([np.ones(len(obs)), obs["x"].to_numpy(), groups])

    def Z(self, obs: pd.DataFrame) -> sp.csr_matrix:
        s = obs["s"].to_numpy()
        ind = sp.csr_matrix(
            (np.ones(len(obs)), (np.arange(len(obs)), s)), shape=(len(obs), self.n_subjects)
        )
        return sp.hstack([ind, ind.multiply(obs["x"].to_numpy()[:, None])], format="csr")


@dataclass
class HeavyDesign(ToyDesign):
    payload: bytes = b"\0" * 1_000_000


def toy_data(n: int = 60, m: int = 9, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Toy obs and a cells x features count matrix with ~70% zeros and an all-zero cell."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {"x": rng.normal(size=n), "g": rng.integers(0, 3, n), "s": rng.integers(0, 5, n)}
    )
    counts = rng.poisson(2.0, size=(n, m)) * (rng.random((n, m)) < 0.3)
    counts[3] = 0
    return obs, counts.astype(float)


def dask_matrix(E: np.ndarray, chunks: Any, sparse: bool) -> da.Array:
    x = da.from_array(E, chunks=chunks)
    if sparse:
        x = x.map_blocks(sp.csr_matrix, dtype=float, meta=sp.csr_matrix((0, 0)))
    return x


def dense_stats(X: np.ndarray, E: np.ndarray, Z: np.ndarray) -> dict[str, Any]:
    """The statistics from dense matrices, E cells x features (the definition)."""
    return {
        "XX": X.T @ X,
        "XY": X.T @ E,
        "ZX": Z.T @ X,
        "ZY": Z.T @ E,
        "ZZ": Z.T @ Z,
        "Ynorm": (E**2).sum(axis=0),
        "n": X.shape[0],
    }


def assert_stats_close(a: SummaryStats, b: Any, rtol: float = 1e-12) -> None:
    get = (lambda k: b[k]) if isinstance(b, dict) else (lambda k: getattr(b, k))
    for k in STATS:
        np.testing.assert_allclose(getattr(a, k), get(k), rtol=rtol, atol=0, err_msg=k)
    assert a.n == get("n")


# -- the R reference --------------------------------------------------------------------


def simu(case_name: str) -> tuple[dict, pd.DataFrame, np.ndarray, SimuDesign]:
    case = load_case(case_name)
    cells, s = case["cells"], case["summary"]
    obs = pd.DataFrame({k: cells[k] for k in ("sam", "cls", "trt", "libsize", "time")})
    counts = as_array(cells["counts"]).T  # cells x features
    d = tuple(int(k) for k in np.atleast_1d(s["d"]))
    design = SimuDesign(
        covariates=tuple(s["covariates"]),
        random_names=tuple(s["random"]),
        components=("sam", "sam:time")[: len(d)],
        d=d,
        with_time=len(d) == 2,
    )
    return s, obs, counts, design


@pytest.mark.parametrize("case_name", ["simu_reml_k1", "simu_reml_k2"])
@pytest.mark.parametrize("chunks", [(3000, -1), (512, -1), (211, 11)])
def test_matches_r_summary(case_name: str, chunks: tuple[int, int]) -> None:
    s, obs, counts, design = simu(case_name)
    expr = Expression(dask_matrix(counts, chunks, sparse=True), pd.Index(s["features"]), obs)
    stats = reduce_stats(expr, design, transform="log2p1")
    for k in STATS:
        np.testing.assert_allclose(getattr(stats, k), as_array(s[k]), rtol=1e-10, err_msg=k)
    assert stats.n == s["n"]
    assert stats.d == tuple(np.atleast_1d(s["d"]))
    assert stats.covariates == tuple(s["covariates"])
    assert stats.random == tuple(s["random"])
    assert stats.features == tuple(s["features"])


@pytest.mark.parametrize("case_name", ["simu_reml_k1", "simu_reml_k2"])
def test_scipy_fallback_matches_r_without_numba(case_name: str, monkeypatch) -> None:
    """Without numba the products fall back to scipy: the same statistics as R."""
    import flashmm_dask.stats.products as block_products

    monkeypatch.setattr(block_products, "_compiled", lambda name: None)
    s, obs, counts, design = simu(case_name)
    expr = Expression(dask_matrix(counts, (512, -1), sparse=True), pd.Index(s["features"]), obs)
    stats = reduce_stats(expr, design, transform="log2p1")
    for k in STATS:
        np.testing.assert_allclose(getattr(stats, k), as_array(s[k]), rtol=1e-10, err_msg=k)


@pytest.mark.parametrize("case_name", ["simu_reml_k1", "simu_reml_k2"])
def test_matches_r_with_real_design(case_name: str) -> None:
    from flashmm_dask.design.formula import build_design

    s, obs, counts, _ = simu(case_name)
    design = build_design(obs, FIXED, RANDOM[case_name])
    expr = Expression(dask_matrix(counts, (700, 17), sparse=True), pd.Index(s["features"]), obs)
    stats = reduce_stats(expr, design, transform="log2p1")
    for k in STATS:
        np.testing.assert_allclose(getattr(stats, k), as_array(s[k]), rtol=1e-10, err_msg=k)
    assert stats.random == tuple(s["random"])
    assert stats.components == design.components
    assert stats.provenance["fixed"] == FIXED
    assert stats.provenance["transform"] == "log2p1"


@pytest.mark.parametrize("case_name", ["simu_reml_k1", "simu_reml_k2"])
def test_from_arrays_equals_reduce_equals_r(case_name: str) -> None:
    s, obs, counts, design = simu(case_name)
    Y = sp.csr_matrix(np.log2(1 + counts).T)  # R orientation: features x cells
    in_memory = SummaryStats.from_arrays(design.X(obs), Y, design.Z(obs), d=design.d)
    expr = Expression(dask_matrix(counts, (1000, 8), sparse=False), pd.Index(s["features"]), obs)
    reduced = reduce_stats(expr, design, transform="log2p1")
    assert_stats_close(reduced, in_memory, rtol=1e-12)
    for k in STATS:
        np.testing.assert_allclose(getattr(in_memory, k), as_array(s[k]), rtol=1e-10)


# -- invariances ------------------------------------------------------------------------


@pytest.fixture
def toy() -> tuple[pd.DataFrame, np.ndarray, ToyDesign, dict[str, Any]]:
    obs, counts = toy_data()
    design = ToyDesign()
    E = np.log2(1 + counts)
    expected = dense_stats(design.X(obs), E, design.Z(obs).toarray())
    return obs, counts, design, expected


def toy_expr(obs: pd.DataFrame, E: np.ndarray, chunks: Any, sparse: bool) -> Expression:
    features = pd.Index([f"gene{j}" for j in range(E.shape[1])])
    return Expression(dask_matrix(E, chunks, sparse), features, obs)


@pytest.mark.parametrize("cell_chunk", [1, 7, 60])
@pytest.mark.parametrize("feature_chunk", [9, 4, 1])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunking_and_sparsity_do_not_change_stats(
    toy, cell_chunk: int, feature_chunk: int, sparse: bool
) -> None:
    obs, counts, design, expected = toy
    expr = toy_expr(obs, counts, (cell_chunk, feature_chunk), sparse)
    assert_stats_close(reduce_stats(expr, design, transform="log2p1"), expected)


@pytest.mark.parametrize("split_every", [2, 3, 100])
def test_split_every_does_not_change_stats(toy, split_every: int) -> None:
    obs, counts, design, expected = toy
    expr = toy_expr(obs, counts, (4, 5), sparse=True)
    stats = reduce_stats(expr, design, transform="log2p1", split_every=split_every)
    assert_stats_close(stats, expected)


def test_cell_order_does_not_change_stats(toy) -> None:
    obs, counts, design, expected = toy
    perm = np.random.default_rng(1).permutation(len(obs))
    expr = toy_expr(obs.iloc[perm], counts[perm], (11, 4), sparse=True)
    assert_stats_close(reduce_stats(expr, design, transform="log2p1"), expected)


def test_halves_add_up_to_the_whole(toy) -> None:
    obs, counts, design, _ = toy
    whole = reduce_stats(toy_expr(obs, counts, (13, 9), True), design, transform="log2p1")
    first = reduce_stats(toy_expr(obs[:25], counts[:25], (13, 9), True), design, transform="log2p1")
    second = reduce_stats(
        toy_expr(obs[25:], counts[25:], (13, 9), True), design, transform="log2p1"
    )
    assert_stats_close(first + second, whole)


def test_transform_none_uses_values_as_given(toy) -> None:
    obs, counts, design, _ = toy
    E = np.random.default_rng(2).normal(size=counts.shape)  # negative values are fine here
    expected = dense_stats(design.X(obs), E, design.Z(obs).toarray())
    assert_stats_close(reduce_stats(toy_expr(obs, E, (9, 4), False), design), expected)


@pytest.mark.parametrize("transform", ["log1p_scaled", "log1p_cpm"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("feature_chunk", [9, 4])
def test_scaled_log_transform(toy, transform: str, sparse: bool, feature_chunk: int) -> None:
    obs, counts, design, _ = toy
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        E = np.where(totals > 0, np.log1p(counts / totals * 1e6), 0.0)
    expected = dense_stats(design.X(obs), E, design.Z(obs).toarray())
    expr = toy_expr(obs, counts, (8, feature_chunk), sparse)
    stats = reduce_stats(expr, design, transform=transform, target_sum=1e6)
    assert_stats_close(stats, expected)
    assert stats.provenance == {"transform": transform, "target_sum": 1e6}


def test_non_canonical_csr_blocks(toy) -> None:
    """Duplicate (cell, feature) entries are summed before transforming and squaring."""
    obs, counts, design, expected = toy

    def split_entries(block: np.ndarray) -> sp.csr_matrix:
        c = sp.csr_matrix(block)  # each stored count becomes two stored halves
        twice = sp.csr_matrix(
            (np.repeat(c.data / 2, 2), np.repeat(c.indices, 2), 2 * c.indptr), shape=c.shape
        )
        assert not twice.has_canonical_format
        return twice

    x = da.from_array(counts, chunks=(10, 9)).map_blocks(
        split_entries, dtype=float, meta=sp.csr_matrix((0, 0))
    )
    expr = Expression(x, pd.Index([f"gene{j}" for j in range(9)]), obs)
    assert_stats_close(reduce_stats(expr, design, transform="log2p1"), expected)


# -- one pass ---------------------------------------------------------------------------

# Module-level so that tasks pickled by the distributed scheduler refer to them by name.
_SOURCES: dict[str, np.ndarray] = {}
_READS: Counter = Counter()
_READS_LOCK = threading.Lock()


def _load_block(placeholder: np.ndarray, source: str, block_info: Any = None) -> sp.csr_matrix:
    """The block of _SOURCES[source] at this position, counting the read."""
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    with _READS_LOCK:
        _READS[(source, r0, c0)] += 1
    return sp.csr_matrix(_SOURCES[source][r0:r1, c0:c1])


def counting_expr(obs: pd.DataFrame, counts: np.ndarray, chunks: Any, name: str) -> Expression:
    _SOURCES[name] = counts
    for key in [k for k in _READS if k[0] == name]:
        del _READS[key]
    shape = da.zeros(counts.shape, chunks=chunks)
    x = shape.map_blocks(_load_block, name, dtype=float, meta=sp.csr_matrix((0, 0)))
    return Expression(x, pd.Index([f"gene{j}" for j in range(counts.shape[1])]), obs)


def reads(name: str) -> Counter:
    return Counter({k: v for k, v in _READS.items() if k[0] == name})


@pytest.mark.parametrize("transform", ["log2p1", "log1p_scaled"])
def test_each_block_is_read_once_threaded(toy, transform: str) -> None:
    obs, counts, _, _ = toy
    design = ToyDesign(calls=Counter())
    expr = counting_expr(obs, counts, (7, 4), f"threaded-{transform}")
    graph = stats_graph(expr, design, transform=transform)
    assert not reads(f"threaded-{transform}")  # lazy: nothing read yet
    with dask.config.set(scheduler="threads"):
        stats = graph.compute()
    counted = reads(f"threaded-{transform}")
    assert len(counted) == expr.data.npartitions == 9 * 3
    assert set(counted.values()) == {1}
    assert design.calls["X"] == 9  # the design once per cell chunk, not per block
    assert isinstance(stats, SummaryStats) and stats.n == 60


@pytest.mark.distributed
def test_each_block_is_read_once_distributed(toy) -> None:
    from distributed import Client, LocalCluster

    obs, counts, design, expected = toy
    expr = counting_expr(obs, counts, (7, 4), "distributed")
    calls: list[tuple[int, int]] = []
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        stats = reduce_stats(expr, design, transform="log2p1", progress=lambda *a: calls.append(a))
    counted = reads("distributed")
    assert len(counted) == 27 and set(counted.values()) == {1}
    assert_stats_close(stats, expected)
    assert calls[-1] == (27, 27)


@pytest.mark.distributed
@pytest.mark.parametrize("feature_chunk", [-1, 4])
def test_large_obs_is_sent_once_not_in_every_task(toy, feature_chunk: int) -> None:
    """On a distributed client an obs over 4 MiB is scattered once and sliced on the
    cluster: the graph stays small (distributed warns about graphs over 10 MiB)."""
    from distributed import Client, LocalCluster

    obs, counts, design, expected = toy
    heavy = obs.assign(notes=[f"{i}" + "x" * 100_000 for i in range(len(obs))])  # unread
    expr = toy_expr(heavy, counts, (7, feature_chunk), sparse=True)
    local = stats_graph(expr, design, transform="log2p1")  # no client: rows in the tasks
    local_bytes = sum(len(pickle.dumps(t)) for t in dict(local.__dask_graph__()).values())
    assert local_bytes > len(obs) * 100_000
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        graph = stats_graph(expr, design, transform="log2p1")
        tasks = dict(graph.__dask_graph__())
        assert sum(str(k).startswith("flashmm-obs-") for k in tasks) == 9  # one per chunk
        sizes = [len(pickle.dumps(t)) for k, t in tasks.items() if "flashmm-obs-" not in str(k)]
        assert sum(sizes) < 1_000_000
        stats = graph.compute()
    assert_stats_close(stats, expected)


def test_progress_counts_blocks(toy) -> None:
    obs, counts, design, _ = toy
    calls: list[tuple[int, int]] = []
    expr = toy_expr(obs, counts, (20, 3), sparse=True)
    reduce_stats(expr, design, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 9) for k in range(1, 10)]


def test_design_object_is_one_graph_key(toy) -> None:
    """A large design is shipped once, not inside every task."""
    obs, counts, _, _ = toy
    expr = toy_expr(obs, counts, (5, 3), sparse=True)  # 12 cell chunks, 36 blocks
    graph = stats_graph(expr, HeavyDesign())
    per_task = sum(len(pickle.dumps(task)) for task in dict(graph.__dask_graph__()).values())
    assert 1_000_000 < per_task < 1_500_000


def _task_keys(graph: Any) -> set[str]:
    return {str(k[0] if isinstance(k, tuple) else k) for k in dict(graph.__dask_graph__())}


def test_small_reads_run_inside_the_reduction_tasks(toy) -> None:
    """A block read by a small task has no key of its own: it is read by the task that
    reduces it (it cannot wait in memory or move between workers)."""
    obs, counts, design, expected = toy
    expr = counting_expr(obs, counts, (7, -1), "inline")
    graph = stats_graph(expr, design, transform="log2p1")
    assert not any(k.startswith(expr.data.name) for k in _task_keys(graph))
    assert_stats_close(graph.compute(), expected)
    assert len(reads("inline")) == 9 and set(reads("inline").values()) == {1}


def test_chunks_are_folded_in_one_chain_per_thread(toy) -> None:
    """One feature chunk: each chunk's task adds into the running sums of its chain (the
    previous task of the chain its input), and only the chains' sums are summed (by the
    task that makes the statistics of them)."""
    obs, counts, design, expected = toy
    expr = counting_expr(obs, counts, (7, -1), "chains")
    with dask.config.set(num_workers=3):
        graph = stats_graph(expr, design, transform="log2p1")
    tasks = dict(graph.__dask_graph__())
    chunk_tasks = sorted(
        (k for k in tasks if str(k).startswith("flashmm-block-")),
        key=lambda k: int(str(k).split("-")[-2]),
    )
    assert len(chunk_tasks) == 9
    for i, key in enumerate(chunk_tasks):
        inputs = {str(d) for d in tasks[key].dependencies}
        assert (str(chunk_tasks[i - 3]) in inputs) == (i >= 3)  # chain i % 3
    assert not any(str(k).startswith("flashmm-sum-") for k in tasks)
    (total,) = [k for k in tasks if str(k).startswith("flashmm-stats-")]
    inputs = {str(d) for d in tasks[total].dependencies}
    assert {d for d in inputs if "flashmm-block-" in d} == {str(k) for k in chunk_tasks[6:]}
    assert_stats_close(graph.compute(scheduler="threads"), expected)
    assert len(reads("chains")) == 9 and set(reads("chains").values()) == {1}


def test_large_or_shared_reads_keep_their_keys(toy, monkeypatch) -> None:
    import flashmm_dask.stats.graph as graph_module

    obs, counts, design, expected = toy
    big = toy_expr(obs, counts, (7, -1), sparse=True)  # the matrix is in the graph
    monkeypatch.setattr(graph_module, "_INLINE_BYTES", 100)
    graph = stats_graph(big, design, transform="log2p1")
    assert any(k.startswith(big.data.name) for k in _task_keys(graph))
    assert_stats_close(graph.compute(), expected)
    monkeypatch.undo()
    # cell chunks of 7 from chunks of 10 computed by a task: two blocks share that task
    source = da.from_array(counts, chunks=(10, -1)).map_blocks(np.positive)
    shared = Expression(source.rechunk((7, -1)), big.features, obs)
    graph = stats_graph(shared, design, transform="log2p1")
    assert any(k.startswith(shared.data.name) for k in _task_keys(graph))
    assert_stats_close(graph.compute(), expected)


def test_memory_is_set_by_the_chunk_not_by_n() -> None:
    """200k cells x 2000 features, sparse: a dense copy would be 3.2 GB, a dense block 80 MB."""
    n, m, chunk = 200_000, 2_000, 10_000
    obs = pd.DataFrame({"x": np.linspace(-1, 1, n), "g": np.arange(n) % 3, "s": np.arange(n) % 5})

    def random_block(placeholder: np.ndarray, block_info: Any = None) -> sp.csr_matrix:
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        # counts (log2p1 refuses non-integer values, issue 16), stored as floats
        rng = np.random.default_rng(r0)
        counts = lambda k: rng.integers(1, 20, k).astype(float)  # noqa: E731
        return sp.random(r1 - r0, c1 - c0, density=2e-4, format="csr", rng=rng, data_rvs=counts)

    x = da.zeros((n, m), chunks=(chunk, m)).map_blocks(
        random_block, dtype=float, meta=sp.csr_matrix((0, 0))
    )
    expr = Expression(x, pd.Index([f"g{j}" for j in range(m)]), obs)
    tracemalloc.start()
    try:
        stats = reduce_stats(expr, ToyDesign(), transform="log2p1", split_every=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.n == n
    assert peak < 40e6, f"peak traced memory {peak / 1e6:.0f} MB"


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_names_cells_and_feature(toy, sparse: bool, bad: float) -> None:
    obs, counts, design, _ = toy
    counts = counts.copy()
    counts[23, 6] = bad
    counts[25, 5] = bad
    with pytest.raises(DataError, match=r"cells 20\.\.29 .*'gene5'"):
        reduce_stats(toy_expr(obs, counts, (10, 9), sparse), design, transform="log2p1")


def test_check_false_skips_the_checks(toy) -> None:
    obs, counts, design, _ = toy
    counts = counts.copy()
    counts[23, 6] = np.nan
    stats = reduce_stats(toy_expr(obs, counts, (10, 9), True), design, check=False)
    assert np.isnan(stats.Ynorm[6]) and np.isfinite(np.delete(stats.Ynorm, 6)).all()


@pytest.mark.parametrize("transform", ["log2p1", "log1p_scaled"])
@pytest.mark.parametrize("sparse", [False, True])
def test_negative_counts_name_feature(toy, transform: str, sparse: bool) -> None:
    obs, counts, design, _ = toy
    counts = counts.copy()
    counts[41, 2] = -1.0
    with pytest.raises(DataError, match=r"'gene2' has negative values.*is_counts=False"):
        reduce_stats(toy_expr(obs, counts, (10, 4), sparse), design, transform=transform)


def test_obs_length_must_match_cells(toy) -> None:
    obs, counts, design, _ = toy
    with pytest.raises(DataError, match="obs has 59 rows but the expression matrix has 60"):
        reduce_stats(toy_expr(obs[:-1], counts, (10, 9), True), design)


def test_feature_names_must_match_columns(toy) -> None:
    obs, counts, design, _ = toy
    expr = toy_expr(obs, counts, (10, 9), True)
    expr.features = expr.features[:-1]
    with pytest.raises(DataError, match="8 feature names for 9"):
        reduce_stats(expr, design)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transform": "log"}, "unknown transform 'log'"),
        ({"split_every": 1}, "split_every must be an integer >= 2"),
        ({"transform": "log1p_scaled", "target_sum": 0.0}, "target_sum must be a positive"),
    ],
)
def test_invalid_arguments(toy, kwargs: dict[str, Any], message: str) -> None:
    obs, counts, design, _ = toy
    with pytest.raises(InputError, match=message):
        stats_graph(toy_expr(obs, counts, (10, 9), True), design, **kwargs)


def test_data_must_be_a_dask_array(toy) -> None:
    obs, counts, design, _ = toy
    expr = Expression(counts, pd.Index([f"gene{j}" for j in range(9)]), obs)
    with pytest.raises(InputError, match=r"dask array.*from_arrays"):
        reduce_stats(expr, design)


def test_design_of_wrong_shape(toy) -> None:
    obs, counts, _, _ = toy

    class ShortDesign(ToyDesign):
        def X(self, obs: pd.DataFrame) -> np.ndarray:
            return super().X(obs)[:-1]

    with pytest.raises(DesignError, match=r"cells \d+\.\.\d+ gave X of shape \(9, 4\)"):
        reduce_stats(toy_expr(obs, counts, (10, 9), True), ShortDesign())
