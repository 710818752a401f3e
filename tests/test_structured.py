"""The structured path (K >= 2 with a diagonal Z_k'Z_k, numerics/structured.py) equals the
dense path to 1e-10 on nested, crossed and mixed designs, and is taken only where ZZ has
the structure."""

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from flashmm_dask import lmm
from flashmm_dask.numerics import structured_nested
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects
from flashmm_dask.numerics.structured import Factor, detect, md_solve, one_blas_thread

RTOL = 1e-10


def indicators(codes, k):
    return np.eye(k)[codes]


def components(kind, rng, n, donors=12):
    """The random components (cells x columns each) of ``kind``, drawn from ``rng``."""
    if kind == "nested":  # donor + donor:state (the diagonal Schur complement)
        donor, state = rng.integers(0, donors, n), rng.integers(0, 4, n)
        Zs = [indicators(donor, donors), indicators(donor * 4 + state, 4 * donors)]
    elif kind == "nested_large":  # q = 150: large enough for the default path to be structured
        donor, state = rng.integers(0, 30, n), rng.integers(0, 4, n)
        Zs = [indicators(donor, 30), indicators(donor * 4 + state, 120)]
    elif kind == "nested_first_big":  # the big diagonal component first, slopes after
        donor = rng.integers(0, 15, n)
        Zs = [indicators(donor, 15) * rng.uniform(1, 3, n)[:, None], indicators(donor, 15)]
    elif kind == "nested_three":  # two small components, big columns without a parent
        donor, state, cond = rng.integers(0, 10, n), rng.integers(0, 3, n), rng.integers(0, 3, n)
        Zs = [
            indicators(donor, 10) * (cond == 0)[:, None],
            indicators(donor, 10) * (cond == 1)[:, None],
            indicators(donor * 9 + state * 3 + cond, 90),
        ]
    elif kind == "crossed":  # two crossed factors (a dense Schur complement)
        Zs = [indicators(rng.integers(0, 15, n), 15), indicators(rng.integers(0, 40, n), 40)]
    elif kind == "crossed_three":  # the largest factor in the middle: two small ones, S not
        # symmetric (their ratios differ), the big block's columns taken by a gather. The
        # factors overlap (b and c follow a): with independent factors the information
        # between them is ~1e-7 of its diagonal, a difference of REML terms that neither path
        # gets to 1e-10 relative
        a = rng.integers(0, 12, n)
        b = (a * 4 + rng.integers(0, 6, n)) % 45
        c = (a + rng.integers(0, 3, n)) % 20
        Zs = [indicators(a, 12), indicators(b, 45), indicators(c, 20)]
    elif kind == "mixed":  # crossed factors, a dense component and a nested slope
        a = rng.integers(0, 10, n)
        Zs = [
            indicators(a, 10),
            indicators(rng.integers(0, 30, n), 30),
            rng.normal(size=(n, 2)),
            indicators(a, 10) * rng.uniform(1, 2, n)[:, None],
        ]
    elif kind == "unstructured":  # K = 2 without a diagonal block
        Zs = [rng.normal(size=(n, 3)), rng.normal(size=(n, 4))]
    else:
        raise ValueError(kind)
    return Zs


def cell_stats(X, Zs, Y):
    """The summary statistics of cells X (n, p), components Zs and responses Y (m, n)."""
    Z = np.column_stack(Zs)
    return dict(
        XX=X.T @ X,
        XY=X.T @ Y.T,
        ZX=Z.T @ X,
        ZY=Z.T @ Y.T,
        ZZ=Z.T @ Z,
        Ynorm=np.sum(Y**2, axis=1),
        n=X.shape[0],
        d=[z.shape[1] for z in Zs],
    )


