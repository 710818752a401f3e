"""New contrasts on a finished results store, without refitting.

The store keeps every feature's coefficients and their covariance matrices (``cov``), so
any contrast L of the coefficients is tested from them alone: effect = L'b,
se = sqrt(diag(L' cov L)), t = effect / se, with the store's degrees of freedom.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.contrasts import contrast_matrix
from flashmm_dask.errors import InputError
from flashmm_dask.io.results import open_results
from flashmm_dask.numerics.inference import ALTERNATIVES, contrast_tests, p_adjust


def retest(
    store: str,
    contrasts: Mapping[str, str],
    *,
    alternative: str = "two.sided",
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Test contrasts on a finished results store.

    Returns
    -------
    DataFrame, one row per feature and contrast: feature, term, coef, se, t, df, p, padj
    (Benjamini-Hochberg within a contrast), converged, niter.
    """
    if alternative not in ALTERNATIVES:
        raise InputError(
            f"unknown alternative {alternative!r}; use one of {', '.join(ALTERNATIVES)}"
        )
    if not contrasts:
        raise InputError("no contrast given; pass name=expression, e.g. 'B-A=trtB - trtA'")
    ds = open_results(store, storage_options=storage_options)
    if "cov" not in ds:
        raise InputError(
            f"{store} holds no coefficient covariances (fit.store_cov was false); "
            "refit with fit.store_cov: true to test new contrasts"
        )
    df_method = ds.attrs.get("config", {}).get("model", {}).get("df", "residual")
    if df_method != "residual":
        raise InputError(
            f"{store} was fitted with {df_method} degrees of freedom, which new contrasts "
            "cannot reuse without refitting; add the contrasts to the config's contrasts "
            "section and run it on a new output, or use flashmm_dask.lmmtest(fit, df=...)"
        )
    covariates = [str(c) for c in ds["covariate"].values]
    L = contrast_matrix(dict(contrasts), covariates)
    coef = ds["coef"].values
    cov = ds["cov"].values
    df = ds["df"].values[:, 0]
    effect, t, p = contrast_tests(coef, cov, L.to_numpy(), df[:, None], alternative)
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.einsum("pc,mpk,kc->mc", L.to_numpy(), cov, L.to_numpy()))
    padj = p_adjust(p, "BH", axis=0)
    features = [str(f) for f in ds["feature"].values]
    frames = []
    for j, name in enumerate(L.columns):
        frames.append(
            pd.DataFrame(
                {
                    "feature": features,
                    "term": name,
                    "coef": effect[:, j],
                    "se": se[:, j],
                    "t": t[:, j],
                    "df": df,
                    "p": p[:, j],
                    "padj": padj[:, j],
                    "converged": ds["converged"].values,
                    "niter": ds["niter"].values,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
