"""Bad input to lmm and lmmtest gets an error that names the problem, not a numpy traceback."""

import numpy as np
import pytest
from reference_cases import load_case, summary_args

from flashmm_dask import DesignError, InputError, lmm, lmmtest


@pytest.fixture
def args():
    return summary_args(load_case("simu_reml_k1"), labelled=False)


def test_shape_mismatch_names_the_array(args):
    args["ZY"] = args["ZY"][:, :-1]
    with pytest.raises(InputError, match=r"ZY has shape \(12, 39\) but \(12, 40\) is expected"):
        lmm(**args)


def test_wrong_orientation_is_explained(args):
    args["XY"] = args["XY"].T
    with pytest.raises(InputError, match="R orientation"):
        lmm(**args)


def test_one_dimensional_matrix(args):
    args["XX"] = np.ones(7)
    with pytest.raises(InputError, match="XX must be 2-dimensional"):
        lmm(**args)


def test_non_numeric(args):
    args["ZZ"] = "not a matrix"
    with pytest.raises(InputError, match="ZZ must be a numeric array"):
        lmm(**args)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_feature_statistic_names_feature(bad):
    args = summary_args(load_case("simu_reml_k1"), labelled=True)
    args["ZY"].iloc[3, 5] = bad
    with pytest.raises(InputError, match=r"ZY contains NaN or Inf for 1 feature\(s\): 'Gene6'"):
        lmm(**args)


def test_nan_in_shared_statistic(args):
    args["ZZ"][0, 0] = np.nan
    with pytest.raises(InputError, match="ZZ contains NaN or Inf"):
        lmm(**args)


def test_sum_d_not_q(args):
    args["d"] = [5, 5]
    with pytest.raises(InputError, match=r"sum\(d\) = 10 but Z has q = 12 columns"):
        lmm(**args)


@pytest.mark.parametrize("d", [[0, 12], [12.5], ["a"]])
def test_d_not_positive_integers(args, d):
    args["d"] = d
    with pytest.raises(InputError, match="d must be component sizes"):
        lmm(**args)


def test_n_not_above_p(args):
    args["n"] = 7
    with pytest.raises(InputError, match="n = 7 cells but p = 7 covariates"):
        lmm(**args)


def test_rank_deficient_names_aliased_column():
    args = summary_args(load_case("simu_reml_k1"), labelled=True)
    XX = args["XX"].to_numpy()
    # make column 'cls3:trtB' equal to column 'cls2:trtB' (X'X of duplicated columns)
    i, j = 6, 5
    XX[i, :] = XX[j, :]
    XX[:, i] = XX[:, j]
    args["XX"].iloc[:, :] = XX
    with pytest.raises(DesignError, match=r"not full column rank.*'cls3:trtB'"):
        lmm(**args)


def test_unknown_method(args):
    with pytest.raises(InputError, match="unknown method 'GLS'; use 'REML' or 'ML'"):
        lmm(**args, method="GLS")


def test_method_is_case_insensitive(args):
    assert lmm(**args, method="reml").method == "REML"


def test_theta0_wrong_length(args):
    with pytest.raises(InputError, match="theta0 must have K\\+1 = 2 entries"):
        lmm(**args, theta0=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("bad", [{"max_iter": -1}, {"max_iter": 2.5}, {"epsilon": 0.0}])
def test_bad_iteration_controls(args, bad):
    with pytest.raises(InputError):
        lmm(**args, **bad)


def test_lmmtest_unknown_alternative(args):
    fit = lmm(**args)
    with pytest.raises(InputError, match="unknown alternative 'bigger'"):
        lmmtest(fit, alternative="bigger")


def test_lmmtest_needs_cov(args):
    fit = lmm(**args, output_cov=False)
    assert fit.cov is None
    with pytest.raises(InputError, match="output_cov=True"):
        lmmtest(fit)


def test_lmmtest_unknown_coefficient():
    fit = lmm(**summary_args(load_case("simu_reml_k1")))
    with pytest.raises(
        InputError, match=r"unknown coefficient 'cls9'.*valid names: log\(libsize\)"
    ):
        lmmtest(fit, index=["cls9"])
    with pytest.raises(InputError, match="unknown coefficient"):
        lmmtest(fit, contrast={"x": "cls9 - cls1"})


def test_lmmtest_index_equals_fit():
    fit = lmm(**summary_args(load_case("simu_reml_k1")))
    res = lmmtest(fit, index=["cls2", 0])
    assert list(res.columns) == [
        "cls2_coef",
        "log(libsize)_coef",
        "cls2_t",
        "log(libsize)_t",
        "cls2_p",
        "log(libsize)_p",
    ]
    np.testing.assert_allclose(res["cls2_coef"], fit.coef[2], rtol=1e-12)
    np.testing.assert_allclose(res["cls2_t"], fit.t[2], rtol=1e-12)
    np.testing.assert_allclose(res["log(libsize)_p"], fit.p[0], rtol=1e-12)
    everything = lmmtest(fit)
    assert everything.shape == (40, 21)


def test_numerically_aliased_column_with_a_positive_pivot_is_refused():
    """X'X of a column that is a combination of others, where rounding leaves Cholesky a
    tiny positive pivot (it succeeds): refused by the design check's rule, not fitted
    (the fit's variances were garbage, e.g. a residual variance of -2.7)."""
    import scipy.linalg

    rng = np.random.default_rng(0)
    n = 100
    x, g = rng.normal(size=n), (rng.random(n) < 0.5).astype(float)
    X = np.column_stack([np.ones(n), g, 0.1 * x, 0.3 * g + 0.7 * x])
    scipy.linalg.cho_factor(X.T @ X, lower=True)  # no error: the case this test is about
    Z = np.eye(10)[np.arange(n) % 10]
    y = rng.normal(size=n)
    st = {"XX": X.T @ X, "XY": (X.T @ y)[:, None], "ZX": Z.T @ X, "ZY": (Z.T @ y)[:, None]}
    st |= {"ZZ": Z.T @ Z, "Ynorm": np.array([y @ y]), "n": n, "d": [10]}
    with pytest.raises(DesignError, match=r"not full column rank.*aliased columns 'x4'"):
        lmm(**st)