def design(kind, n=2500, m=24, seed=1):
    """Summary statistics of simulated cells with the random components of ``kind``."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    Zs = components(kind, rng, n)
    Y = (X @ rng.normal(size=(X.shape[1], m))).T + rng.normal(size=(m, n))
    for z in Zs:
        Y += (z @ rng.normal(0, 0.6, (z.shape[1], m))).T
    return cell_stats(X, Zs, Y)


def fit(st, method, structured):
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], method, structured=structured)
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    th = fit_theta(sh, zry, yry)
    fx = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0)
    return sh, th, fx


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", ["nested", "nested_first_big", "nested_three", "crossed", "mixed"])
def test_structured_equals_dense(kind, method):
    st = design(kind)
    sh_s, th_s, fx_s = fit(st, method, True)
    sh_d, th_d, fx_d = fit(st, method, False)
    assert sh_s.path == "structured" and sh_d.path == "dense"
    assert sh_s.structure is not None
    assert sh_s.structure.diagonal == kind.startswith("nested")
    np.testing.assert_array_equal(th_s.niter, th_d.niter)
    assert np.all(th_s.niter < 50)
    close(th_s.theta, th_d.theta)
    close(th_s.se_theta, th_d.se_theta)
    close(th_s.FIM_theta, th_d.FIM_theta)
    close(th_s.logdetM0, th_d.logdetM0)
    # dlogL is a difference of terms of size ~ n / s0: judged against that scale
    scale = st["n"] / th_d.theta[:, -1:]
    assert np.all(np.abs(th_s.dlogL - th_d.dlogL) <= RTOL * scale)
    se_d = np.sqrt(np.diagonal(fx_d.cov, axis1=1, axis2=2))
    np.testing.assert_allclose(fx_s.coef, fx_d.coef, rtol=0, atol=RTOL * se_d.max())
    close(np.sqrt(np.diagonal(fx_s.cov, axis1=1, axis2=2)), se_d)
    close(fx_s.cov, fx_d.cov, rtol=1e-9)
    close(fx_s.logLik, fx_d.logLik)
    close(fx_s.FIM_beta, fx_d.FIM_beta)
    np.testing.assert_allclose(fx_s.RE, fx_d.RE, rtol=0, atol=RTOL * np.abs(fx_d.RE).max())


def test_structured_equals_dense_from_negative_and_zero_starts():
    """Starting values with a zero and a negative ratio (D singular, indefinite)."""
    st = design("crossed", m=6)
    for t0 in ([0.0, 0.05, 1.0], [-0.002, 0.01, 1.2]):
        theta0 = np.tile(t0, (6, 1))
        out = []
        for structured in (True, False):
            sh = prepare(
                st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=structured
            )
            zry, yry = sh.residualise(st["XY"].T, st["ZY"].T, st["Ynorm"])
            out.append(fit_theta(sh, zry, yry, theta0=theta0, max_iter=3))
        np.testing.assert_array_equal(out[0].niter, out[1].niter)
        close(out[0].theta, out[1].theta, rtol=1e-9)


def test_lmm_takes_the_structured_path_and_matches_dense():
    st = design("nested_large", m=40)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    assert sh.path == "structured"
    res = lmm(**st, n_threads=2, output_re=True)
    _, th_d, fx_d = fit(st, "REML", False)
    close(res.theta, th_d.theta.T)
    close(res.se, np.sqrt(np.diagonal(fx_d.cov, axis1=1, axis2=2)).T)
    close(res.logLik, fx_d.logLik)
    np.testing.assert_array_equal(res.niter, th_d.niter)


@pytest.mark.parametrize(
    ("kind", "path"),
    [("unstructured", "dense"), ("nested_large", "structured"), ("nested", "dense")],
)
def test_path_follows_the_structure_of_ZZ(kind, path):
    st = design(kind, m=4)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    assert sh.path == path
    # the small nested design has the structure but is cheaper on the dense path
    assert (detect(st["ZZ"], st["d"]) is None) == (kind == "unstructured")
    forced = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    assert forced.path == ("dense" if kind == "unstructured" else "structured")


def test_one_component_or_a_nearly_diagonal_block_is_not_structured():
    st = design("nested", m=4)
    forced = {"structured": True}
    # K = 1: the spectral path
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], [sum(st["d"])], "REML", **forced)
    assert sh.path == "spectral"
    # an off-diagonal entry in every diagonal block (even a tiny one): dense
    ZZ = st["ZZ"].copy()
    ZZ[0, 1] = ZZ[1, 0] = 1e-300
    ZZ[12, 13] = ZZ[13, 12] = 1e-300
    assert detect(ZZ, st["d"]) is None
    sh = prepare(st["XX"], st["ZX"], ZZ, st["n"], st["d"], "REML", **forced)
    assert sh.path == "dense"
    # one diagonal block is enough: the other block keeps its entry
    ZZ[0, 1] = ZZ[1, 0] = 0.0
    st_ = detect(ZZ, st["d"])
    assert st_ is not None and st_.big == 0 and not st_.diagonal


def test_block_composition_does_not_change_a_feature():
    """Each feature's fit is the same whatever features share its block (n_threads)."""
    st = design("crossed", m=12)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    whole = fit_theta(sh, zry, yry)
    parts = [fit_theta(sh, zry[i : i + 5], yry[i : i + 5]) for i in range(0, 12, 5)]
    np.testing.assert_array_equal(whole.theta, np.concatenate([p.theta for p in parts]))
    np.testing.assert_array_equal(whole.FIM_theta, np.concatenate([p.FIM_theta for p in parts]))


