"""What a results store holds: the per-feature variables and their dimensions, and the
names and blocking of a store (:class:`ResultsLayout`). :mod:`flashmm_dask.io.results`
reads and writes the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashmm_dask.errors import InputError


@dataclass(frozen=True)
class _Var:
    """A per-feature variable: its dimensions after ``feature``, dtype and meaning."""

    dims: tuple[str, ...]
    dtype: str
    description: str
    per_block: bool = True  # written by write_block (else by finalize_results)


_FC, _FK, _FN = ("covariate",), ("component",), ("contrast",)
_VARS: dict[str, _Var] = {
    "coef": _Var(_FC, "float64", "fixed-effect estimate"),
    "se": _Var(_FC, "float64", "standard error of coef"),
    "t": _Var(_FC, "float64", "t statistic coef / se"),
    "p": _Var(_FC, "float64", "p-value of t"),
    "df": _Var(_FC, "float64", "degrees of freedom of t"),
    "padj": _Var(_FC, "float64", "Benjamini-Hochberg adjusted p within a covariate", False),
    "theta": _Var(_FK, "float64", "variance components; the last is the residual variance"),
    "se_theta": _Var(_FK, "float64", "standard error of theta"),
    "dlogL": _Var(_FK, "float64", "score (gradient of the log-likelihood) at theta"),
    "logLik": _Var((), "float64", "log-likelihood (REML or ML) at the fit"),
    "niter": _Var(
        (),
        "float64",
        "iterations of the fit (Fisher scoring, refits at the boundary, the safeguarded search);"
        " NaN for features not fitted",
    ),
    "converged": _Var((), "bool", "max |dlogL| <= epsilon and theta at the optimum"),
    "status": _Var((), "int8", "fit status code; see flag_values and flag_meanings"),
    "cov": _Var(("covariate", "covariate2"), "float64", "covariance matrix of coef"),
    "contrast_coef": _Var(_FN, "float64", "contrast estimate L' coef"),
    "contrast_se": _Var(_FN, "float64", "standard error of contrast_coef"),
    "contrast_t": _Var(_FN, "float64", "t statistic of the contrast"),
    "contrast_p": _Var(_FN, "float64", "p-value of contrast_t"),
    "contrast_df": _Var(_FN, "float64", "degrees of freedom of contrast_t"),
    "contrast_padj": _Var(
        _FN, "float64", "Benjamini-Hochberg adjusted p within a contrast", per_block=False
    ),
}
_COORDS = ("feature", "covariate", "covariate2", "component", "contrast")
# -- layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultsLayout:
    """Names and blocking of a results store.

    Parameters
    ----------
    features : m feature names
    covariates : p coefficient names
    components : K+1 variance-component names, the residual last
    contrasts : c contrast names (may be empty)
    block_size : features per block (the chunk size along ``feature``)
    store_cov : whether the (m, p, p) coefficient covariances are stored
    """

    features: tuple[str, ...]
    covariates: tuple[str, ...]
    components: tuple[str, ...]
    contrasts: tuple[str, ...]
    block_size: int
    store_cov: bool = True

    def __post_init__(self) -> None:
        for name in ("features", "covariates", "components", "contrasts"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise InputError(f"ResultsLayout.{name} must be a sequence of names, not a string")
            names = tuple(str(x) for x in value)
            object.__setattr__(self, name, names)
            if name != "contrasts" and not names:
                raise InputError(
                    f"ResultsLayout.{name} is empty; a results store needs at least one"
                )
            if name != "features" and len(set(names)) != len(names):
                dupes = sorted({x for x in names if names.count(x) > 1})
                raise InputError(f"ResultsLayout.{name} has duplicate names: {', '.join(dupes)}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InputError(f"block_size must be a positive integer; got {size!r}")
        object.__setattr__(self, "block_size", int(size))
        object.__setattr__(self, "store_cov", bool(self.store_cov))

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_blocks(self) -> int:
        """Number of feature blocks, ceil(m / block_size)."""
        return math.ceil(len(self.features) / self.block_size)

    def block_slice(self, b: int) -> slice:
        """The features of block ``b`` (0-based); the last block may be shorter."""
        if (
            isinstance(b, bool)
            or not isinstance(b, (int, np.integer))
            or not 0 <= b < self.n_blocks
        ):
            raise InputError(
                f"block {b!r} is out of range: the store has blocks 0..{self.n_blocks - 1}"
            )
        start = int(b) * self.block_size
        return slice(start, min(start + self.block_size, len(self.features)))

    def dim_sizes(self) -> dict[str, int]:
        return {
            "feature": len(self.features),
            "covariate": len(self.covariates),
            "covariate2": len(self.covariates),
            "component": len(self.components),
            "contrast": len(self.contrasts),
            "block": self.n_blocks,
        }

    def variables(self) -> tuple[str, ...]:
        """Names of the per-feature variables of a store with this layout."""
        return tuple(name for name in _VARS if name != "cov" or self.store_cov)
