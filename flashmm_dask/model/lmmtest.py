"""``lmmtest``: t-tests of coefficients or contrasts of a fitted LmmFit (R's lmmtest).

Degrees of freedom: the R package's n - p ("residual"), or Satterthwaite's approximation
("satterthwaite", :mod:`flashmm_dask.numerics.satterthwaite`). Satterthwaite's df of a
contrast need, per feature, the inverse observed information of theta and the derivatives
of the coefficient covariance in theta. A fit made with ``df="satterthwaite"`` keeps them
(``vcov_theta``, ``jac_cov``); otherwise they are recomputed at the fitted theta from the
fit's summary statistics (``output_ss=True``), which gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias, cast

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import InputError
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.numerics import inference
from flashmm_dask.numerics.fisher import prepare
from flashmm_dask.numerics.inference import ALTERNATIVES, P_ADJUST_METHODS, contrast_test
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.satterthwaite import (
    DF_METHODS,
    cov_jacobian,
    satterthwaite_df,
    theta_vcov,
)

#: Coefficients by name or position (0-based): one, or several.
Index: TypeAlias = str | int | np.integer | Iterable[str | int | np.integer]
#: Contrasts: a (p, c) matrix (a DataFrame indexed by coefficient names, or an array), or
#: contrast strings (one, a list, or a mapping name -> expression).
Contrast: TypeAlias = str | Mapping[str, str] | Sequence[str] | pd.DataFrame | ArrayLike


def _index_matrix(index: Index, covariates: tuple[str, ...]) -> pd.DataFrame:
    items = [index] if isinstance(index, (str, int, np.integer)) else list(index)
    if not items:
        raise InputError("index selects no coefficient; give names or positions of coefficients")
    positions = []
    for item in items:
        if isinstance(item, str):
            if item not in covariates:
                raise InputError(
                    f"unknown coefficient {item!r} in index; valid names: {', '.join(covariates)}"
                )
            positions.append(covariates.index(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -len(covariates) <= item < len(covariates):
                raise InputError(
                    f"coefficient position {item} is out of range for {len(covariates)} "
                    "coefficients (positions start at 0)"
                )
            positions.append(int(item) % len(covariates))
        else:
            raise InputError(f"index entries must be coefficient names or positions; got {item!r}")
    L = np.eye(len(covariates))[:, positions]
    return pd.DataFrame(L, index=list(covariates), columns=[covariates[j] for j in positions])


def _contrast_frame(contrast: Contrast, covariates: tuple[str, ...]) -> pd.DataFrame:
    if isinstance(contrast, (str, Mapping)) or (
        isinstance(contrast, Sequence) and all(isinstance(c, str) for c in contrast)
    ):
        # a mapping or a sequence of strings: contrast strings, as the check just found
        strings = cast("str | Mapping[str, str] | Sequence[str]", contrast)
        return contrast_matrix(strings, covariates)
    if isinstance(contrast, pd.DataFrame):
        missing = [str(x) for x in contrast.index if str(x) not in covariates]
        if missing:
            raise InputError(
                f"contrast rows {missing} are not coefficients of the fit; "
                f"valid names: {', '.join(covariates)}"
            )
        frame = contrast.copy()
        frame.index = [str(x) for x in frame.index]
        frame = frame.reindex(list(covariates), fill_value=0.0)
        frame.columns = [str(c) for c in frame.columns]
        return frame.astype(np.float64)
    L = np.asarray(contrast, dtype=np.float64)
    if L.ndim == 1:
        L = L[:, None]
    if L.ndim != 2 or L.shape[0] != len(covariates):
        raise InputError(
            f"a contrast matrix must have one row per coefficient ({len(covariates)}); "
            f"got shape {np.shape(contrast)}"
        )
    return pd.DataFrame(
        L, index=list(covariates), columns=[f"contrast{j + 1}" for j in range(L.shape[1])]
    )


def check_alternative(alternative: str) -> None:
    """Refuse an alternative hypothesis other than two.sided, less and greater."""
    if alternative not in ALTERNATIVES:
        raise InputError(
            f"unknown alternative {alternative!r}; use one of {', '.join(ALTERNATIVES)}"
        )


def satterthwaite_inputs(fit: LmmFit) -> tuple[Array, Array]:
    """``vcov_theta`` (m, K+1, K+1) and ``jac_cov`` (m, K+1, p, p) of a fit.

    Taken from the fit when it kept them (``df="satterthwaite"``), else recomputed at
    the fitted theta from its summary statistics (``output_ss=True``).
    """
    if fit.vcov_theta is not None and fit.jac_cov is not None:
        return fit.vcov_theta, fit.jac_cov
    ss = fit.summary_data
    if ss is None or fit.cov is None:
        raise InputError(
            "Satterthwaite's df need the fit's observed information of theta: refit with "
            "lmm(..., df='satterthwaite') (or output_ss=True, and output_cov=True)"
        )
    sh = prepare(ss["XX"], ss["ZX"], ss["ZZ"], ss["n"], ss["d"], fit.method)
    zry, yry = sh.residualise(
        np.ascontiguousarray(ss["XY"].T), np.ascontiguousarray(ss["ZY"].T), ss["Ynorm"]
    )
    theta = np.ascontiguousarray(fit.theta.T)
    held = None
    if fit.nonnegative:  # components held at zero leave the model (see lmm)
        held = np.zeros(theta.shape, dtype=bool)
        held[:, :-1] = theta[:, :-1] == 0
    vcov_theta = theta_vcov(sh, theta, zry, yry, held=held, boundary_df=fit.boundary_df)
    return vcov_theta, cov_jacobian(sh, theta, fit.cov)


def lmmtest(
    fit: LmmFit,
    index: Index | None = None,
    contrast: Contrast | None = None,
    alternative: str = "two.sided",
    *,
    df: str | None = None,
    p_adjust: str | None = None,
) -> pd.DataFrame:
    """Test coefficients or contrasts of the coefficients of a fit.

    Parameters
    ----------
    fit : LmmFit
        A fit with its covariances (``lmm(..., output_cov=True)``, the default).
    index : names or positions (0-based) of coefficients, optional
        Coefficients to test when no contrast is given; default all.
    contrast : optional
        A p x c contrast matrix (DataFrame with coefficient names as index, or array), or
        contrast strings (a mapping name -> "trtB - trtA", a list, or one string), parsed
        by :func:`flashmm_dask.contrast_matrix`.
    alternative : {"two.sided", "less", "greater"}
    df : {"residual", "satterthwaite"}, optional
        Degrees of freedom of the tests: n - p, or Satterthwaite's per feature and
        contrast. Default: the fit's ``df_method`` ("residual" unless the fit was made with
        ``df="satterthwaite"``). Satterthwaite needs a fit made with that option, or one
        that kept its summary statistics (``output_ss=True``).
    p_adjust : {"BH", "BY"}, optional
        Add ``<name>_padj`` columns: Benjamini-Hochberg (or -Yekutieli) adjusted p-values
        over the features, per contrast; NaN p-values stay NaN and are not counted.

    Returns
    -------
    DataFrame
        One row per feature; columns ``<name>_coef`` for every contrast, then
        ``<name>_t``, then ``<name>_p``, as in R. With Satterthwaite's df, ``<name>_df``
        columns come before the p-values; with ``p_adjust``, ``<name>_padj``
        columns after them.
    """
    check_alternative(alternative)
    if fit.cov is None:
        raise InputError("the fit has no covariance matrices; refit with output_cov=True")
    df_method = fit.df_method if df is None else df
    if not isinstance(df_method, str) or df_method.lower() not in DF_METHODS:
        raise InputError(f"unknown df {df!r}; use 'residual' (n - p) or 'satterthwaite'")
    df_method = df_method.lower()
    if p_adjust is not None and p_adjust not in P_ADJUST_METHODS:
        raise InputError(
            f"unknown p_adjust {p_adjust!r}; use "
            f"{' or '.join(map(repr, P_ADJUST_METHODS))} (or None for no adjustment)"
        )
    if contrast is None:
        L = _index_matrix(range(len(fit.covariates)) if index is None else index, fit.covariates)
    else:
        L = _contrast_frame(contrast, fit.covariates)
    Lm = L.to_numpy()
    names = list(L.columns)
    if df_method == "satterthwaite":
        vcov_theta, jac_cov = satterthwaite_inputs(fit)
        dfs: Array | float = satterthwaite_df(fit.cov, jac_cov, vcov_theta, Lm)
    else:
        dfs = float(fit.n - len(fit.covariates))
    test = contrast_test(fit.coef.T, fit.cov, Lm, dfs, alternative)
    blocks: dict[str, Array] = {"coef": test.effect, "t": test.t}
    if df_method == "satterthwaite":
        blocks["df"] = test.df
    blocks["p"] = test.p
    if p_adjust is not None:
        blocks["padj"] = inference.p_adjust(test.p, p_adjust, axis=0)
    columns = [f"{c}_{kind}" for kind in blocks for c in names]
    return pd.DataFrame(
        np.concatenate(list(blocks.values()), axis=1), index=list(fit.features), columns=columns
    )
