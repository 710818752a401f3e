"""``lmmtest``: t-tests of coefficients or contrasts of a fitted LmmFit (R's lmmtest)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.contrasts import contrast_matrix
from flashmm_dask.errors import InputError
from flashmm_dask.fit import LmmFit
from flashmm_dask.numerics.inference import ALTERNATIVES, contrast_tests


def _index_matrix(index: Any, covariates: tuple[str, ...]) -> pd.DataFrame:
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


def _contrast_frame(contrast: Any, covariates: tuple[str, ...]) -> pd.DataFrame:
    if isinstance(contrast, (str, Mapping)) or (
        isinstance(contrast, Sequence) and all(isinstance(c, str) for c in contrast)
    ):
        return contrast_matrix(contrast, covariates)
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


def lmmtest(
    fit: LmmFit,
    index: Any = None,
    contrast: Any = None,
    alternative: str = "two.sided",
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

    Returns
    -------
    DataFrame
        One row per feature; columns ``<name>_coef`` for every contrast, then
        ``<name>_t``, then ``<name>_p``, as in R.
    """
    if alternative not in ALTERNATIVES:
        raise InputError(
            f"unknown alternative {alternative!r}; use one of {', '.join(ALTERNATIVES)}"
        )
    if fit.cov is None:
        raise InputError("the fit has no covariance matrices; refit with output_cov=True")
    if contrast is None:
        L = _index_matrix(range(len(fit.covariates)) if index is None else index, fit.covariates)
    else:
        L = _contrast_frame(contrast, fit.covariates)
    if np.ndim(fit.df) != 0:
        raise InputError("contrast tests need a fit with the residual degrees of freedom n - p")
    effect, t, p = contrast_tests(fit.coef.T, fit.cov, L.to_numpy(), float(fit.df), alternative)
    names = list(L.columns)
    columns = [f"{c}_coef" for c in names] + [f"{c}_t" for c in names] + [f"{c}_p" for c in names]
    return pd.DataFrame(
        np.concatenate([effect, t, p], axis=1), index=list(fit.features), columns=columns
    )