def test_block_composition_does_not_change_a_nested_feature():
    """The same for the nested REML terms (:mod:`.structured_nested`)."""
    st = design("nested_three", m=7)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    assert sh.nested is not None
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    whole = fit_theta(sh, zry, yry)
    parts = [fit_theta(sh, zry[i : i + 3], yry[i : i + 3]) for i in range(0, 7, 3)]
    np.testing.assert_array_equal(whole.theta, np.concatenate([p.theta for p in parts]))
    np.testing.assert_array_equal(whole.FIM_theta, np.concatenate([p.FIM_theta for p in parts]))


def test_nested_without_the_count_sums(monkeypatch):
    """Too many distinct counts to store their sums: each evaluation sums over the columns."""
    monkeypatch.setattr(structured_nested, "H_VALUES", 0)
    st = design("nested_three")
    sh_s, th_s, fx_s = fit(st, "REML", True)
    assert sh_s.nested is not None and sh_s.nested.H.shape[0] == 0
    _, th_d, fx_d = fit(st, "REML", False)
    np.testing.assert_array_equal(th_s.niter, th_d.niter)
    close(th_s.theta, th_d.theta)
    close(th_s.FIM_theta, th_d.FIM_theta)
    close(th_s.logdetM0, th_d.logdetM0)
    close(fx_s.logLik, fx_d.logLik)
    close(fx_s.cov, fx_d.cov, rtol=1e-9)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_three_crossed_factors_the_largest_in_the_middle(method):
    """Two small components in the dense Schur complement (its sums by component), S not
    symmetric (LU instead of Cholesky), the structure read from the middle of ZZ."""
    st = design("crossed_three")
    assert detect(st["ZZ"], st["d"]).big == 1
    test_structured_equals_dense("crossed_three", method)


def test_detect_reads_the_blocks_of_ZZ():
    """N, Zs and zb of detect equal the blocks of ZZ taken by index, whichever component is
    eliminated (first, middle or last)."""
    for kind in ("crossed", "crossed_three", "nested", "nested_three", "mixed"):
        st = design(kind, m=2)
        ZZ, d = st["ZZ"], np.asarray(st["d"])
        s = detect(ZZ, d)
        assert s is not None
        ib, is_ = s.perm[: s.qb], s.perm[s.qb :]
        np.testing.assert_array_equal(s.N.toarray(), ZZ[np.ix_(ib, is_)])
        assert s.N.has_canonical_format
        np.testing.assert_array_equal(s.NT.toarray(), ZZ[np.ix_(is_, ib)])
        np.testing.assert_array_equal(s.Zs, ZZ[np.ix_(is_, is_)])
        np.testing.assert_array_equal(s.zb, np.diag(ZZ)[ib])
        assert s.pairs == int(np.sum(np.diff(s.N.indptr) ** 2))


def test_md_solve_by_cholesky_equals_the_inverse():
    """md_solve (fixed effects) solves with the Cholesky factor of S; Factor's solves for
    the scoring use the inverse: the same to rounding."""
    st = design("crossed", m=2)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    s = sh.structure
    D = np.array([[0.3, 0.7, 1.0]])[:, s.comp] / 1.0
    x = np.random.default_rng(3).normal(size=(1, s.qb + s.qs, 4))
    by_chol = Factor(s, D, inverse=False)
    assert by_chol.R is not None
    by_inverse = Factor(s, D)
    close(by_chol.solve(x), by_inverse.solve(x), rtol=1e-12)
    MDx, ok = md_solve(s, D, x)
    assert ok.all()
    close(MDx, by_inverse.solve(D[:, :, None] * x), rtol=1e-12)


def test_one_blas_thread_holds_until_the_last_context_closes():
    """Contexts that overlap (a fit's blocks in threads) share one limit: the first to close
    does not let BLAS threads back in under the other; the last restores the setting."""
    ctl = ThreadpoolController()

    def threads():
        return {x["num_threads"] for x in ctl.select(user_api="blas").info()}

    with ctl.limit(limits=2, user_api="blas"):
        a, b = one_blas_thread(), one_blas_thread()
        a.__enter__()
        b.__enter__()
        assert threads() == {1}
        a.__exit__(None, None, None)  # closed first, while b is open
        assert threads() == {1}
        b.__exit__(None, None, None)
        assert threads() == {2}
