"""The report of a run: the top genes in the log and ``OUTPUT/report.md``.

At the end of ``flashmm-dask run`` (and of ``flashmm-dask report``) the results store is
read once more, stratum by stratum (:func:`flashmm_dask.io.strata_results.iter_strata`), and

- the full sorted table of every reported term is written to ``OUTPUT/top/<term>.csv``
  (``OUTPUT/top/<stratum>/<term>.csv`` with strata; see
  :func:`flashmm_dask.io.resultsets.write_top_tables`);
- ``OUTPUT/report.md`` says what was fitted and what was found: the data (path, cells,
  features), the model (formulas, method, df, transform, tests, contrasts), the status
  counts, and per term (and stratum) the top genes with links to their full table and
  plots;
- :func:`log_top_genes` logs the short tables of :func:`top_genes_text` once, at INFO.

The reported terms are the contrasts, or every coefficient when there are none (as for
the plots).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flashmm_dask.io.resultsets import (
    ResultSets,
    default_terms,
    effect_unit,
    loaded,
    result_sets,
    run_parameters,
    term_names,
    term_table,
    top_paths,
    write_top_tables,
)
from flashmm_dask.io.writing import write_file

if TYPE_CHECKING:
    import xarray as xr

logger = logging.getLogger(__name__)

REPORT = "report.md"
#: Rows of the top tables in the log and in report.md.
TOP_N = 10


def _where(level: str | None) -> str:
    return "" if level is None else f" in stratum {level}"


def _fmt(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "NA" if np.isnan(v) else format(v, spec)


_TEXT_COLUMNS = (("feature", "s"), ("coef", ".4g"), ("p", ".3g"), ("padj", ".3g"))


def top_genes_text(sets: ResultSets, n: int = TOP_N, alpha: float = 0.05) -> str:
    """Short tables of the top ``n`` features by p of each reported term and stratum.

    Returns
    -------
    str
        For each term and stratum a header line (how many features have padj < alpha)
        and the table: feature, coef, p, padj.
    """
    blocks = []
    for level, ds in sets:
        for term in default_terms(ds):
            top = term_table(ds, term, None)
            tested = int(np.isfinite(top["p"].to_numpy()).sum())
            significant = int((top["padj"].to_numpy() < alpha).sum())
            rows = [
                [_fmt(r[c], spec) for c, spec in _TEXT_COLUMNS] for _, r in top.head(n).iterrows()
            ]
            header = [c for c, _ in _TEXT_COLUMNS]
            widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
            lines = [
                f"top {min(n, len(top))} of {term}{_where(level)}: {significant} of {tested} "
                f"tested features with padj < {alpha:g}"
            ]
            for row in [header, *rows]:
                cells = [
                    row[0].ljust(widths[0]),
                    *(x.rjust(w) for x, w in zip(row[1:], widths[1:], strict=True)),
                ]
                lines.append("  " + "  ".join(cells))
            blocks.append("\n".join(lines))
    return "\n".join(blocks)


# -- report.md ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines


def _code(value: Any) -> str:
    text = str(value)
    return f"`{text}`" if "`" not in text else text


def _status_counts(ds: xr.Dataset) -> dict[str, int]:
    from flashmm_dask.io.results import STATUS

    if "status" not in ds:
        converged = np.asarray(ds["converged"].values, dtype=bool)
        fitted = ~np.isnan(np.asarray(ds["niter"].values, dtype=np.float64))
        return {
            "converged": int((converged & fitted).sum()),
            "not_converged": int((~converged & fitted).sum()),
            "not fitted": int((~fitted).sum()),
        }
    codes = np.asarray(ds["status"].values, dtype=np.int64)
    counts = {name: int((codes == k).sum()) for k, name in enumerate(STATUS)}
    if (codes < 0).any():
        counts["not_written"] = int((codes < 0).sum())
    return counts


def _plot_folders(sets: ResultSets, store: str | os.PathLike[str] | None) -> dict:
    """Level -> the folder of its plots, relative to the output folder: ``plots/`` of an
    unstratified run, ``strata/<group>/plots/`` of each stratum
    (:func:`flashmm_dask.report.plots.strata_report`); none for strata of an unknown
    store."""
    from flashmm_dask.io.strata_results import stratum_paths
    from flashmm_dask.report.plots import PLOTS_DIR

    if sets[0][0] is None:
        return {None: Path(PLOTS_DIR)}
    if store is None or "://" in str(store):
        return {}
    return {
        level: Path("strata") / group.name / PLOTS_DIR
        for level, group in stratum_paths(store).items()
    }


def _plot_links(folder: Path, plots: Path | None, term_stem: str) -> dict[str, str]:
    """Relative paths of the volcano and p-value plots of a term in the folder ``plots``
    (relative to ``folder``), where they exist."""
    found = {}
    for kind in ("volcano", "pvalues"):
        path = None if plots is None else plots / f"{kind}_{term_stem}.png"
        if path is not None and (folder / path).exists():
            found[kind] = path.as_posix()
    return found


def report_markdown(
    sets: ResultSets,
    folder: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | None = None,
    n: int = TOP_N,
    alpha: float = 0.05,
    top_tables: bool = True,
) -> str:
    """The text of ``report.md`` for the results ``sets`` of a run in ``folder``.

    Links to the top tables (when ``top_tables``) and to the plots that exist in
    ``folder`` are relative to it.
    """
    from flashmm_dask.report.values import file_stems

    folder = Path(folder)
    params = run_parameters(sets[0][1])
    stratified = sets[0][0] is not None
    out = ["# flashmm_dask report", ""]
    made = f"Written {datetime.now(UTC).isoformat(timespec='seconds')}"
    versions = params.get("versions", {})
    version = versions.get("flashmm-dask", versions.get("flashmm_dask"))
    if version:
        made += f" by flashmm-dask {version}"
    if store is not None:
        shown = os.path.relpath(store, folder) if "://" not in str(store) else str(store)
        made += f" from the results store {_code(shown)}"
    out += [made + ".", ""]

    out += ["## Data", ""]
    data = params.get("data", {})
    path = data.get("path")
    rows: list[list[Any]] = [["path", _code(path) if path else "simulated (`simulated.zarr`)"]]
    if data.get("layer"):
        rows.append(["layer", _code(data["layer"])])
    m = params["n_features"]
    if stratified:
        cells = [c for _, ds in sets if isinstance(c := ds.attrs.get("n_cells"), int)]
        if len(cells) == len(sets):
            rows.append(["cells", f"{sum(cells)} in {len(sets)} strata"])
        rows.append(["features", m])
        levels = ", ".join(
            f"{level} ({ds.attrs['n_cells']} cells)" if "n_cells" in ds.attrs else str(level)
            for level, ds in sets
        )
        rows.append(["strata", f"by {_code(params.get('by', '?'))}: {len(sets)} levels, {levels}"])
    else:
        rows.append(["cells", params.get("n_cells", "?")])
        rows.append(["features", m])
    out += [*_table(["", ""], rows), ""]

    out += ["## Model", ""]
    unit = effect_unit(params.get("transform"), params.get("target_sum"))
    random = params.get("random", [])
    rows = [
        ["fixed effects", _code(params.get("fixed", "?"))],
        ["random effects", ", ".join(_code(r) for r in random) or "?"],
        ["method", params.get("method", "?")],
        ["degrees of freedom", params.get("df", "residual")],
        [
            "transform",
            f"{params.get('transform', '?')}" + (f" (effects in {unit})" if unit else ""),
        ],
        [
            "tests",
            f"{params.get('alternative', 'two.sided')}; padj: {params.get('p_adjust', 'BH')}",
        ],
    ]
    out += [*_table(["", ""], rows), ""]
    contrasts = params.get("contrasts", {})
    if contrasts:
        out += ["Contrasts:", ""]
        if stratified:
            lacking = {
                name: [str(level) for level, ds in sets if name not in term_names(ds)[1]]
                for name in contrasts
            }
            rows = [[k, _code(v), ", ".join(lacking[k]) or "-"] for k, v in contrasts.items()]
            out += [*_table(["name", "expression", "strata without it"], rows), ""]
        else:
            rows = [[k, _code(v)] for k, v in contrasts.items()]
            out += [*_table(["name", "expression"], rows), ""]

    out += ["## Status", ""]
    counts = [(level, _status_counts(ds)) for level, ds in sets]
    names = list(dict.fromkeys(k for _, c in counts for k in c))
    if stratified:
        header = ["status", *[str(level) for level, _ in counts]]
        out += _table(header, [[k, *[c.get(k, 0) for _, c in counts]] for k in names])
    else:
        out += _table(["status", "features"], [[k, counts[0][1][k]] for k in names])
    out += [""]

    out += ["## Top genes", ""]
    out += [
        f"The {n} features of smallest p per "
        + ("stratum and " if stratified else "")
        + ("contrast" if contrasts else "term")
        + f"; padj < {alpha:g} counts as significant.",
        "",
    ]
    tables = {(level, term): path for level, term, path in top_paths(sets)}
    plot_folders = _plot_folders(sets, store)
    by_level = dict(sets)
    for (level, term), table_path in tables.items():
        ds = by_level[level]
        top = term_table(ds, term, None)
        tested = int(np.isfinite(top["p"].to_numpy()).sum())
        significant = int((top["padj"].to_numpy() < alpha).sum())
        out += [f"### {term}{_where(level)}", ""]
        line = f"{significant} of {tested} tested features with padj < {alpha:g}."
        if top_tables:
            line += f" All features, sorted: [{table_path.as_posix()}]({table_path.as_posix()})."
        plots = _plot_links(folder, plot_folders.get(level), file_stems([term])[term])
        if "pvalues" in plots:
            line += f" [p-values and QQ plot]({plots['pvalues']})."
        out += [line, ""]
        rows = [
            [
                _code(r["feature"]),
                _fmt(r["coef"], ".4g"),
                _fmt(r["se"], ".3g"),
                _fmt(r["t"], ".3g"),
                _fmt(r["df"], ".4g"),
                _fmt(r["p"], ".3g"),
                _fmt(r["padj"], ".3g"),
            ]
            for _, r in top.head(n).iterrows()
        ]
        out += [*_table(["feature", "coef", "se", "t", "df", "p", "padj"], rows), ""]
        if "volcano" in plots:
            out += [f"![volcano plot of {term}{_where(level)}]({plots['volcano']})", ""]

    links = []
    for level, plots in plot_folders.items():
        for name, what in (("convergence.png", "convergence"), ("index.tsv", "index of the plots")):
            if (folder / plots / name).exists():
                links.append(f"- [{what}{_where(level)}]({(plots / name).as_posix()})")
    if links:
        out += ["## Plots", "", *links, ""]
    return "\n".join(out)


def report_outputs(
    store: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    tables: bool = True,
    n: int = TOP_N,
    alpha: float = 0.05,
    storage_options: Mapping[str, Any] | None = None,
    sets: ResultSets | None = None,
    top: Sequence[Path] | None = None,
) -> list[Path]:
    """Write the top tables (when ``tables``) and ``report.md`` of a finished store.

    Call it after the plots, so that the report links them. ``sets``: the store's
    results already read (:func:`~flashmm_dask.io.resultsets.loaded`), so that a run
    reads its store once for the tables and the report; ``top``: the top tables, when
    the caller wrote them (:func:`~flashmm_dask.io.resultsets.write_top_tables`).

    Returns
    -------
    list of Path
        The files written, ``report.md`` last.
    """
    if sets is None:
        sets = loaded(result_sets(os.fspath(store), storage_options=storage_options))
    if top is not None:
        files = list(top)
    else:
        files = write_top_tables(sets, folder) if tables else []
    text = report_markdown(sets, folder, store=store, n=n, alpha=alpha, top_tables=tables)
    # staged: a report.md that exists is complete
    write = partial(Path.write_text, data=text + "\n", encoding="utf-8")
    files.append(write_file(Path(folder) / REPORT, write))
    logger.info("wrote %s and %d top tables", files[-1], len(files) - 1)
    return files


def log_top_genes(
    store: str | os.PathLike[str],
    *,
    n: int = TOP_N,
    alpha: float = 0.05,
    storage_options: Mapping[str, Any] | None = None,
    sets: ResultSets | None = None,
) -> None:
    """Log :func:`top_genes_text` of a finished store once, at INFO (nothing is read
    when INFO is not logged); ``sets``: its results already read."""
    if logger.isEnabledFor(logging.INFO):
        if sets is None:
            sets = loaded(result_sets(os.fspath(store), storage_options=storage_options))
        logger.info("top genes by p\n%s", top_genes_text(sets, n=n, alpha=alpha))


__all__ = [
    "REPORT",
    "TOP_N",
    "log_top_genes",
    "report_markdown",
    "report_outputs",
    "top_genes_text",
]
