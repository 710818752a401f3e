"""Plots of a finished run: volcano, p-value histogram and QQ, convergence.

They read a results Dataset (the results store schema: ``coef``, ``p``, ``padj`` of shape
(m, p) over ``covariate``; ``contrast_coef``, ``contrast_p``, ``contrast_padj`` of shape
(m, c) over ``contrast``; ``niter``, ``converged`` (m,); ``theta`` (m, K+1) over
``component`` with the residual variance last) and write PNG files with matplotlib's Agg
canvas, without touching pyplot or the global backend.

A *term* is a contrast or a coefficient. For term j with effects b (m,), p-values p (m,)
and Benjamini-Hochberg adjusted p-values padj (m,):

- the volcano plot shows b against -log10 p, highlighting the features with
  padj < alpha;
- the QQ plot shows the sorted -log10 p against the expected -log10 of uniform order
  statistics, (i - 1/2) / n for i = 1..n, with a pointwise 95% band from
  Beta(i, n - i + 1), and the genomic inflation
  lambda = median(chi2_1 quantile of 1 - p) / chi2_1 median.

Features whose effect or p-value is NaN (unfitted, all-zero features) are left out of
every term plot. Points are drawn as rasterised markers, so a plot of 10^5 features
is one vectorised draw call and a small file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.stats

from flashmm_dask.io.results import open_results
from flashmm_dask.io.strata_results import stratum_paths
from flashmm_dask.report.values import (
    Term,
    _as_term,
    _check_alpha,
    _coordinate,
    _require,
    convergence_counts,
    resolve_terms,
    status_counts,
    term_values,
)

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: Sub-folder of the output folder that receives the plots.
PLOTS_DIR = "plots"
#: Resolution of the PNG files (dots per inch).
DPI = 100
NO_FEATURES = "no fitted features"

_SIGNIFICANT = "#d62728"
_OTHER = "#9a9a9a"


def _neg_log10(p: np.ndarray) -> tuple[np.ndarray, int]:
    """-log10 p with p = 0 (underflow) drawn at the smallest positive p; the zero count."""
    zero = p <= 0
    n_zero = int(np.count_nonzero(zero))
    if n_zero:
        positive = p[~zero]
        floor = positive.min() if positive.size else 1e-300
        p = np.where(zero, floor, p)
    return -np.log10(p), n_zero


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _empty(ax: Axes, message: str = NO_FEATURES) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])


def volcano_figure(
    ds: xr.Dataset, term: Term | str, *, alpha: float = 0.05, labels: int = 8
) -> Figure:
    """Volcano plot of one term: effect (x) against -log10 p (y).

    Features with padj < alpha are highlighted and counted in the title; the dashed line
    is the largest p-value among them. The ``labels`` significant features of smallest p
    are labelled with their names (those that find a free place; see
    :mod:`flashmm_dask.report.labels`). The x axis says what the effect is measured in, from
    the transform in the Dataset's attributes (``config.model.transform`` of a run, or
    ``transform``): "log2(1 + x) difference" for log2p1, the data's units for none.

    Parameters
    ----------
    ds : xarray.Dataset
    term : Term or str
        A contrast or coefficient name (or a Term from :func:`resolve_terms`).
    alpha : float
        Significance level of the adjusted p-values.
    labels : int
        How many of the significant features to label at most.

    Returns
    -------
    matplotlib.figure.Figure
        On an Agg canvas; the title holds the significant count of :func:`term_values`.
    """
    term = _as_term(ds, term)
    values = term_values(ds, term, alpha)
    name = term.name
    fig, (ax,) = _figure(6.0, 5.0)
    n = values.p.size
    ax.set_title(
        f"{name}\n{values.n_significant} of {n} features with padj < {values.alpha:g}",
        fontsize=10,
    )
    if n == 0:
        _empty(ax)
        return fig
    y, n_zero = _neg_log10(values.p)
    sig = values.padj < values.alpha
    style: dict[str, Any] = {"linestyle": "none", "marker": "o", "rasterized": True}
    ax.plot(
        values.coef[~sig],
        y[~sig],
        color=_OTHER,
        markersize=2.5,
        alpha=0.6,
        label="not significant",
        **style,
    )
    ax.plot(
        values.coef[sig],
        y[sig],
        color=_SIGNIFICANT,
        markersize=3,
        alpha=0.8,
        label=f"padj < {values.alpha:g}",
        **style,
    )
    if values.n_significant:
        ax.axhline(-np.log10(values.p[sig].max()), color="k", linestyle="--", linewidth=0.7)
    ax.axvline(0.0, color="k", linewidth=0.5)
    from flashmm_dask.io.resultsets import effect_label

    ax.set_xlabel(effect_label(term.kind, ds.attrs))
    ax.set_ylabel("-log10 p" + (f"  ({n_zero} with p = 0 at the top)" if n_zero else ""))
    ax.legend(loc="best", fontsize=8, markerscale=2)
    if labels > 0 and values.n_significant and values.features is not None:
        from flashmm_dask.report.labels import label_points

        label_points(ax, values.coef[sig], y[sig], values.features[sig], labels)
    return fig


def pvalue_figure(ds: xr.Dataset, term: Term | str) -> Figure:
    """Histogram of the p-values of one term and their QQ plot against the uniform.

    Parameters
    ----------
    ds : xarray.Dataset
    term : Term or str
        A contrast or coefficient name (or a Term from :func:`resolve_terms`).

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the histogram (20 bins on [0, 1]) and the QQ plot.
    """
    term = _as_term(ds, term)
    values = term_values(ds, term)
    name = term.name
    fig, (hist_ax, qq_ax) = _figure(11.0, 4.5, ncols=2)
    fig.suptitle(name, fontsize=11)
    n = values.p.size
    hist_ax.set_title("p-value histogram", fontsize=10)
    qq_ax.set_title("QQ plot", fontsize=10)
    if n == 0:
        _empty(hist_ax)
        _empty(qq_ax)
        return fig
    bins = np.linspace(0.0, 1.0, 21).tolist()
    hist_ax.hist(np.clip(values.p, 0.0, 1.0), bins=bins, color="#4c72b0", edgecolor="white")
    hist_ax.axhline(n / 20, color="k", linestyle="--", linewidth=0.8, label="uniform")
    hist_ax.set_xlim(0.0, 1.0)
    hist_ax.set_xlabel("p")
    hist_ax.set_ylabel("features")
    hist_ax.legend(fontsize=8)

    observed, _ = _neg_log10(np.sort(values.p))
    ranks = np.arange(1, n + 1)
    expected = -np.log10((ranks - 0.5) / n)
    # the band at a few hundred ranks, log-spaced: enough for a smooth outline
    at = np.unique(np.geomspace(1, n, num=min(n, 400)).round().astype(np.int64))
    lower = -np.log10(scipy.stats.beta.ppf(0.975, at, n - at + 1))
    upper = -np.log10(scipy.stats.beta.ppf(0.025, at, n - at + 1))
    qq_ax.fill_between(expected[at - 1], lower, upper, color="#cccccc", label="95% band")
    top = float(expected[0])
    qq_ax.plot([0.0, top], [0.0, top], color="k", linewidth=0.8, label="y = x")
    qq_ax.plot(
        expected,
        observed,
        linestyle="none",
        marker="o",
        markersize=2.5,
        color="#4c72b0",
        rasterized=True,
    )
    median_chi2 = np.median(scipy.stats.chi2.isf(values.p, 1))
    inflation = median_chi2 / scipy.stats.chi2.ppf(0.5, 1)
    qq_ax.set_title(f"QQ plot (lambda = {inflation:.3g})", fontsize=10)
    qq_ax.set_xlabel("expected -log10 p")
    qq_ax.set_ylabel("observed -log10 p")
    qq_ax.legend(loc="upper left", fontsize=8)
    return fig


def convergence_figure(ds: xr.Dataset) -> Figure:
    """Convergence diagnostics of a run.

    Left: histogram of niter of converged and of non-converged features. Middle: counts
    of converged, not converged and not fitted features. Third: the distribution of each
    random-effect variance component (theta without the residual) on a symlog axis.
    Fourth, when the results have ``status``: features per status (:func:`status_counts`:
    ok, not_converged, all_zero, constant, non_finite, boundary, negative_variance).

    Parameters
    ----------
    ds : xarray.Dataset
        With ``niter`` and ``converged`` (m,) and, for the right panel, ``theta`` (m, K+1).

    Returns
    -------
    matplotlib.figure.Figure
        Three axes; the bar heights are :func:`convergence_counts`.
    """
    from matplotlib.ticker import MaxNLocator

    counts = convergence_counts(ds)
    niter = np.asarray(ds["niter"].values, dtype=np.float64)
    converged = np.asarray(ds["converged"].values, dtype=bool)
    fitted = ~np.isnan(niter)
    has_status = "status" in ds
    fig, axes = _figure(20.0 if has_status else 15.0, 4.5, ncols=4 if has_status else 3)
    iter_ax, count_ax, theta_ax = axes[:3]
    m = niter.size
    fig.suptitle(f"convergence of {m} features", fontsize=11)

    iter_ax.set_title("iterations", fontsize=10)
    if fitted.any():
        low, top = int(niter[fitted].min()), int(niter[fitted].max())
        bins = np.arange(low - 0.5, top + 1.5).tolist() if top - low < 200 else 50
        iter_ax.hist(
            [niter[fitted & converged], niter[fitted & ~converged]],
            bins=bins,
            stacked=True,
            color=["#4c72b0", _SIGNIFICANT],
            label=["converged", "not converged"],
        )
        iter_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        iter_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        iter_ax.set_xlabel("niter")
        iter_ax.set_ylabel("features")
        iter_ax.legend(fontsize=8)
    else:
        _empty(iter_ax)

    count_ax.set_title("features", fontsize=10)
    bars = count_ax.bar(
        list(counts), list(counts.values()), color=["#4c72b0", _SIGNIFICANT, _OTHER]
    )
    count_ax.bar_label(bars)
    count_ax.set_ylim(0, max(1, *counts.values()) * 1.12)

    theta_ax.set_title("random-effect variance components", fontsize=10)
    _theta_panel(theta_ax, ds, fitted)
    if has_status:
        status_ax = axes[3]
        status_ax.set_title("status", fontsize=10)
        by_status = status_counts(ds)
        bars = status_ax.bar(list(by_status), list(by_status.values()), color="#4c72b0")
        status_ax.bar_label(bars)
        status_ax.set_ylim(0, max(1, *by_status.values()) * 1.12)
        status_ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    return fig


def _theta_panel(ax: Axes, ds: xr.Dataset, fitted: np.ndarray) -> None:
    from matplotlib.ticker import MaxNLocator

    if "theta" not in ds:
        _empty(ax, "no theta in the results")
        return
    components = _coordinate(ds, "component")
    keep = [j for j, c in enumerate(components) if c != "residual"]
    if len(keep) == len(components):  # no names: the residual is last by the schema
        keep = keep[:-1]
    theta = np.asarray(ds["theta"].values, dtype=np.float64)[fitted][:, keep]
    finite = theta[np.isfinite(theta)]
    if not keep:
        _empty(ax, "no random-effect components")
        return
    if finite.size == 0:
        _empty(ax)
        return
    nonzero = np.abs(finite[finite != 0])
    # a power of ten, so that the decade ticks of the axis do not crowd the linear part
    small = float(np.quantile(nonzero, 0.05)) if nonzero.size else 1.0
    linthresh = float(10.0 ** np.floor(np.log10(small)))
    # bins evenly spaced in asinh(theta / linthresh), which is near-uniform on a symlog axis
    lo, hi = np.arcsinh(np.array([finite.min(), finite.max()]) / linthresh)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.sinh(np.linspace(lo, hi, 41)) * linthresh
    for j, name in zip(keep, (components[j] for j in keep), strict=True):
        column = theta[:, keep.index(j)]
        column = column[np.isfinite(column)]
        ax.hist(
            column,
            bins=edges.tolist(),
            histtype="step",
            linewidth=1.3,
            label=f"{name} ({column.size})",
        )
    ax.set_xscale("symlog", linthresh=linthresh)
    if finite.min() < 0:  # negative variance components are legitimate estimates
        ax.axvline(0.0, color="k", linewidth=0.5)
    ax.set_xlabel(f"theta (symlog, linear within ±{linthresh:g})")
    ax.set_ylabel("features")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------- report


def make_report(
    ds: xr.Dataset,
    outdir: str | Path,
    *,
    terms: str | Sequence[str] | None = None,
    alpha: float = 0.05,
) -> list[Path]:
    """Write the plots of a results Dataset into ``outdir/plots/``.

    Files: ``volcano_<stem>.png`` and ``pvalues_<stem>.png`` per term, ``convergence.png``,
    and ``index.tsv`` mapping each term to its stem (see :func:`file_stems`), kind, number
    of features tested and number significant.

    Parameters
    ----------
    ds : xarray.Dataset
        Results following the results store schema (``xarray.open_zarr(store)`` or
        :meth:`LmmFit.to_xarray` with ``padj``).
    outdir : str or Path
        Output folder; ``plots/`` is created inside it and existing plots are replaced.
    terms : str or sequence of str, optional
        Contrasts or coefficients to plot; default every contrast, or every coefficient
        when there are no contrasts.
    alpha : float
        Significance level of the adjusted p-values.

    Returns
    -------
    list of Path
        The files written, in the order above.
    """
    alpha = _check_alpha(alpha)
    selected = resolve_terms(ds, terms)
    _require(ds, ("niter", "converged"))
    folder = Path(outdir) / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = ["term\tkind\tstem\tn_tested\tn_significant"]
    for term in selected:
        values = term_values(ds, term, alpha)
        name = re.sub(r"[\t\r\n]", " ", term.name)
        rows.append(f"{name}\t{term.kind}\t{term.stem}\t{values.p.size}\t{values.n_significant}")
        written.append(
            _save(volcano_figure(ds, term, alpha=alpha), folder / f"volcano_{term.stem}.png")
        )
        written.append(_save(pvalue_figure(ds, term), folder / f"pvalues_{term.stem}.png"))
    written.append(_save(convergence_figure(ds), folder / "convergence.png"))
    index = folder / "index.tsv"
    index.write_text("\n".join(rows) + "\n", encoding="utf-8")
    written.append(index)
    logger.info("wrote %d plot files to %s", len(written), folder)
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def strata_report(path: str | os.PathLike[str], folder: Path) -> list[Path]:
    """The plots of each stratum in ``folder/strata/<name>/plots/``."""
    files: list[Path] = []
    for level, p in stratum_paths(path).items():
        files += make_report(open_results(str(p)), folder / "strata" / p.name)
        logger.debug("plots of stratum %s written", level)
    return files
