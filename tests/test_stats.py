"""SummaryStats: R's sslmm, validation, addition, subsetting and the Zarr store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from reference_cases import as_array, load_case
from zarr.core.group import AsyncGroup

from flashmm_dask.errors import InputError, StoreError
from flashmm_dask.stats.summary import FORMAT, FORMAT_VERSION, SummaryStats

STATS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")


def toy_arrays(n: int = 50, m: int = 6, seed: int = 0) -> tuple[np.ndarray, sp.csr_matrix, Any]:
    """X (n x 3), Y (m x n, sparse, features x cells), Z (n x 7, sparse; d = (4, 3))."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    Y = sp.random(m, n, density=0.4, format="csr", rng=rng) * 10
    a, b = rng.integers(0, 4, n), rng.integers(0, 3, n)
    rows = np.arange(n)
    Z = sp.csr_matrix((np.ones(2 * n), (np.r_[rows, rows], np.r_[a, 4 + b])), shape=(n, 7))
    return X, Y, Z


def toy_stats(**kwargs: Any) -> SummaryStats:
    X, Y, Z = toy_arrays(**kwargs)
    return SummaryStats.from_arrays(
        X,
        Y,
        Z,
        d=(4, 3),
        covariates=["(Intercept)", "x", "gB"],
        random=[*(f"a{k}" for k in range(4)), *(f"b{k}" for k in range(3))],
        components=["a", "b"],
        features=[f"gene{j}" for j in range(Y.shape[0])],
        provenance={"source": "toy", "transform": "none"},
    )


def assert_same(a: SummaryStats, b: SummaryStats) -> None:
    """Exactly equal statistics and names."""
    for k in STATS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    for k in ("n", "d", "covariates", "random", "components", "features", "provenance"):
        assert getattr(a, k) == getattr(b, k), k


# -- from_arrays (R's sslmm) -------------------------------------------------------------


