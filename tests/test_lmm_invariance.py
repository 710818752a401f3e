"""Invariances of lmm: batch == one feature at a time, spectral == general path for K = 1,
feature permutations, theta0 at the optimum, plain arrays == labelled frames."""

import numpy as np
import pytest
from reference_cases import load_case, summary_args

from flashmm_dask import lmm
from flashmm_dask.model.core import _starts
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects

OUTPUTS = ("coef", "se", "t", "p", "theta", "se_theta", "dlogL", "logLik", "niter")


def fit(name, **kw):
    case = load_case(name)
    return lmm(**summary_args(case), method=case["fit"]["method"], output_re=True, **kw)


def columns(args, idx):
    """The summary statistics of a subset of features (numpy arrays)."""
    out = dict(args)
    for k in ("XY", "ZY"):
        out[k] = np.asarray(args[k])[:, idx]
    out["Ynorm"] = np.asarray(args["Ynorm"])[idx]
    return out


@pytest.mark.parametrize("name", ["simu_reml_k1", "simu_ml_k1", "simu_reml_k2"])
def test_one_feature_at_a_time_equals_batch(name):
    case = load_case(name)
    args = summary_args(case, labelled=False)
    method = case["fit"]["method"]
    batch = lmm(**args, method=method, output_re=True)
    for j in range(len(batch.features)):
        single = lmm(**columns(args, [j]), method=method, output_re=True)
        assert single.converged[0] == batch.converged[j]
        assert single.niter[0] == batch.niter[j]
        if not batch.converged[j]:
            # 50 steps of a non-converging iteration amplify rounding: flags suffice
            continue
        for out in (*OUTPUTS, "RE"):
            # dlogL is ~1e-8 at the optimum: compare it on the scale of epsilon; BLUPs
            # near zero on the scale of the feature's largest BLUP
            expected = getattr(batch, out)[..., j]
            atol = {"dlogL": 1e-10, "RE": 1e-10 * np.max(np.abs(expected))}.get(out, 0)
            np.testing.assert_allclose(
                getattr(single, out)[..., 0],
                expected,
                rtol=1e-10,
                atol=atol,
                err_msg=f"{out} of feature {j}",
            )


@pytest.mark.parametrize(
    "name", ["doc_example_reml", "doc_example_ml", "simu_reml_k1", "simu_ml_k1"]
)
def test_spectral_equals_general_path(name):
    case = load_case(name)
    a = summary_args(case, labelled=False)
    sh = prepare(a["XX"], a["ZX"], a["ZZ"], a["n"], a["d"], case["fit"]["method"])
    XY, ZY = a["XY"].T.copy(), a["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, a["Ynorm"])
    fits = {}
    for spectral in (True, False):
        th = fit_theta(sh, zry, yry, spectral=spectral)
        fx = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0, spectral=spectral)
        fits[spectral] = (th, fx)
    (th1, fx1), (th2, fx2) = fits[True], fits[False]
    np.testing.assert_array_equal(th1.niter, th2.niter)
    for attr in ("theta", "se_theta", "FIM_theta", "logdetM0"):
        np.testing.assert_allclose(getattr(th1, attr), getattr(th2, attr), rtol=1e-9)
    np.testing.assert_allclose(th1.dlogL, th2.dlogL, atol=1e-9)
    for attr in ("coef", "cov", "FIM_beta", "RE", "logLik"):
        a1, a2 = getattr(fx1, attr), getattr(fx2, attr)
        np.testing.assert_allclose(a1, a2, rtol=1e-9, atol=1e-12 * np.abs(a2).max())


@pytest.mark.parametrize("name", ["simu_reml_k1", "simu_reml_k2"])
def test_permuting_features_permutes_results(name):
    case = load_case(name)
    args = summary_args(case, labelled=False)
    base = lmm(**args, method=case["fit"]["method"])
    perm = np.random.default_rng(1).permutation(len(base.features))
    permuted = lmm(**columns(args, perm), method=case["fit"]["method"])
    for out in OUTPUTS:
        np.testing.assert_allclose(
            getattr(permuted, out),
            getattr(base, out)[..., perm],
            rtol=1e-10,
            atol=1e-10 if out == "dlogL" else 0,
            err_msg=out,
        )


@pytest.mark.parametrize("name", ["simu_reml_k1", "simu_ml_k1"])
def test_reml_and_ml_differ_and_ml_likelihood_larger(name):
    case = load_case(name)
    args = summary_args(case, labelled=False)
    reml = lmm(**args, method="REML")
    ml = lmm(**args, method="ML")
    ok = reml.converged & ml.converged
    # ML's residual variance is biased down relative to REML's
    assert np.all(ml.theta[-1, ok] < reml.theta[-1, ok])
    assert not np.allclose(ml.logLik, reml.logLik)


def test_theta0_at_the_optimum_converges_at_once():
    case = load_case("simu_reml_k1")
    first = fit("simu_reml_k1")
    again = lmm(**summary_args(case), theta0=first.theta)
    assert np.all(again.niter == 1)
    np.testing.assert_allclose(again.coef, first.coef, rtol=1e-7)


