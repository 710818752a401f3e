"""The numbers behind the plots of :mod:`flashmm_dask.report.plots`.

The terms of a results Dataset, their file stems and values, and the convergence and
status counts of the features.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from flashmm_dask.errors import InputError
from flashmm_dask.numerics.inference import p_adjust

if TYPE_CHECKING:
    import xarray as xr

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 80


class Term(NamedTuple):
    """One plotted term: its name, kind, and the file-name stem of its plots."""

    name: str
    kind: str  # "contrast" or "covariate"
    stem: str


class TermValues(NamedTuple):
    """The values of one term over the m features, NaN features removed.

    Attributes
    ----------
    coef, p, padj : (n,) arrays, n <= m the features with a finite effect and p-value
    n_significant : number of those with padj < alpha
    alpha : the significance level
    features : (n,) their names (None when the Dataset has no feature coordinate)
    """

    coef: np.ndarray
    p: np.ndarray
    padj: np.ndarray
    n_significant: int
    alpha: float
    features: np.ndarray | None = None


# --------------------------------------------------------------------------- names


def file_stems(names: Iterable[str]) -> dict[str, str]:
    """Map term names to unique file-name stems.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_`` (a run of
    them one ``_``): ``"log(libsize)"`` -> ``"log_libsize_"``, ``"cls2:trtB - cls1:trtB"``
    -> ``"cls2_trtB_-_cls1_trtB"``. Long names are cut and given a hash of the full name.
    Stems that would clash (also when letter case is ignored, as on macOS and Windows
    file systems) get a suffix ``_2``, ``_3``, ... in the order of ``names``.

    Parameters
    ----------
    names : iterable of str

    Returns
    -------
    dict
        name -> stem, in the order of ``names`` (duplicated names appear once).
    """
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        name = str(name)
        if name in stems:
            continue
        base = _UNSAFE.sub("_", name).lstrip(".") or "term"
        if len(base) > _MAX_STEM:
            digest = hashlib.sha1(name.encode()).hexdigest()[:8]
            base = f"{base[: _MAX_STEM - 9]}_{digest}"
        stem, k = base, 1
        while stem.lower() in taken:
            k += 1
            stem = f"{base}_{k}"
        taken.add(stem.lower())
        stems[name] = stem
    return stems


def _coordinate(ds: xr.Dataset, dim: str) -> list[str]:
    if dim not in ds.dims:
        return []
    if dim in ds.coords:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[dim].values]
    return [str(i) for i in range(ds.sizes[dim])]


def resolve_terms(ds: xr.Dataset, terms: str | Sequence[str] | None = None) -> list[Term]:
    """The terms to plot, with their kind and file stem.

    Parameters
    ----------
    ds : xarray.Dataset
        A results Dataset.
    terms : str or sequence of str, optional
        Contrast or coefficient names. A name that is both is taken as the contrast.
        Default: every contrast, or every coefficient when the Dataset has no contrasts.

    Returns
    -------
    list of Term

    Raises
    ------
    InputError
        If a name is neither a contrast nor a coefficient of ``ds``.
    """
    _require(ds, ("coef", "p"))
    covariates = _coordinate(ds, "covariate")
    contrasts = _coordinate(ds, "contrast") if "contrast_p" in ds else []
    if terms is None:
        names = contrasts or covariates
    else:
        names = [terms] if isinstance(terms, str) else [str(t) for t in terms]
    unknown = [t for t in names if t not in contrasts and t not in covariates]
    if unknown:
        raise InputError(
            f"unknown term(s) {', '.join(map(repr, unknown))} in terms; contrasts: "
            f"{', '.join(contrasts) or '(none)'}; coefficients: {', '.join(covariates)}"
        )
    stems = file_stems(names)
    return [Term(t, "contrast" if t in contrasts else "covariate", stems[t]) for t in stems]


def _require(ds: Any, names: Sequence[str]) -> None:
    if not hasattr(ds, "data_vars") or not hasattr(ds, "sizes"):
        raise InputError(f"plots need an xarray.Dataset of results; got {type(ds).__name__}")
    missing = [v for v in names if v not in ds]
    if missing:
        raise InputError(
            f"the results Dataset has no {', '.join(missing)}; "
            f"it has: {', '.join(map(str, ds.data_vars)) or '(nothing)'}; "
            "pass a results store opened with xarray.open_zarr or LmmFit.to_xarray()"
        )


# --------------------------------------------------------------------------- values


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number in (0, 1); got {alpha!r}") from None
    if not 0.0 < a < 1.0:
        raise InputError(f"alpha must be in (0, 1); got {alpha!r}")
    return a


def term_values(ds: xr.Dataset, term: Term | str, alpha: float = 0.05) -> TermValues:
    """Effects, p-values and adjusted p-values of one term, NaN features dropped.

    ``padj`` is read from the Dataset; when it lacks the variable, the Benjamini-Hochberg
    adjustment of the term's p-values is computed.

    Parameters
    ----------
    ds : xarray.Dataset
    term : Term or str
        A Term from :func:`resolve_terms`, or a contrast or coefficient name.
    alpha : float

    Returns
    -------
    TermValues
    """
    alpha = _check_alpha(alpha)
    term = _as_term(ds, term)
    if term.kind == "contrast":
        prefix, dim = "contrast_", "contrast"
    else:
        prefix, dim = "", "covariate"
    index = _coordinate(ds, dim).index(term.name)

    def column(var: str) -> np.ndarray:
        return np.asarray(ds[prefix + var].isel({dim: index}).values, dtype=np.float64)

    coef, p = column("coef"), column("p")
    if prefix + "padj" in ds:
        padj = column("padj")
    else:
        logger.debug("no %spadj in the Dataset; adjusting %s by BH", prefix, term.name)
        padj = p_adjust(p)
    ok = np.isfinite(coef) & np.isfinite(p)
    coef, p, padj = coef[ok], p[ok], padj[ok]
    n_sig = int(np.count_nonzero(padj < alpha))
    names = np.asarray(_coordinate(ds, "feature"), dtype=object) if "feature" in ds.coords else None
    return TermValues(coef, p, padj, n_sig, alpha, None if names is None else names[ok])


def _as_term(ds: xr.Dataset, term: Term | str) -> Term:
    return term if isinstance(term, Term) else resolve_terms(ds, [term])[0]


def significant_counts(
    ds: xr.Dataset, terms: str | Sequence[str] | None = None, alpha: float = 0.05
) -> dict[str, int]:
    """Number of features with padj < alpha for each term (the counts in the plot titles).

    Returns
    -------
    dict
        term name -> count, for the terms :func:`resolve_terms` selects.
    """
    return {t.name: term_values(ds, t, alpha).n_significant for t in resolve_terms(ds, terms)}


def convergence_counts(ds: xr.Dataset) -> dict[str, int]:
    """Counts of converged, not converged and not fitted (NaN niter) features.

    Returns
    -------
    dict
        ``{"converged": .., "not converged": .., "not fitted": ..}``; they sum to m.
    """
    _require(ds, ("niter", "converged"))
    niter = np.asarray(ds["niter"].values, dtype=np.float64)
    converged = np.asarray(ds["converged"].values, dtype=bool)
    fitted = ~np.isnan(niter)
    return {
        "converged": int(np.count_nonzero(converged & fitted)),
        "not converged": int(np.count_nonzero(~converged & fitted)),
        "not fitted": int(np.count_nonzero(~fitted)),
    }


def status_counts(ds: xr.Dataset) -> dict[str, int]:
    """Features per status name (:data:`flashmm_dask.model.status.STATUS`, in code order)."""
    from flashmm_dask.model.status import STATUS

    codes = np.asarray(ds["status"].values, dtype=np.int64)
    return {name: int(np.count_nonzero(codes == k)) for k, name in enumerate(STATUS)}
