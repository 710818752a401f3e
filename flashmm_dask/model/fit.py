"""LmmFit: the result of fitting the mixed model to many features.

Array orientation follows the R package: coefficient-like outputs are (p, m) and
variance components (K+1, m), with m features in columns; matrices per feature (cov,
FIM_beta, FIM_theta) carry the feature axis first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flashmm_dask.model.status import status_names
from flashmm_dask.numerics.linalg import Array

if TYPE_CHECKING:  # imported when used: a fit needs neither
    import xarray as xr
    from anndata import AnnData


@dataclass(frozen=True, eq=False)
class LmmFit:
    """Fitted linear mixed models of m features.

    Attributes
    ----------
    method : "REML" or "ML"
    epsilon : convergence tolerance on max |dlogL|
    df : degrees of freedom of t: n - p (a float) with ``df_method="residual"``, or a (p, m)
        array of Satterthwaite's df with ``df_method="satterthwaite"``
    coef, se, t, p : (p, m) arrays
    theta, se_theta, dlogL : (K+1, m) arrays; last row the residual variance
    logLik, niter : (m,) arrays (niter is NaN for features that were not fitted)
    converged : (m,) bool array, by the rule of :func:`flashmm_dask.model.status.converged`:
        max |dlogL| <= epsilon (R's rule; the projected score for components held at zero)
        and a log-likelihood gap of one more Fisher step <= 1e-6
    cov, FIM_beta : (m, p, p) arrays or None
    FIM_theta : (m, K+1, K+1) array or None
    RE : (q, m) array of BLUPs or None
    summary_data : the summary statistics the fit came from (a dict) or None
    covariates : p coefficient names
    features : m feature names
    components : K+1 names, the random components then "residual"
    random : q names of the random-effect columns
    n : number of cells
    d : sizes of the K random components
    df_method : "residual" or "satterthwaite"
    vcov_theta : (m, K+1, K+1) array or None
        Inverse observed information of theta (minus the inverse Hessian of the REML or
        ML log-likelihood); kept with ``df_method="satterthwaite"`` and ``output_cov``.
    jac_cov : (m, K+1, p, p) array or None
        Derivatives of ``cov`` in each variance component (same condition). With
        ``vcov_theta`` they give Satterthwaite's df of any contrast in :func:`lmmtest`.
    status : (m,) int8 array or None
        Codes into :data:`flashmm_dask.model.status.STATUS` (ok, not_converged, all_zero,
        constant, non_finite, boundary, negative_variance), the same as the results store
        of a run; :meth:`status_names` gives the names.
    nonnegative : whether the variance components were constrained to be >= 0
    boundary_df : Satterthwaite's rule at components held at zero, "lmertest" or "retain"
    contrast_df : (c, m) array or None
        Satterthwaite's df of the contrasts given to ``lmm(satterthwaite_contrasts=...)``.
    """

    method: str
    epsilon: float
    df: float | Array
    coef: Array
    se: Array
    t: Array
    p: Array
    theta: Array
    se_theta: Array
    dlogL: Array
    logLik: Array
    niter: Array
    converged: np.ndarray
    cov: Array | None
    FIM_beta: Array | None
    FIM_theta: Array | None
    RE: Array | None
    summary_data: dict[str, Any] | None
    covariates: tuple[str, ...]
    features: tuple[str, ...]
    components: tuple[str, ...]
    random: tuple[str, ...]
    n: int
    d: tuple[int, ...]
    df_method: str = "residual"
    vcov_theta: Array | None = None
    jac_cov: Array | None = None
    status: np.ndarray | None = None
    nonnegative: bool = False
    contrast_df: Array | None = None
    boundary_df: str = "lmertest"

    def __repr__(self) -> str:
        return (
            f"LmmFit(method={self.method!r}, features={len(self.features)}, "
            f"covariates={len(self.covariates)}, components={list(self.components)}, "
            f"converged={int(self.converged.sum())}/{len(self.features)})"
        )

    def status_names(self) -> np.ndarray:
        """The status of each feature by name, an (m,) object array."""
        if self.status is None:
            raise ValueError("this fit carries no status codes")
        return status_names(self.status)

    def df_array(self) -> Array:
        """Degrees of freedom as a (p, m) array."""
        return np.broadcast_to(np.asarray(self.df, dtype=np.float64), self.coef.shape)

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy table: one row per feature and coefficient (a *term*, as in a run's tables).

        Columns: feature, term, coef, se, t, df, p, padj (Benjamini-Hochberg within a
        term, over the features whose p is not NaN).
        """
        from flashmm_dask.numerics.inference import p_adjust

        p, m = self.coef.shape
        return pd.DataFrame(
            {
                "feature": np.tile(np.asarray(self.features, dtype=object), p),
                "term": np.repeat(np.asarray(self.covariates, dtype=object), m),
                "coef": self.coef.ravel(),
                "se": self.se.ravel(),
                "t": self.t.ravel(),
                "df": self.df_array().ravel(),
                "p": self.p.ravel(),
                "padj": p_adjust(self.p, "BH", axis=1).ravel(),
            }
        )

    def to_anndata(
        self,
        adata: AnnData,
        *,
        key: str = "flashmm",
        contrasts: Mapping[str, str] | Sequence[str] | str | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        """Write the results into ``adata.varm`` and the parameters into ``adata.uns[key]``.

        In place: ``adata.varm["flashmm_coef"]``, ``_se``, ``_t``, ``_df``, ``_p`` and
        ``_padj`` become DataFrames (var_names x terms: the coefficients, then the
        ``contrasts``), matched to ``adata.var_names`` by feature name. See
        :func:`flashmm_dask.write_results`, which also takes strata and results stores.
        """
        from flashmm_dask.io.anndata_results import write_results

        write_results(adata, self, key=key, contrasts=contrasts, params=params)

    def to_xarray(self) -> xr.Dataset:
        """The fit as an ``xarray.Dataset`` with the feature dimension first."""
        import xarray as xr

        coords: dict[str, Any] = {
            "feature": list(self.features),
            "covariate": list(self.covariates),
            "component": list(self.components),
        }
        fc = ("feature", "covariate")
        fk = ("feature", "component")
        data: dict[str, Any] = {
            "coef": (fc, self.coef.T),
            "se": (fc, self.se.T),
            "t": (fc, self.t.T),
            "df": (fc, self.df_array().T),
            "p": (fc, self.p.T),
            "theta": (fk, self.theta.T),
            "se_theta": (fk, self.se_theta.T),
            "dlogL": (fk, self.dlogL.T),
            "logLik": ("feature", self.logLik),
            "niter": ("feature", self.niter),
            "converged": ("feature", self.converged),
        }
        if self.status is not None:
            data["status"] = ("feature", self.status)
        if self.cov is not None:
            coords["covariate2"] = list(self.covariates)
            data["cov"] = (("feature", "covariate", "covariate2"), self.cov)
        if self.FIM_beta is not None:
            coords["covariate2"] = list(self.covariates)
            data["FIM_beta"] = (("feature", "covariate", "covariate2"), self.FIM_beta)
        if self.FIM_theta is not None:
            coords["component2"] = list(self.components)
            data["FIM_theta"] = (("feature", "component", "component2"), self.FIM_theta)
        if self.RE is not None:
            coords["random"] = list(self.random)
            data["RE"] = (("feature", "random"), self.RE.T)
        if self.vcov_theta is not None:
            coords["component2"] = list(self.components)
            data["vcov_theta"] = (("feature", "component", "component2"), self.vcov_theta)
        if self.jac_cov is not None:
            coords["covariate2"] = list(self.covariates)
            dims = ("feature", "component", "covariate", "covariate2")
            data["jac_cov"] = (dims, self.jac_cov)
        return xr.Dataset(
            data,
            coords=coords,
            attrs={
                "method": self.method,
                "epsilon": self.epsilon,
                "n": self.n,
                "df_method": self.df_method,
                "nonnegative": int(self.nonnegative),
            },
        )