def test_max_iter_limits_and_flags():
    case = load_case("simu_reml_k2")
    short = lmm(**summary_args(case), max_iter=3)
    assert np.nanmax(short.niter) == 3
    assert (~short.converged).sum() > 2


def test_arrays_and_frames_agree():
    case = load_case("simu_reml_k1")
    a = lmm(**summary_args(case, labelled=False))
    b = lmm(**summary_args(case, labelled=True))
    for out in OUTPUTS:
        np.testing.assert_array_equal(getattr(a, out), getattr(b, out))
    assert a.covariates == ("x1", "x2", "x3", "x4", "x5", "x6", "x7")
    assert b.covariates[0] == "log(libsize)"
    # the default names (kept between calls) follow each call's sizes
    m, q = a.coef.shape[1], len(a.random)
    assert a.random == tuple(f"z{i + 1}" for i in range(q))
    assert a.features == tuple(f"feature{i + 1}" for i in range(m))
    args = summary_args(case, labelled=False)
    args.update(XY=args["XY"][:, :3], ZY=args["ZY"][:, :3], Ynorm=args["Ynorm"][:3])
    assert lmm(**args).features == ("feature1", "feature2", "feature3")
    assert lmm(**summary_args(case, labelled=False)).features == a.features


def test_zero_features_are_nan_with_one_warning():
    from flashmm_dask import ZeroFeatureWarning

    case = load_case("simu_reml_k1")
    args = summary_args(case, labelled=False)
    args["XY"][:, [3, 7]] = 0.0
    args["ZY"][:, [3, 7]] = 0.0
    args["Ynorm"][[3, 7]] = 0.0
    with pytest.warns(ZeroFeatureWarning, match="2 of 40 features"):
        res = lmm(**args)
    for out in OUTPUTS:
        assert np.all(np.isnan(getattr(res, out)[..., [3, 7]])), out
    assert not res.converged[[3, 7]].any()
    ref = lmm(**columns(summary_args(case, labelled=False), [0, 1, 2, 4]))
    np.testing.assert_allclose(res.coef[:, [0, 1, 2, 4]], ref.coef, rtol=1e-12)


def test_verbose_reports_nonconverged(caplog):
    from flashmm_dask import ConvergenceWarning

    case = load_case("simu_reml_k2")
    with pytest.warns(ConvergenceWarning, match="2 of 30 features did not converge"):
        lmm(**summary_args(case), verbose=True)


def test_values_of_a_large_scale_are_told_to_lower_epsilon():
    """Values ~1e4: R's rule max |dlogL| <= epsilon holds after one step (the score
    shrinks with the square of the scale), short of the optimum; the features are not
    converged and the warning names epsilon, not max_iter, as the remedy, which works:
    with epsilon=1e-12 the fit is the unscaled one's, scaled."""
    from flashmm_dask import ConvergenceWarning

    args = summary_args(load_case("simu_reml_k1"))
    s = 1e4
    big = dict(args, XY=args["XY"] * s, ZY=args["ZY"] * s, Ynorm=args["Ynorm"] * s**2)
    with pytest.warns(ConvergenceWarning, match=r"stopped earlier by R's rule.*lower epsilon"):
        early = lmm(**big, verbose=True)
    assert (early.niter < 50).all() and not early.converged.all()
    ref, fine = lmm(**args), lmm(**big, epsilon=1e-12)
    assert fine.converged.all() and ref.converged.all()
    np.testing.assert_allclose(fine.theta, ref.theta * s**2, rtol=1e-6)
    np.testing.assert_allclose(fine.coef, ref.coef * s, rtol=1e-6, atol=1e-6 * s)


def test_tables():
    res = fit("simu_reml_k1")
    df = res.to_dataframe()
    assert list(df.columns) == ["feature", "term", "coef", "se", "t", "df", "p", "padj"]
    assert len(df) == 7 * 40
    row = df[(df.feature == res.features[5]) & (df.term == "cls2:trtB")].iloc[0]
    j = res.covariates.index("cls2:trtB")
    assert row.coef == res.coef[j, 5] and row.p == res.p[j, 5] and row.df == 2993
    ds = res.to_xarray()
    np.testing.assert_array_equal(ds["coef"].sel(feature=res.features[5]).values, res.coef[:, 5])
    np.testing.assert_array_equal(ds["theta"].values, res.theta.T)
    assert ds["RE"].dims == ("feature", "random")


@pytest.mark.parametrize(
    ("size", "block", "workers"),
    [(100, 16, 2), (3, 1, 2), (7, 2, 3), (1, 16, 2), (0, 16, 2), (100, 16, 1), (11596, 2899, 2)],
)
def test_blocks_even_and_a_multiple_of_the_threads(size, block, workers):
    """With threads, the features go in blocks of sizes within one of each other, as many
    as a multiple of the threads (none empty, none over ``block``)."""
    starts = _starts(size, block, workers)
    sizes = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == size
    assert np.all(sizes >= 1) and np.all(sizes <= block)
    if workers > 1 and sizes.size > 1:
        assert sizes.max() - sizes.min() <= 1
        assert sizes.size % workers == 0 or sizes.size == size