def r_model_matrices(case_name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """X and Z of a simu case written out in NumPy (R's column order), and the summary."""
    case = load_case(case_name)
    c, s = case["cells"], case["summary"]
    cls = np.column_stack([np.asarray(c["cls"]) == k for k in "123"]).astype(float)
    trt_b = (np.asarray(c["trt"]) == "B").astype(float)[:, None]
    X = np.column_stack([np.log(as_array(c["libsize"])), cls, cls * trt_b])
    d = np.atleast_1d(s["d"])
    levels = [name[len("sam") :] for name in s["random"][: d[0]]]
    Z = np.column_stack([np.asarray(c["sam"]) == lv for lv in levels]).astype(float)
    if len(d) == 2:
        Z = np.hstack([Z, Z * as_array(c["time"])[:, None]])
    return X, Z, s


@pytest.mark.parametrize("case_name", ["simu_reml_k1", "simu_reml_k2"])
@pytest.mark.parametrize("sparse", [False, True])
def test_from_arrays_matches_r_sslmm(case_name: str, sparse: bool) -> None:
    X, Z, s = r_model_matrices(case_name)
    Y = np.log2(1 + as_array(load_case(case_name)["cells"]["counts"]))  # m x n
    if sparse:
        Y, Z = sp.csr_matrix(Y), sp.csr_matrix(Z)
    stats = SummaryStats.from_arrays(
        X, Y, Z, d=tuple(np.atleast_1d(s["d"])), features=s["features"]
    )
    for k in STATS:
        np.testing.assert_allclose(getattr(stats, k), as_array(s[k]), rtol=1e-10, err_msg=k)
    assert stats.n == s["n"]
    assert stats.features == tuple(s["features"])


def test_from_arrays_dense_and_sparse_agree() -> None:
    X, Y, Z = toy_arrays()
    sparse = SummaryStats.from_arrays(X, Y, Z, d=(4, 3))
    dense = SummaryStats.from_arrays(X, Y.toarray(), Z.toarray(), d=(4, 3))
    for k in STATS:
        np.testing.assert_allclose(getattr(sparse, k), getattr(dense, k), rtol=1e-13)


def test_from_arrays_names_and_defaults() -> None:
    X, Y, Z = toy_arrays()
    stats = SummaryStats.from_arrays(
        pd.DataFrame(X, columns=["a", "b", "c"]),
        Y,
        pd.DataFrame(Z.toarray(), columns=list("ZYXWVUT")),
    )
    assert stats.covariates == ("a", "b", "c")
    assert stats.random == tuple("ZYXWVUT")
    assert stats.d == (7,)
    assert stats.components == ("var1",)
    assert stats.features == tuple(f"F{j}" for j in range(1, 7))


def test_from_arrays_wrong_orientation() -> None:
    X, Y, Z = toy_arrays()
    with pytest.raises(InputError, match="Y must be features x cells"):
        SummaryStats.from_arrays(X, Y.T, Z)


# -- validation --------------------------------------------------------------------------


def test_arrays_are_read_only_float64_copies() -> None:
    stats = toy_stats()
    XX = np.array(stats.XX)
    copy = SummaryStats(**{**vars(stats), "XX": XX})
    XX[0, 0] = 1e9  # the caller's array stays the caller's
    assert copy.XX[0, 0] == stats.XX[0, 0]
    assert all(getattr(stats, k).dtype == np.float64 for k in STATS)
    with pytest.raises(ValueError, match="read-only"):
        stats.XY[0, 0] = 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"XY": np.zeros((3, 5))}, r"XY has shape \(3, 5\) .* imply \(3, 6\)"),
        ({"ZX": np.zeros((6, 3))}, r"ZX has shape \(6, 3\) .* imply \(7, 3\)"),
        ({"Ynorm": np.zeros(7)}, r"Ynorm has shape \(7,\)"),
        ({"XX": np.zeros(3)}, "XX must be 2-dimensional"),
        ({"d": (4, 4)}, r"d=\(4, 4\) add up to 8 but there are q=7"),
        ({"d": (4, 0, 3)}, "positive integers"),
        ({"components": ("a",)}, r"1 component names .* for 2 component sizes"),
        ({"n": -1}, "n must be a non-negative integer"),
        ({"n": 2.5}, "n must be a non-negative integer"),
        ({"features": "gene0"}, "sequence of names"),
    ],
)
def test_validation_says_what_is_wrong(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        SummaryStats(**{**vars(toy_stats()), **change})


def test_to_dict() -> None:
    stats = toy_stats()
    out = stats.to_dict()
    assert set(out) == {*STATS, "n", "d"}
    assert out["n"] == 50 and out["d"] == (4, 3)
    _, Y, Z = toy_arrays()
    np.testing.assert_allclose(out["ZY"], Z.toarray().T @ Y.toarray().T, rtol=1e-13)


# -- addition and subsets ------------------------------------------------------------------


def test_halves_add_up_to_the_whole() -> None:
    X, Y, Z = toy_arrays()
    whole = SummaryStats.from_arrays(X, Y, Z, d=(4, 3))
    first = SummaryStats.from_arrays(X[:20], Y[:, :20], Z[:20], d=(4, 3))
    second = SummaryStats.from_arrays(X[20:], Y[:, 20:], Z[20:], d=(4, 3))
    for total in (first + second, sum([first, second])):
        for k in STATS:
            np.testing.assert_allclose(getattr(total, k), getattr(whole, k), rtol=1e-13)
        assert total.n == 50


def test_add_keeps_provenance_of_both_parts() -> None:
    a = toy_stats()
    b = SummaryStats(**{**vars(a), "provenance": {"source": "other"}})
    assert (a + a).provenance == a.provenance
    assert (a + b + b).provenance == {
        "parts": [a.provenance, {"source": "other"}, {"source": "other"}]
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"covariates": ("(Intercept)", "x", "gC")},
            "covariates: position 2 is 'gB' on the left, 'gC'",
        ),
        ({"features": tuple(f"g{j}" for j in range(6))}, "features: position 0 is 'gene0'"),
        ({"components": ("a", "c")}, "components: position 1"),
    ],
)
def test_add_with_different_names(change: dict[str, Any], message: str) -> None:
    a = toy_stats()
    b = SummaryStats(**{**vars(a), **change})
    with pytest.raises(InputError, match=f"different designs or features; {message}"):
        a + b


