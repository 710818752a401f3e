"""Tests of flashmm_dask.simulate, the simuRNAseq model.

Statistical checks recompute the model's NB means m_cg densely from the recorded truth
(obs, var, uns["simulation"]) and judge the counts by z-scores whose variances come from
the NB model itself (variance m + m^2 / phi); with fixed seeds they are deterministic,
and a threshold of 5 standard deviations leaves room for the 30-60 genes tested at once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from scipy import stats

from flashmm_dask.errors import InputError, StoreError
from flashmm_dask.io.anndata_store import write_store
from flashmm_dask.simulate import RNG_BLOCK_CELLS, simulate_rnaseq, simulate_to_store

REFERENCE = Path(__file__).parent / "reference"
Z_MAX = 5.0


# ----------------------------------------------------------------------------- helpers


def model_means(adata: ad.AnnData, *, with_beta: bool = True, with_re: bool = True):
    """NB means m_cg (cells x genes), dense, recomputed from the recorded truth."""
    sim = adata.uns["simulation"]
    obs, var = adata.obs, adata.var
    log_m = np.tile(np.log(var["gene_mean"].to_numpy()), (adata.n_obs, 1))
    if with_re:
        assert list(sim["subjects"]) == list(obs["sam"].cat.categories)
        log_m += np.asarray(sim["random_effects"])[obs["sam"].cat.codes.to_numpy()]
    if with_beta:
        treated = (obs["trt"] == sim["treatment"]).to_numpy()
        same_type = obs["cls"].to_numpy()[:, None] == var["de_celltype"].to_numpy()[None, :]
        log_m += np.where(treated[:, None] & same_type, var["beta"].to_numpy()[None, :], 0.0)
    log_lib = np.log(obs["libsize"].to_numpy())
    log_m += (log_lib - log_lib.mean())[:, None]
    return np.exp(log_m)


def nb_variance(m, phi):
    return m + m**2 / phi


def assert_x_equal(a, b):
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    assert (sp.csr_matrix(a) != sp.csr_matrix(b)).nnz == 0


def assert_uns_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_uns_equal(a[key], b[key])
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def assert_adata_equal(a, b):
    assert_x_equal(a.X, b.X)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert_uns_equal(a.uns, b.uns)


# ------------------------------------------------------------ reproducibility, invariance


def test_same_seed_same_data_and_other_seed_other_data():
    a = simulate_rnaseq(30, 400, seed=7)
    b = simulate_rnaseq(30, 400, seed=7)
    c = simulate_rnaseq(30, 400, seed=8)
    assert_adata_equal(a, b)
    assert (a.X != c.X).nnz > 0


def test_drawn_seed_is_recorded_and_reproduces():
    a = simulate_rnaseq(20, 300)
    seed = a.uns["simulation"]["seed"]
    assert_adata_equal(a, simulate_rnaseq(20, 300, seed=seed))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("chunk_cells", [1, 5, RNG_BLOCK_CELLS, RNG_BLOCK_CELLS + 1, 10_000])
def test_counts_do_not_depend_on_chunks_or_threads(chunk_cells, n_threads):
    # 300 cells span three RNG blocks, the last partial, so chunk edges cut blocks
    whole = simulate_rnaseq(20, 300, seed=3, chunk_cells=100_000)
    other = simulate_rnaseq(20, 300, seed=3, chunk_cells=chunk_cells, n_threads=n_threads)
    assert_adata_equal(whole, other)


def test_dtype_changes_storage_not_counts():
    a = simulate_rnaseq(20, 200, seed=4, dtype="int32")
    b = simulate_rnaseq(20, 200, seed=4, dtype="float32")
    assert a.X.dtype == np.int32 and b.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())


# ------------------------------------------------------------------------- structure


def test_structure_follows_the_model():
    n_genes, n_de = 50, 30
    a = simulate_rnaseq(
        n_genes, 2000, n_samples=9, n_celltypes=4, n_treatments=3, n_de_genes=n_de, seed=5
    )
    sim, obs, var = a.uns["simulation"], a.obs, a.var
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.int32
    assert list(obs.index[:3]) == ["cell1", "cell2", "cell3"]
    assert list(var.index[-1:]) == [f"gene{n_genes}"]
    for column in ("sam", "cls", "trt"):
        levels = list(obs[column].cat.categories)
        assert levels == sorted(set(obs[column].astype(str))), column

    # subjects are nested in treatments, named after them, n_samples in all
    assert list(obs["trt"].cat.categories) == ["A", "B", "C"]
    assert list(obs["cls"].cat.categories) == ["1", "2", "3", "4"]
    pairs = obs[["sam", "trt"]].astype(str).drop_duplicates()
    assert pairs["sam"].is_unique
    assert all(s.startswith(t) and s[1:].isdigit() for s, t in pairs.itertuples(index=False))
    per_trt = np.asarray(sim["samples_per_treatment"])
    assert per_trt.sum() == 9 and np.all(per_trt >= 1)
    for letter, count in zip("ABC", per_trt, strict=True):
        assert set(pairs.loc[pairs["trt"] == letter, "sam"]) <= {
            f"{letter}{j}" for j in range(1, count + 1)
        }
    assert sim["treatment"] == "C"

    # DE genes: the last n_de, one cell type each, |beta| in [minbeta, maxbeta], both signs
    de = var["de"].to_numpy()
    assert de.sum() == n_de and de[-n_de:].all()
    assert var["de_celltype"].isna().to_numpy().tolist() == (~de).tolist()
    assert set(var.loc[de, "de_celltype"]) <= set(obs["cls"].cat.categories)
    codes = var.loc[de, "de_celltype"].cat.codes.to_numpy()
    assert np.all(np.diff(codes) >= 0)  # assigned to cell types in sorted order
    beta = var["beta"].to_numpy()
    assert np.all(beta[~de] == 0)
    assert np.all((np.abs(beta[de]) >= 0.25) & (np.abs(beta[de]) <= 1.0))
    assert (beta[de] > 0).any() and (beta[de] < 0).any()

    # random effects: one row per subject level and gene
    assert np.asarray(sim["random_effects"]).shape == (obs["sam"].cat.categories.size, n_genes)
    assert np.all(obs["libsize"] > 0) and np.all(obs["libsize"] % 1 == 0)


def test_levels_sort_as_r_sorts_strings():
    # R's factor() sorts "10" before "2" and "A10" before "A2"
    a = simulate_rnaseq(5, 3000, n_samples=24, n_celltypes=12, n_de_genes=0, seed=6)
    cls = list(a.obs["cls"].cat.categories)
    assert cls == sorted(str(k) for k in range(1, 13)) and cls[:3] == ["1", "10", "11"]
    sam = list(a.obs["sam"].cat.categories)
    assert sam == sorted(sam) and len(sam) == 24
    assert a.obs["sam"].astype(str).tolist() == list(np.asarray(sam)[a.obs["sam"].cat.codes])


@pytest.mark.parametrize(
    ("direction", "minbeta", "maxbeta"), [("up", 0.5, 2.0), ("down", -2.0, -0.5)]
)
def test_direction_fixes_the_sign(direction, minbeta, maxbeta):
    a = simulate_rnaseq(
        20, 100, n_de_genes=10, direction=direction, minbeta=minbeta, maxbeta=maxbeta, seed=1
    )
    beta = a.var.loc[a.var["de"], "beta"].to_numpy()
    assert np.all((beta >= minbeta) & (beta <= maxbeta))


def test_naming_matches_r_simurnaseq_output():
    # the R case was simuRNAseq(nGenes=40, nCells=3000, nsam=12, ncls=3, ntrt=2)
    cells = json.loads((REFERENCE / "simu_reml_k1.json").read_text())["cells"]
    ours = simulate_rnaseq(40, 3000, n_samples=12, n_celltypes=3, n_treatments=2, seed=2)
    for column in ("cls", "trt"):
        assert sorted(set(cells[column])) == list(ours.obs[column].cat.categories)
    assert len(set(cells["sam"])) <= 12 and len(ours.obs["sam"].cat.categories) <= 12
    pattern = re.compile(r"^([A-Z])[1-9][0-9]*$")
    for sam, trt in [
        *zip(cells["sam"], cells["trt"], strict=True),
        *zip(ours.obs["sam"], ours.obs["trt"], strict=True),
    ]:
        match = pattern.match(sam)
        assert match is not None and match.group(1) == trt


# ----------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def large():
    return simulate_rnaseq(
        40, 6000, n_samples=8, n_celltypes=3, n_de_genes=15, var_randomeffects=0.3, seed=11
    )


def test_gene_totals_match_model_means(large):
    m = model_means(large)
    v = nb_variance(m, large.var["dispersion"].to_numpy())
    y = np.asarray(large.X.sum(axis=0)).ravel()
    z = (y - m.sum(axis=0)) / np.sqrt(v.sum(axis=0))
    assert np.abs(z).max() < Z_MAX


def test_variance_matches_nb_dispersion(large):
    # sum of squared Pearson residuals per gene: mean 1, variance excess kurtosis + 2
    m = model_means(large)
    phi = large.var["dispersion"].to_numpy()[None, :]
    y = large.X.toarray()
    r2 = (y - m) ** 2 / nb_variance(m, phi)
    kurt = stats.nbinom(phi, phi / (phi + m)).stats(moments="k")
    z = (r2.sum(axis=0) - large.n_obs) / np.sqrt((kurt + 2).sum(axis=0))
    assert np.abs(z).max() < Z_MAX


def test_de_log_fold_change_near_beta(large):
    sim, obs, var = large.uns["simulation"], large.obs, large.var
    m = model_means(large)
    m0 = model_means(large, with_beta=False)
    v = nb_variance(m, var["dispersion"].to_numpy())
    y = large.X.toarray()
    treated = (obs["trt"] == sim["treatment"]).to_numpy()
    for g in np.flatnonzero(var["de"].to_numpy()):
        cells = treated & (obs["cls"] == var["de_celltype"].iloc[g]).to_numpy()
        estimate = np.log(y[cells, g].sum() / m0[cells, g].sum())
        sd = np.sqrt(v[cells, g].sum()) / m[cells, g].sum()  # delta method
        assert sd < 0.1  # the sample resolves |beta| >= 0.25
        assert abs(estimate - var["beta"].iloc[g]) < Z_MAX * sd, var.index[g]


def test_subject_effects_have_the_variance_and_drive_the_counts(large):
    sim = large.uns["simulation"]
    b = np.asarray(sim["random_effects"])
    v = sim["var_randomeffects"]
    # b ~ N(0, v) iid: mean(b^2) ~ v chi2_N / N, sd v sqrt(2 / N)
    assert abs(np.mean(b**2) - v) < Z_MAX * v * np.sqrt(2 / b.size)
    assert abs(b.mean()) < Z_MAX * np.sqrt(v / b.size)
    # the counts of each subject and gene reflect b: log(observed / expected without b)
    m = model_means(large)
    m0 = model_means(large, with_re=False)
    var_y = nb_variance(m, large.var["dispersion"].to_numpy())
    one_hot = sp.csr_matrix(pd.get_dummies(large.obs["sam"]).to_numpy(dtype=float).T)
    y_s = np.asarray((one_hot @ large.X).todense())
    b_hat = np.log(y_s / (one_hot @ m0))
    sd = np.sqrt(one_hot @ var_y) / (one_hot @ m)
    assert np.abs((b_hat - b) / sd).max() < Z_MAX


@pytest.mark.parametrize(
    ("gene_mean", "dispersion"),
    [
        (0.05, None),  # atlas-like: ~5% non-zeros, conditioned values by inversion
        (np.geomspace(0.01, 60.0, 40), np.geomspace(0.2, 8.0, 40)[::-1]),  # both branches
    ],
)
def test_sparse_draws_match_dense_gamma_poisson_draws(gene_mean, dispersion):
    # The counts are drawn in sparse form (candidates, thinning, NB conditioned on > 0);
    # the generator they replace drew every entry as Poisson(m G / phi), G ~ Gamma(phi).
    # Per gene, the zeros, ones, sum and sum of squares of the two must agree within
    # their Monte Carlo error (two-sample z-scores; Var of a sum of Y^2 bounded by the
    # sum of Y^4, estimated from both samples), and the zeros match the exact NB P(0).
    a = simulate_rnaseq(
        40,
        6000,
        n_samples=30,
        n_celltypes=3,
        n_de_genes=15,
        var_randomeffects=0.3,
        gene_mean=gene_mean,
        dispersion=dispersion,
        seed=13,
    )
    m = model_means(a)
    phi = a.var["dispersion"].to_numpy()[None, :]
    rng = np.random.default_rng(99)
    dense = rng.poisson(m * rng.standard_gamma(np.broadcast_to(phi, m.shape)) / phi)
    ours = a.X.toarray().astype(np.float64)
    p0 = (phi / (phi + m)) ** phi
    zeros = (ours == 0).sum(axis=0)
    z = (zeros - p0.sum(axis=0)) / np.sqrt((p0 * (1 - p0)).sum(axis=0))
    assert np.abs(z).max() < Z_MAX
    for power in ("zeros", "ones", 1, 2):
        if isinstance(power, str):
            x, y = (ours == (power == "ones")), (dense == (power == "ones"))
        else:
            x, y = ours**power, dense.astype(np.float64) ** power
        spread = (x.astype(float) ** 2).sum(axis=0) + (y.astype(float) ** 2).sum(axis=0)
        if power == 1:  # exact: twice the sum of the NB variances
            spread = 2 * nb_variance(m, phi).sum(axis=0)
        z = (x.sum(axis=0) - y.sum(axis=0)) / np.sqrt(spread)
        assert np.abs(z).max() < Z_MAX, power


@pytest.mark.parametrize("given", [False, True])
def test_library_sizes_are_reference_column_sums(given):
    n_genes, n_cells = 60, 3000
    kwargs = {}
    if given:  # all distinct p = phi / (phi + mu): one draw per gene and cell
        kwargs = {
            "gene_mean": np.linspace(0.2, 3.0, n_genes),
            "dispersion": np.linspace(0.5, 4.0, n_genes)[::-1],
        }
    a = simulate_rnaseq(n_genes, n_cells, seed=9, **kwargs)
    mu, phi = a.var["gene_mean"].to_numpy(), a.var["dispersion"].to_numpy()
    lib = a.obs["libsize"].to_numpy()
    var_g = nb_variance(mu, phi)
    mean, var = mu.sum(), var_g.sum()
    assert abs(lib.mean() - mean) < Z_MAX * np.sqrt(var / n_cells)
    # sample variance: sd sqrt((2 var^2 + kappa4) / n), kappa4 = sum of the NB 4th cumulants
    kappa4 = (stats.nbinom(phi, phi / (phi + mu)).stats(moments="k") * var_g**2).sum()
    assert abs(lib.var(ddof=1) - var) < Z_MAX * np.sqrt((2 * var**2 + kappa4) / n_cells)


def test_empty_reference_libraries_are_redrawn():
    mu, phi, n = 0.5, 1.0, 3000
    a = simulate_rnaseq(1, n, gene_mean=mu, dispersion=phi, n_de_genes=0, seed=2)
    lib = a.obs["libsize"].to_numpy()
    assert lib.min() >= 1
    # NB conditioned on > 0: mean mu / (1 - p0), second moment (v + mu^2) / (1 - p0)
    p0 = (phi / (phi + mu)) ** phi
    mean = mu / (1 - p0)
    var = (nb_variance(mu, phi) + mu**2) / (1 - p0) - mean**2
    assert abs(lib.mean() - mean) < Z_MAX * np.sqrt(var / n)


def test_count_totals_against_libsize_as_in_r_output():
    # E[total counts of cell c] = sum(mu) e^(v/2) libsize_c / G, G the geometric mean of
    # libsize, and sum(mu) ~ mean(libsize) (exactly so in R, whose mu are the reference's
    # row means). T = mean(total) G / (mean(libsize)^2 e^(v/2)) ~ 1; its spread is that of
    # the mean of e^b over subjects x genes: sqrt((e^v - 1) e^v / 480) = 0.016 for 12 x 40.
    def statistic(counts_per_cell, libsize, v=0.1):
        geo = np.exp(np.mean(np.log(libsize)))
        return counts_per_cell.mean() * geo / (libsize.mean() ** 2 * np.exp(v / 2))

    tol = Z_MAX * 0.016
    for name in ("simu_reml_k1", "simu_reml_k2"):
        cells = json.loads((REFERENCE / f"{name}.json").read_text())["cells"]
        counts = np.asarray(cells["counts"], dtype=float)
        r_stat = statistic(counts.sum(axis=0), np.asarray(cells["libsize"], dtype=float))
        assert abs(r_stat - 1) < tol, name
    ours = simulate_rnaseq(40, 3000, n_samples=12, seed=12)
    our_stat = statistic(np.asarray(ours.X.sum(axis=1)).ravel(), ours.obs["libsize"].to_numpy())
    assert abs(our_stat - 1) < tol


# ---------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def small():
    return simulate_rnaseq(25, 500, seed=21)


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_write_store_round_trip(small, tmp_path, suffix):
    path = write_store(small, tmp_path / f"sim{suffix}", chunk_cells=50)
    back = ad.read_zarr(path) if suffix == ".zarr" else ad.read_h5ad(path)
    assert_adata_equal(small, back)
    assert os.listdir(tmp_path) == [path.name]
    if suffix == ".zarr":
        chunk = zarr.open_group(str(path), mode="r")["X/data"].chunks[0]
        assert chunk == round(small.X.nnz / small.n_obs * 50)


def test_write_store_refuses_to_overwrite(small, tmp_path):
    path = write_store(small, tmp_path / "sim.zarr")
    other = simulate_rnaseq(25, 500, seed=22)
    with pytest.raises(StoreError, match="overwrite=True"):
        write_store(other, path)
    assert_adata_equal(small, ad.read_zarr(path))
    write_store(other, path, overwrite=True)
    assert_adata_equal(other, ad.read_zarr(path))
    assert os.listdir(tmp_path) == ["sim.zarr"]


def test_overwrite_replaces_a_file_with_a_folder_and_back(small, tmp_path):
    path = write_store(small, tmp_path / "sim.store", format="h5ad")
    write_store(small, path, format="zarr", overwrite=True)
    assert path.is_dir()
    assert_adata_equal(small, ad.read_zarr(path))
    write_store(small, path, format="h5ad", overwrite=True)
    assert path.is_file()
    assert_adata_equal(small, ad.read_h5ad(path))
    assert os.listdir(tmp_path) == ["sim.store"]


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_failed_write_leaves_no_store(small, tmp_path, suffix):
    bad = small.copy()
    bad.uns["unwritable"] = object()
    with pytest.raises(Exception):  # noqa: B017 - anndata's own error type
        write_store(bad, tmp_path / f"sim{suffix}")
    assert os.listdir(tmp_path) == []
    # a failed overwrite keeps the old store
    path = write_store(small, tmp_path / f"sim{suffix}")
    with pytest.raises(Exception):  # noqa: B017
        write_store(bad, path, overwrite=True)
    back = ad.read_zarr(path) if suffix == ".zarr" else ad.read_h5ad(path)
    assert_adata_equal(small, back)
    assert os.listdir(tmp_path) == [path.name]


def test_store_format_from_suffix_or_argument(small, tmp_path):
    with pytest.raises(InputError, match="format='zarr'"):
        write_store(small, tmp_path / "sim.txt")
    path = write_store(small, tmp_path / "sim.txt", format="zarr")
    assert_adata_equal(small, ad.read_zarr(path))
    with pytest.raises(StoreError, match="does not exist"):
        write_store(small, tmp_path / "missing" / "sim.zarr")


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_simulate_to_store_equals_simulate_rnaseq(tmp_path, suffix):
    kwargs = {"n_samples": 6, "n_de_genes": 5, "seed": 31}
    expected = simulate_rnaseq(25, 700, **kwargs)
    path = simulate_to_store(
        tmp_path / f"sim{suffix}", 25, 700, chunk_cells=37, store_chunk_cells=20, **kwargs
    )
    assert os.listdir(tmp_path) == [path.name]
    back = ad.read_zarr(path) if suffix == ".zarr" else ad.read_h5ad(path)
    assert_adata_equal(expected, back)


def test_simulated_zarr_store_is_anndata_csr_readable_lazily(tmp_path):
    expected = simulate_rnaseq(25, 700, seed=32)
    path = simulate_to_store(tmp_path / "sim.zarr", 25, 700, seed=32, chunk_cells=100)
    group = zarr.open_group(str(path), mode="r")
    x = group["X"]
    assert x.attrs["encoding-type"] == "csr_matrix"
    assert x.attrs["encoding-version"] == "0.1.0"
    assert tuple(x.attrs["shape"]) == (700, 25)
    assert x["indptr"].dtype == np.int64
    lazy = ad.io.sparse_dataset(x)
    assert_x_equal(expected.X[123:456], lazy[123:456])
    lazy_adata = ad.experimental.read_lazy(path)
    assert_x_equal(expected.X[123:456], lazy_adata.X[123:456].compute())


def test_simulate_to_store_refuses_overwrite_and_cleans_up_after_failure(tmp_path):
    path = simulate_to_store(tmp_path / "sim.zarr", 10, 100, seed=1)
    with pytest.raises(StoreError, match="already exists"):
        simulate_to_store(path, 10, 100, seed=2)
    # counts near 1000 overflow int8 while streaming, after the store was begun
    with pytest.raises(InputError, match="int64"):
        simulate_to_store(
            tmp_path / "big.zarr", 10, 300, gene_mean=1000.0, dtype="int8", chunk_cells=10, seed=3
        )
    assert os.listdir(tmp_path) == ["sim.zarr"]
    assert_adata_equal(simulate_rnaseq(10, 100, seed=1), ad.read_zarr(path))


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_samples": 1, "n_treatments": 2}, "nested"),
        ({"n_treatments": 27, "n_samples": 30}, "<= 26"),
        ({"n_cells": 0}, "n_cells"),
        ({"n_genes": 2.5}, "n_genes"),
        ({"n_de_genes": 101}, "exceeds n_genes"),
        ({"minbeta": 1.0, "maxbeta": 0.5}, "minbeta < maxbeta"),
        ({"minbeta": -0.5, "maxbeta": 1.0}, "minbeta \\* maxbeta > 0"),
        ({"direction": "up", "minbeta": -1.0, "maxbeta": -0.5}, "minbeta > 0"),
        ({"direction": "sideways"}, "direction"),
        ({"var_randomeffects": -0.1}, "var_randomeffects"),
        ({"gene_mean": np.ones(3)}, "n_genes=100"),
        ({"dispersion": 0.0}, "dispersion must be finite and > 0"),
        ({"seed": -1}, "seed"),
        ({"dtype": "bool"}, "dtype"),
        ({"chunk_cells": 0}, "chunk_cells"),
        ({"n_threads": 0}, "n_threads"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        simulate_rnaseq(**kwargs)
