"""flashmm / lmmfit / sslmm end to end against R: counts and metadata of the reference cases
written as AnnData stores, reduced in one Dask pass, fitted, compared with R FLASHMM 1.3.0."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from reference_cases import SIMU_CASES, as_array, load_case

from flashmm_dask import InputError, flashmm, lmmfit, sslmm, write_store
from flashmm_dask.design.formula import build_design

RANDOM = {"simu_reml_k2": ["~ 0 + sam", "~ 0 + sam:time"]}
FIXED = "~ 0 + log(libsize) + cls + cls:trt"


def case_adata(name):
    cells = load_case(name)["cells"]
    counts = as_array(cells["counts"])  # m x n
    obs = pd.DataFrame({k: cells[k] for k in ("sam", "cls", "trt", "libsize", "time")})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    var = pd.DataFrame(index=load_case(name)["summary"]["features"])
    return ad.AnnData(X=sp.csr_matrix(counts.T), obs=obs, var=var)


def write(adata, path, chunk_cells=1000):
    return write_store(adata, path, chunk_cells=chunk_cells)


def assert_stats_equal_r(summary_data, case):
    s = case["summary"]
    for key in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm"):
        np.testing.assert_allclose(summary_data[key], as_array(s[key]), rtol=1e-10, err_msg=key)
    assert summary_data["n"] == s["n"]


def assert_fit_equal_r(fit, case):
    r = case["fit"]
    ok = np.max(np.abs(as_array(r["dlogL"])), axis=0) <= r["epsilon"]
    np.testing.assert_array_equal(fit.converged, ok)
    np.testing.assert_array_equal(fit.niter, as_array(r["niter"]))
    for key in ("se", "theta", "se_theta", "p"):
        np.testing.assert_allclose(getattr(fit, key)[:, ok], as_array(r[key])[:, ok], rtol=1e-6)
    np.testing.assert_allclose(fit.logLik[ok], as_array(r["logLik"])[ok], rtol=1e-6)
    coef, se = as_array(r["coef"])[:, ok], as_array(r["se"])[:, ok]
    assert np.all(np.abs(fit.coef[:, ok] - coef) <= 1e-6 * np.maximum(np.abs(coef), se))
    assert fit.covariates == tuple(case["summary"]["covariates"])
    assert fit.features == tuple(case["summary"]["features"])


@pytest.mark.parametrize("name", SIMU_CASES)
@pytest.mark.parametrize(
    ("suffix", "chunk_cells"), [(".zarr", 500), (".zarr", 3000), (".h5ad", 777)]
)
def test_flashmm_from_store_reproduces_r(tmp_path, name, suffix, chunk_cells):
    case = load_case(name)
    path = write(case_adata(name), tmp_path / f"data{suffix}", chunk_cells=chunk_cells)
    fit = flashmm(
        str(path),
        FIXED,
        RANDOM.get(name, "~ 0 + sam"),
        is_counts=True,
        chunk_cells=chunk_cells,
        method=case["fit"]["method"],
        output_ss=True,
    )
    assert_stats_equal_r(fit.summary_data, case)
    assert_fit_equal_r(fit, case)


def test_flashmm_in_memory_anndata_and_dense_array():
    name = "simu_reml_k1"
    case = load_case(name)
    adata = case_adata(name)
    fit = flashmm(adata, FIXED, "~ 0 + sam", is_counts=True, chunk_cells=1000)
    assert_fit_equal_r(fit, case)
    counts = adata.X.toarray()  # cells x features
    fit2 = flashmm(
        np.log2(1 + counts.T),
        FIXED,
        "~ 0 + sam",
        metadata=adata.obs,
        orientation="features_x_cells",
    )
    np.testing.assert_allclose(fit2.coef, fit.coef, rtol=1e-10)


@pytest.mark.parametrize("name", SIMU_CASES)
def test_lmmfit_and_sslmm_reproduce_r(name):
    case = load_case(name)
    adata = case_adata(name)
    design = build_design(adata.obs, FIXED, RANDOM.get(name, "~ 0 + sam"))
    X, Z = design.X(adata.obs), design.Z(adata.obs)
    Y = np.log2(1 + adata.X.toarray().T)  # features x cells, as in R
    stats = sslmm(X, Y, Z, d=list(design.d))
    np.testing.assert_allclose(stats.XY, as_array(case["summary"]["XY"]), rtol=1e-10)
    fit = lmmfit(Y, X, Z, d=list(design.d), method=case["fit"]["method"])
    r = case["fit"]
    ok = np.max(np.abs(as_array(r["dlogL"])), axis=0) <= r["epsilon"]
    np.testing.assert_allclose(fit.theta[:, ok], as_array(r["theta"])[:, ok], rtol=1e-6)
    np.testing.assert_array_equal(fit.niter, as_array(r["niter"]))


def test_pcs_are_added_as_covariates():
    adata = case_adata("simu_reml_k1")
    fit = flashmm(
        adata, FIXED, "~ 0 + sam", is_counts=True, pcs=2, chunk_cells=1000, output_ss=True
    )
    # R orders terms by degree: the PCs come before the interactions
    assert fit.covariates[4:6] == ("PC1", "PC2")
    assert len(fit.covariates) == 9
    # the PCs are those of the transformed data: their sums of squares are (n - 1) times
    # the explained variances of an independent PCA, and they are orthogonal
    from sklearn.decomposition import PCA

    ref = PCA(n_components=2).fit(np.log2(1 + adata.X.toarray()))
    XX = fit.summary_data["XX"]
    np.testing.assert_allclose(np.diag(XX)[4:6], 2999 * ref.explained_variance_, rtol=1e-3)
    assert abs(XX[4, 5]) < 1e-6 * XX[4, 4]


def test_flashmm_needs_metadata_and_consistent_counts_flags():
    adata = case_adata("simu_reml_k1")
    with pytest.raises(InputError, match="no cell metadata"):
        flashmm(adata.X, FIXED, "~ 0 + sam", orientation="cells_x_features")
    with pytest.raises(InputError, match="is_counts=True"):
        flashmm(adata, FIXED, "~ 0 + sam", is_counts=True, transform="none")