def test_add_with_different_feature_count() -> None:
    a = toy_stats()
    with pytest.raises(InputError, match="features: 6 on the left, 2 on the right"):
        a + a.subset([0, 1])


@pytest.mark.parametrize(
    "selection",
    [
        ["gene4", "gene1"],
        [4, 1],
        [-2, 1],
        np.array([4, 1]),
    ],
)
def test_subset_by_names_or_positions(selection: Any) -> None:
    X, Y, Z = toy_arrays()
    expected = SummaryStats.from_arrays(X, Y[[4, 1]], Z, d=(4, 3))
    sub = toy_stats().subset(selection)
    assert sub.features == ("gene4", "gene1")
    for k in STATS:
        np.testing.assert_allclose(getattr(sub, k), getattr(expected, k), rtol=1e-13)


def test_subset_by_mask() -> None:
    stats = toy_stats()
    mask = np.array([True, False, False, True, False, True])
    sub = stats.subset(mask)
    assert sub.features == ("gene0", "gene3", "gene5")
    np.testing.assert_array_equal(sub.ZY, stats.ZY[:, [0, 3, 5]])
    assert stats.subset("gene2").features == ("gene2",)


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ([], "empty"),
        (np.zeros(6, dtype=bool), "selects no feature"),
        (np.ones(5, dtype=bool), "mask has length 5, expected m=6"),
        (
            ["gene1", "nope"],
            r"1 of the selected features are not in the statistics, e.g. \['nope'\]",
        ),
        ([6], "position 6 is out of range for m=6"),
        ([1.5], "by name, integer position or boolean mask"),
    ],
)
def test_subset_errors(selection: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        toy_stats().subset(selection)


def test_subset_by_duplicated_name_is_refused() -> None:
    stats = SummaryStats(**{**vars(toy_stats()), "features": ("a", "b", "a", "c", "d", "e")})
    with pytest.raises(InputError, match="occur more than once"):
        stats.subset(["a"])
    assert stats.subset([2]).features == ("a",)


# -- storage ------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    stats = toy_stats()
    stats.save(tmp_path / "stats.zarr")
    loaded = SummaryStats.load(tmp_path / "stats.zarr")
    assert_same(loaded, stats)
    attrs = dict(zarr.open_group(str(tmp_path / "stats.zarr"), mode="r").attrs)
    assert attrs["format"] == "flashmm_dask.summary_stats"
    assert attrs["format_version"] == 1
    assert attrs["package_version"]
    assert attrs["complete"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.zarr"]  # no temporaries


def test_stored_statistics_are_chunked_along_the_features_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each statistic's chunks are whole along every axis but the features', cut into
    pieces of at most _CHUNK_BYTES (not zarr's default tiles: one file and compression
    per tile), and the statistics read back the same."""
    import flashmm_dask.stats.store as store

    rng = np.random.default_rng(5)
    p, q, m = 3, 40, 1000
    stats = SummaryStats(
        XX=np.eye(p),
        XY=rng.random((p, m)),
        ZX=rng.random((q, p)),
        ZY=rng.random((q, m)),
        ZZ=np.eye(q),
        Ynorm=rng.random(m) + 1,
        n=500,
        d=(q,),
        covariates=[f"x{k}" for k in range(p)],
        random=[f"z{k}" for k in range(q)],
        components=("donor",),
        features=[f"g{k}" for k in range(m)],
        nnz=rng.integers(0, 500, m),
    )
    monkeypatch.setattr(store, "_CHUNK_BYTES", 8 * q * 300)  # 300 features of Z'E a chunk
    stats.save(tmp_path / "stats.zarr")
    group = zarr.open_group(str(tmp_path / "stats.zarr"), mode="r")
    assert group["ZY"].chunks == (q, 300)
    assert group["XY"].chunks == (p, 1000)
    assert group["ZZ"].chunks == (q, q)
    assert group["Ynorm"].chunks == group["nnz"].chunks == (1000,)
    assert_same(SummaryStats.load(tmp_path / "stats.zarr"), stats)


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "stats.zarr"
    toy_stats(seed=1).save(path)
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        toy_stats(seed=2).save(path)
    assert_same(SummaryStats.load(path), toy_stats(seed=1))
    toy_stats(seed=2).save(path, overwrite=True)
    assert_same(SummaryStats.load(path), toy_stats(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.zarr"]


def test_overwrite_never_replaces_something_else(tmp_path: Path) -> None:
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a summary-statistics store; refusing"):
        toy_stats().save(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails midway leaves no store and keeps the store it would replace."""
    path = tmp_path / "stats.zarr"
    # the arrays are created concurrently, by zarr's asynchronous group
    create_array = AsyncGroup.create_array

    async def failing_create_array(self: Any, name: str, **kwargs: Any) -> Any:
        if name == "ZY":
            raise OSError("disk full")
        return await create_array(self, name, **kwargs)

    monkeypatch.setattr(AsyncGroup, "create_array", failing_create_array)
    with pytest.raises(StoreError, match=r"could not write summary statistics .*disk full"):
        toy_stats().save(path)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    toy_stats(seed=1).save(path)
    monkeypatch.setattr(AsyncGroup, "create_array", failing_create_array)
    with pytest.raises(StoreError, match="disk full"):
        toy_stats(seed=2).save(path, overwrite=True)
    monkeypatch.undo()
    assert_same(SummaryStats.load(path), toy_stats(seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.zarr"]


def test_remote_url_round_trip_and_incomplete_write(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "memory://flashmm-test-stats/stats.zarr"
    stats = toy_stats()
    stats.save(url)
    assert_same(SummaryStats.load(url), stats)
    with pytest.raises(StoreError, match="already exists"):
        stats.save(url)

    # the arrays are created concurrently, by zarr's asynchronous group
    create_array = AsyncGroup.create_array

    async def failing_create_array(self: Any, name: str, **kwargs: Any) -> Any:
        if name == "Ynorm":
            raise OSError("connection reset")
        return await create_array(self, name, **kwargs)

    monkeypatch.setattr(AsyncGroup, "create_array", failing_create_array)
    with pytest.raises(StoreError, match="incomplete"):
        stats.save(url, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="is incomplete"):
        SummaryStats.load(url)
    stats.save(url, overwrite=True)
    assert_same(SummaryStats.load(url), stats)


def test_load_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no summary-statistics store at"):
        SummaryStats.load(tmp_path / "absent.zarr")


def test_load_refuses_other_formats_and_newer_versions(tmp_path: Path) -> None:
    path = tmp_path / "stats.zarr"
    toy_stats().save(path)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(
        StoreError, match=rf"format version {FORMAT_VERSION + 1} .* upgrade flashmm_dask"
    ):
        SummaryStats.load(path)
    group.attrs["format"] = "flashmm_dask.results"
    with pytest.raises(StoreError, match="not a summary-statistics store: its format is"):
        SummaryStats.load(path)
    group.attrs["format"] = FORMAT
    group.attrs["format_version"] = FORMAT_VERSION
    del group["XY"]
    with pytest.raises(StoreError, match="not a consistent summary-statistics store"):
        SummaryStats.load(path)


def test_provenance_must_be_json(tmp_path: Path) -> None:
    stats = SummaryStats(**{**vars(toy_stats()), "provenance": {"when": object()}})
    with pytest.raises(InputError, match="provenance must be JSON-serialisable"):
        stats.save(tmp_path / "stats.zarr")
    assert not (tmp_path / "stats.zarr").exists()
    json.dumps(toy_stats().provenance)  # the ordinary case is serialisable
