"""The ``flashmm-dask`` command line; the only place that configures logging.

    flashmm-dask demo                       simulate, fit and plot on a local Dask cluster
    flashmm-dask run CONFIG                 the whole job from a YAML config
    flashmm-dask simulate OUT.zarr          a simulated AnnData store
    flashmm-dask stats CONFIG               reduce the data to summary statistics only
    flashmm-dask fit CONFIG --stats PATH    fit from saved summary statistics
    flashmm-dask test STORE -c NAME=EXPR    new contrasts on a finished results store
    flashmm-dask report STORE               plots, top tables and report.md of a finished store

Every config key can be overridden with ``--set section.key=value``. A user error prints
one line and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import dask

from flashmm_dask.errors import FlashmmError, FlashmmWarning, InputError
from flashmm_dask.io.outputs import register
from flashmm_dask.io.results import open_results
from flashmm_dask.io.strata_results import is_strata_store
from flashmm_dask.report.plots import make_report, strata_report
from flashmm_dask.report.summary import report_outputs
from flashmm_dask.run.commands import save_stats, write_contrasts
from flashmm_dask.run.config import SimulateConfig, load_config
from flashmm_dask.run.inputs import simulate_data
from flashmm_dask.run.pipeline import run
from flashmm_dask.run.progress import stop_on_signals
from flashmm_dask.stats.strata import StratifiedStats

logger = logging.getLogger("flashmm_dask")

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")


def _config_args(p: argparse.ArgumentParser, *, config: bool = True, plots: bool = True) -> None:
    if config:
        p.add_argument("config", help="YAML run configuration (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.method=ML (repeatable)",
    )
    p.add_argument("--output", help="output folder (output.path)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of another config (and files of yours in their way)",
    )
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:port)")
    p.add_argument("--workers", type=int, help="local Dask worker processes (cluster.n_workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if plots:
        p.add_argument("--no-plots", action="store_true", help="skip the plots")


# the integer options of ``flashmm-dask simulate``: flag, SimulateConfig field, default, help
_SIMULATE_OPTIONS = (
    ("--cells", "n_cells", 20000, "cells (default %(default)s)"),
    ("--genes", "n_genes", 200, "genes (default %(default)s)"),
    (
        "--samples",
        "n_samples",
        12,
        "subjects, nested in the treatments (obs column sam; default %(default)s)",
    ),
    ("--celltypes", "n_celltypes", 3, "cell types (obs column cls; default %(default)s)"),
    (
        "--de-genes",
        "n_de_genes",
        None,
        "differentially expressed genes (default: one per cell type, as R's simuRNAseq)",
    ),
    ("--seed", "seed", 1, "random seed (default %(default)s)"),
    ("--chunk-cells", "chunk_cells", 10000, "cells per chunk of the store (default %(default)s)"),
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flashmm-dask",
        description="FLASH-MM linear mixed models for single-cell data on Dask and Zarr.",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole job from a YAML config")
    _config_args(p)
    _common(p)

    p = sub.add_parser("demo", help="simulate data, fit and plot on a local Dask cluster")
    _config_args(p, config=False)
    p.add_argument("--cells", type=int, help="simulated cells (simulate.n_cells)")
    p.add_argument("--genes", type=int, help="simulated genes (simulate.n_genes)")
    _common(p)

    p = sub.add_parser("simulate", help="write a simulated AnnData store (simuRNAseq model)")
    p.add_argument("out", help="store to write (.zarr or .h5ad)")
    for flag, dest, default, text in _SIMULATE_OPTIONS:
        # the metavar argparse derives from the flag, not from the field name
        metavar = flag.lstrip("-").replace("-", "_").upper()
        p.add_argument(flag, dest=dest, metavar=metavar, type=int, default=default, help=text)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    _common(p)

    p = sub.add_parser(
        "stats", help="reduce the data to summary statistics and save them (OUTPUT/stats.zarr)"
    )
    _config_args(p, plots=False)
    _common(p)

    p = sub.add_parser("fit", help="fit from saved summary statistics")
    _config_args(p)
    p.add_argument("--stats", required=True, help="summary statistics store (flashmm-dask stats)")
    _common(p)

    p = sub.add_parser("test", help="test new contrasts on a finished results store")
    p.add_argument("store", help="results store (OUTPUT/results.zarr)")
    p.add_argument(
        "-c",
        "--contrast",
        action="append",
        required=True,
        metavar="NAME=EXPR",
        help="a contrast, e.g. -c 'B-A=cls1:trtB - cls2:trtB' (repeatable)",
    )
    p.add_argument("--alternative", default="two.sided", choices=["two.sided", "less", "greater"])
    p.add_argument("--out", help="table to write (.csv or .parquet; default next to the store)")
    p.add_argument(
        "--stats",
        help="the run's summary statistics, for a store fitted with Satterthwaite df "
        "(default: the run's stats.load, else stats.zarr next to the store)",
    )
    _common(p)

    p = sub.add_parser("report", help="plots, top tables and report.md of a finished store")
    p.add_argument("store", help="results store (OUTPUT/results.zarr)")
    p.add_argument(
        "--out", help="folder for plots/, top/ and report.md (default the store's folder)"
    )
    _common(p)
    return ap


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.output:
        out.append(f"output.path={args.output}")
    if args.overwrite:
        out.append("output.overwrite=true")
    if args.scheduler:
        out += ["cluster.kind=address", f"cluster.address={args.scheduler}"]
    if args.workers:
        out.append(f"cluster.n_workers={args.workers}")
    if args.no_progress:
        out.append("progress=false")
    if getattr(args, "no_plots", False):
        out.append("output.plots=false")
    if getattr(args, "cells", None):
        out.append(f"simulate.n_cells={args.cells}")
    if getattr(args, "genes", None):
        out.append(f"simulate.n_genes={args.genes}")
    if getattr(args, "stats", None):
        out.append(f"stats.load={args.stats}")
    return out


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # distributed sets up its loggers from dask's config when first imported
    quiet = "debug" if args.debug else "warning"
    dask.config.set({"logging": {"distributed": quiet}})
    logging.getLogger("distributed").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    logging.captureWarnings(True)


def _run(args: argparse.Namespace) -> int:
    source = None if args.command == "demo" else args.config
    cfg = load_config(source, _overrides(args))
    if args.command == "stats":
        target, stats = save_stats(cfg)
        if isinstance(stats, StratifiedStats):
            sizes = ", ".join(f"{k}: {v.n} cells" for k, v in stats.items())
            print(f"summary statistics of {len(stats)} strata ({sizes}) in {target}")
        else:
            print(f"summary statistics of {stats.m} features and {stats.n} cells in {target}")
        return 0
    summary = run(cfg)
    print(summary.line())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    sim = SimulateConfig(**{dest: getattr(args, dest) for _, dest, _, _ in _SIMULATE_OPTIONS})
    path = simulate_data(sim, args.out, overwrite=args.overwrite)
    print(f"simulated {sim.n_cells} cells x {sim.n_genes} genes in {path}")
    return 0


def _test(args: argparse.Namespace) -> int:
    contrasts = {}
    for item in args.contrast:
        name, sep, expr = item.partition("=")
        if not sep or not name.strip() or not expr.strip():
            raise InputError(f"contrast {item!r} must be NAME=EXPRESSION, e.g. 'B-A=trtB - trtA'")
        contrasts[name.strip()] = expr.strip()
    table, out = write_contrasts(
        args.store, contrasts, alternative=args.alternative, stats=args.stats, out=args.out
    )
    significant = table.groupby("term")["padj"].apply(lambda s: int((s < 0.05).sum()))
    for term, count in significant.items():
        print(f"{term}: {count} features with padj < 0.05")
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.store).parent
    if is_strata_store(args.store):  # the plots of each stratum in out/strata/<group>/plots
        files = strata_report(args.store, out)
        where = out / "strata"
    else:
        files = make_report(open_results(args.store), out)
        where = files[0].parent if files else out
    print(f"wrote {len(files)} plots into {where}")
    written = report_outputs(args.store, out)
    if not args.out:  # the run's output folder: these are its files
        register(out, [*files, *written])
    print(f"wrote {written[-1]} and {len(written) - 1} top tables")
    return 0


def _version() -> str:
    from flashmm_dask.io.writing import package_version

    return package_version()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flashmm-dask`` console script."""
    args = parser().parse_args(argv)
    stop_on_signals()
    _configure_logging(args)
    handlers = {"simulate": _simulate, "test": _test, "report": _report}
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore", FutureWarning)
            # the package's warnings are log lines at the command line, never errors
            warnings.simplefilter("default", FlashmmWarning)
            return handlers.get(args.command, _run)(args)
    except FlashmmError as exc:
        if args.debug:
            raise
        print(f"flashmm-dask: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if args.debug or exc.errno is None:
            raise
        # a file-system failure outside the pipeline's own checks (full disk, read-only)
        print(f"flashmm-dask: error: {exc}; --debug shows the traceback", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flashmm-dask: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
