"""Simulated multi-subject, multi-cell-type scRNA-seq counts: the ``simuRNAseq`` model.

A port of ``simuRNAseq`` from the R package FLASHMM 1.3.0 (without a reference count
matrix), written so that atlas-sized data sets can be streamed into an AnnData store.

Model
-----
Notation: cells c = 1..n, genes g = 1..m, mu_g the gene mean and phi_g the negative
binomial size ("dispersion" in R: variance mu + mu^2 / phi).

- Every cell draws, independently and uniformly, a treatment trt(c) among the letters
  "A", "B", ... (``n_treatments``) and a cell type cls(c) among "1".."n_celltypes".
- Subjects are nested in treatments: treatment A has subjects "A1".."A{S_A}", B has
  "B1".."B{S_B}", ..., with S_A + S_B + ... = ``n_samples``; a cell's subject sam(c) is
  uniform among its treatment's subjects.
- Library sizes: libsize(c) = sum_g R_cg with R_cg ~ NB(mu_g, phi_g), the column sums of
  a reference count matrix, as R's ``metadata$libsize``.
- Differentially expressed (DE) genes are the last ``n_de_genes`` genes; their numbers
  per cell type are multinomial with equal probabilities over the observed cell types in
  sorted order, and they are assigned to the cell types in that order. The effect beta_g
  (a natural-log fold change) is uniform on [minbeta, maxbeta], with a random sign of
  probability 1/2 each when ``direction="both"``.
- Subject random effects b_sg ~ N(0, var_randomeffects), independent over subjects s and
  genes g.
- Counts::

      Y_cg ~ NB(m_cg, phi_g),
      log m_cg = log mu_g + b_{sam(c), g} + beta_g [trt(c) = T and cls(c) = k_g]
                 + log libsize(c) - mean_c' log libsize(c')

  where T, the treated condition, is the last observed treatment in sorted order and k_g
  the cell type of DE gene g. NB(m, phi) is drawn as Poisson(m G / phi) with
  G ~ Gamma(phi, 1).

Defaults follow R: mu_g = 1 + Poisson(1) and phi_g = 1 + Poisson(1), the distribution R
draws its reference matrix from.

Differences from R (R fails or estimates where this module does not)
--------------------------------------------------------------------
- R re-estimates mu_g and phi_g from the reference matrix by moments (dropping genes with
  variance <= mean); here ``gene_mean`` and ``dispersion`` are the model's values.
- R spreads all ``nsam`` subjects over treatments multinomially and fails when a treatment
  gets none; here every treatment gets one subject and the other
  ``n_samples - n_treatments`` are spread multinomially.
- A cell whose reference library is empty (R: log(0), NaN means) has its library size
  redrawn, i.e. library sizes are conditioned on being positive.
- ``n_de_genes`` defaults to min(n_celltypes, n_genes) (R: ncls, failing if > nGenes).
- Subjects are always nested (R ``samples.nested = TRUE``); ``direction`` and the sorted
  levels are R's; the ``nDEgenesType``, ``pDEgenesType``, ``adjust.library.size``,
  ``trt``, ``metadata`` and ``counts`` arguments are not ported.

Cost: per non-zero, not per matrix entry. The counts are drawn in sparse form
(:mod:`~flashmm_dask.numerics.nb_sparse`): for each cell, candidate genes by geometric
gaps under a bound of their NB means (each subject's genes in buckets of bounds within
10% of the mean), thinned to the exact probability of a non-zero, whose value is drawn
from the NB conditioned on > 0. The distribution is exactly that of the Gamma-Poisson
draw of every entry (which cost about 130 ns per entry, 2.6 us per non-zero at 5%
non-zeros). Blocks of cells are independent, so ``n_threads`` scales it, and
:func:`simulate_to_store` draws the next chunks while it writes one.

Randomness
----------
Independent streams are spawned from ``numpy.random.SeedSequence(seed)``: gene parameters,
cell metadata, DE genes, random effects, library sizes and counts. The library sizes and
counts of cells [k B, (k + 1) B), B = ``RNG_BLOCK_CELLS``, come from the k-th spawned child
of their stream, so the data do not depend on ``chunk_cells`` or ``n_threads``.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from flashmm_dask.errors import InputError
from flashmm_dask.io.anndata_store import store_format, write_store, write_streamed
from flashmm_dask.io.writing import package_version
from flashmm_dask.numerics.nb_sparse import gene_buckets
from flashmm_dask.simulate_blocks import RNG_BLOCK_CELLS, _iter_chunks, _Model, draw_libsize

__all__ = ["RNG_BLOCK_CELLS", "simulate_rnaseq", "simulate_to_store", "write_store"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "flashmm_dask.simulate"
FORMAT_VERSION = 1
_STREAMS = ("genes", "metadata", "de", "random_effects", "libsize", "counts")
_PER_GENE_ARGUMENTS = ("gene_mean", "dispersion", "dtype")  # recorded in var, or by name


@dataclass(frozen=True)
class _Params:
    n_genes: int
    n_cells: int
    n_samples: int
    n_celltypes: int
    n_treatments: int
    n_de_genes: int
    minbeta: float
    maxbeta: float
    direction: str
    var_randomeffects: float
    gene_mean: np.ndarray | None
    dispersion: np.ndarray | None
    seed: int
    dtype: np.dtype


# --------------------------------------------------------------------------- public API


def simulate_rnaseq(
    n_genes: int = 100,
    n_cells: int = 1000,
    *,
    n_samples: int = 10,
    n_celltypes: int = 3,
    n_treatments: int = 2,
    n_de_genes: int | None = None,
    minbeta: float = 0.25,
    maxbeta: float = 1.0,
    direction: str = "both",
    var_randomeffects: float = 0.1,
    gene_mean: float | np.ndarray | None = None,
    dispersion: float | np.ndarray | None = None,
    seed: int | None = None,
    chunk_cells: int = 100_000,
    dtype: str | np.dtype = "int32",
    n_threads: int = 1,
) -> ad.AnnData:
    """Simulate negative binomial scRNA-seq counts as R FLASHMM's ``simuRNAseq``.

    Parameters
    ----------
    n_genes, n_cells : int
        Numbers of genes (R ``nGenes``) and cells (R ``nCells``).
    n_samples : int
        Number of subjects (R ``nsam``), nested in treatments; at least ``n_treatments``.
    n_celltypes : int
        Number of cell types (R ``ncls``), labelled "1".."n_celltypes".
    n_treatments : int
        Number of conditions (R ``ntrt``), labelled "A", "B", ...; at most 26.
    n_de_genes : int, optional
        Number of DE genes (R ``nDEgenes``); default ``min(n_celltypes, n_genes)``.
    minbeta, maxbeta : float
        Bounds of the absolute DE log fold change (natural log), minbeta < maxbeta.
    direction : {"both", "up", "down"}
        "both": random sign (requires minbeta * maxbeta > 0); "up": minbeta > 0;
        "down": maxbeta < 0.
    var_randomeffects : float
        Variance of the subject random effects (R ``var.randomeffects``).
    gene_mean, dispersion : float or array of shape (n_genes,), optional
        NB mean at the average library size and NB size per gene; default
        1 + Poisson(1) each, drawn from ``seed``.
    seed : int, optional
        Non-negative seed; if None one is drawn and recorded in ``uns["simulation"]``.
    chunk_cells : int
        Cells materialised at a time; does not change the result.
    dtype : str or numpy.dtype
        dtype of the counts in X (integer or floating).
    n_threads : int
        Threads drawing independent cell blocks; does not change the result.

    Returns
    -------
    anndata.AnnData
        n_cells x n_genes; X a ``scipy.sparse.csr_matrix`` of counts; obs categorical
        ``sam``, ``cls``, ``trt`` (sorted levels) and float ``libsize`` (the cell's
        reference library size, the offset of the model, as R's); var ``de``,
        ``de_celltype``, ``beta`` (0 for non-DE), ``gene_mean``, ``dispersion``;
        ``uns["simulation"]`` the parameters, the seed and the true random effects
        (``random_effects``, n_subjects x n_genes, rows in the order of ``sam``'s levels).
    """
    params = _validate(locals())
    _check_positive_int("chunk_cells", chunk_cells)
    model = _build_model(params, n_threads)
    chunks = list(_iter_chunks(model, chunk_cells, n_threads))
    X = sp.vstack(chunks, format="csr") if len(chunks) > 1 else chunks[0]
    return ad.AnnData(X=sp.csr_matrix(X), obs=model.obs, var=model.var, uns=model.uns)


def simulate_to_store(
    path: str | os.PathLike[str], n_genes: int = 100, n_cells: int = 1000, **options: Any
) -> Path:
    """Simulate as :func:`simulate_rnaseq` and stream the cells into an AnnData store.

    The counts are generated ``chunk_cells`` cells at a time and appended to X (CSR,
    64-bit indptr) with anndata's ``write_elem`` and ``sparse_dataset(...).append``, so
    memory is bounded by a chunk plus the O(n_cells) obs table. The result equals
    ``simulate_rnaseq`` with the same arguments and seed.

    Parameters
    ----------
    path : path-like
        Store to create, a ".zarr" folder or an ".h5ad" file.
    n_genes, n_cells, n_samples, n_celltypes, n_treatments, n_de_genes, minbeta, maxbeta,
    direction, var_randomeffects, gene_mean, dispersion, seed, dtype, n_threads
        As in :func:`simulate_rnaseq`.
    chunk_cells : int
        Cells generated and appended at a time; peak memory is about 8 (int32 counts)
        to 12 bytes per non-zero of ``n_threads`` + 1 chunks (the chunk written and the
        next ones drawn meanwhile; about 0.75 n_genes non-zeros per cell with the
        default gene means), so lower it for many genes.
    store_chunk_cells : int
        X's data and indices are chunked to hold about this many cells' non-zeros.
    format, overwrite
        As in :func:`~flashmm_dask.io.anndata_store.write_store`.

    Returns
    -------
    pathlib.Path
        The store written; it appears only once complete.
    """
    # the keywords are bound as the signature below shows them (a wrong name is the
    # TypeError Python raises), and checked by simulate_rnaseq's _validate
    try:
        bound = _STORE_SIGNATURE.bind(path, n_genes, n_cells, **options)
    except TypeError as exc:  # "got an unexpected keyword argument 'x'"
        raise TypeError(f"simulate_to_store() {exc}") from None
    bound.apply_defaults()
    args = bound.arguments
    target = Path(path)
    fmt = store_format(target, args["format"])
    params = _validate(args)
    chunk_cells = _check_positive_int("chunk_cells", args["chunk_cells"])
    store_chunk_cells = _check_positive_int("store_chunk_cells", args["store_chunk_cells"])
    n_threads = args["n_threads"]

    def content() -> tuple[ad.AnnData, Iterator[sp.csr_matrix]]:
        model = _build_model(params, n_threads)
        chunks = _iter_chunks(model, chunk_cells, n_threads)  # drawn while meta is written
        return ad.AnnData(obs=model.obs, var=model.var, uns=model.uns), chunks

    write_streamed(target, fmt, content, chunk_cells=store_chunk_cells, overwrite=args["overwrite"])
    logger.info("simulated %d cells x %d genes into %s", params.n_cells, params.n_genes, target)
    return target


def _store_signature() -> inspect.Signature:
    """simulate_to_store's full signature, shown by help(), IDEs and inspect.signature:
    a path, then simulate_rnaseq's parameters (written once, there) with the store's
    keywords: store_chunk_cells after chunk_cells, format and overwrite after dtype."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    store_keywords = {
        "chunk_cells": [
            inspect.Parameter("store_chunk_cells", keyword, default=10_000, annotation="int")
        ],
        "dtype": [
            inspect.Parameter("format", keyword, default=None, annotation="StoreFormat | None"),
            inspect.Parameter("overwrite", keyword, default=False, annotation="bool"),
        ],
    }
    path = inspect.Parameter(
        "path", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str | os.PathLike[str]"
    )
    parameters = [path]
    for parameter in inspect.signature(simulate_rnaseq).parameters.values():
        parameters += [parameter, *store_keywords.get(parameter.name, [])]
    return inspect.Signature(parameters, return_annotation="Path")


_STORE_SIGNATURE = _store_signature()
simulate_to_store.__signature__ = _STORE_SIGNATURE  # type: ignore[attr-defined]


# ------------------------------------------------------------------ validation and model


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _gene_vector(name: str, value: Any, n_genes: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n_genes, float(arr))
    if arr.shape != (n_genes,):
        raise InputError(
            f"{name} must be a scalar or have n_genes={n_genes} entries, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise InputError(
            f"{name} must be finite and > 0 for every gene; "
            f"{int(np.sum(~(np.isfinite(arr) & (arr > 0))))} entries are not"
        )
    return arr


def _validate(args: Mapping[str, Any]) -> _Params:
    """The model's arguments (the fields of :class:`_Params`, taken by name from ``args``:
    the caller's ``locals()``) checked, with the seed drawn when None."""
    counts = ("n_genes", "n_cells", "n_celltypes", "n_treatments", "n_samples")
    checked: dict[str, Any] = {name: _check_positive_int(name, args[name]) for name in counts}
    n_genes, n_treatments = checked["n_genes"], checked["n_treatments"]
    if n_treatments > len(string.ascii_uppercase):
        raise InputError(f"n_treatments must be <= 26 (labels A..Z), got {n_treatments}")
    if checked["n_samples"] < n_treatments:
        raise InputError(
            f"n_samples={checked['n_samples']} is less than n_treatments={n_treatments}; "
            "subjects are nested in treatments, so each needs one"
        )
    n_de_genes = args["n_de_genes"]
    if n_de_genes is None:
        n_de_genes = min(checked["n_celltypes"], n_genes)
    checked["n_de_genes"] = _check_positive_int("n_de_genes", n_de_genes, minimum=0)
    if checked["n_de_genes"] > n_genes:
        raise InputError(
            f"n_de_genes={checked['n_de_genes']} exceeds n_genes={n_genes}; "
            "lower n_de_genes or raise n_genes"
        )
    checked.update(_checked_betas(args["minbeta"], args["maxbeta"], args["direction"]))
    var_randomeffects = float(args["var_randomeffects"])
    if not (math.isfinite(var_randomeffects) and var_randomeffects >= 0):
        raise InputError(f"var_randomeffects must be finite and >= 0, got {var_randomeffects}")
    seed = args["seed"]
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
    try:
        np_dtype = np.dtype(args["dtype"])
    except TypeError as exc:
        raise InputError(f"dtype {args['dtype']!r} is not a numpy dtype; use e.g. 'int32'") from exc
    if np_dtype.kind not in "iuf":
        raise InputError(f"dtype must be an integer or floating dtype for counts, got {np_dtype}")
    checked.update(
        var_randomeffects=var_randomeffects,
        gene_mean=_gene_vector("gene_mean", args["gene_mean"], n_genes),
        dispersion=_gene_vector("dispersion", args["dispersion"], n_genes),
        seed=_check_positive_int("seed", seed, minimum=0),
        dtype=np_dtype,
    )
    return _Params(**checked)


def _checked_betas(minbeta: Any, maxbeta: Any, direction: Any) -> dict[str, Any]:
    """The DE effects' bounds and direction, checked against each other."""
    minbeta, maxbeta = float(minbeta), float(maxbeta)
    if not (math.isfinite(minbeta) and math.isfinite(maxbeta) and minbeta < maxbeta):
        raise InputError(f"need finite minbeta < maxbeta, got {minbeta} and {maxbeta}")
    rule = {"both": minbeta * maxbeta > 0, "up": minbeta > 0, "down": maxbeta < 0}
    if direction not in rule:
        raise InputError(f"direction must be 'both', 'up' or 'down', got {direction!r}")
    if not rule[direction]:
        need = {"both": "minbeta * maxbeta > 0", "up": "minbeta > 0", "down": "maxbeta < 0"}
        raise InputError(
            f"direction={direction!r} needs {need[direction]}; "
            f"got minbeta={minbeta}, maxbeta={maxbeta}"
        )
    return {"minbeta": minbeta, "maxbeta": maxbeta, "direction": direction}


def _sorted_levels(labels: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observed labels[codes] as sorted levels (R's factor()), and each entry's level."""
    observed = np.unique(codes)
    order = np.argsort(labels[observed], kind="stable")
    lookup = np.full(len(labels), -1, dtype=np.int64)
    lookup[observed[order]] = np.arange(len(observed))
    return labels[observed[order]], lookup[codes]


def _build_model(params: _Params, n_threads: int) -> _Model:
    """Draw everything but the counts: genes, cells, DE genes, random effects, libsizes."""
    _check_positive_int("n_threads", n_threads)
    seeds = np.random.SeedSequence(params.seed).spawn(len(_STREAMS))
    streams = dict(zip(_STREAMS, seeds, strict=True))

    def rng(name: str) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(streams[name]))

    n, m = params.n_cells, params.n_genes
    genes = rng("genes")
    # both defaults are always drawn, so that one does not depend on the other being given
    mu, phi = 1.0 + genes.poisson(1.0, m), 1.0 + genes.poisson(1.0, m)
    mu = mu if params.gene_mean is None else params.gene_mean
    phi = phi if params.dispersion is None else params.dispersion

    cells = _draw_cells(rng("metadata"), params)
    trt_levels, trt_code = cells["trt"]
    cls_levels, cls_code = cells["cls"]
    sam_levels, sam_code = cells["sam"]
    treated = len(trt_levels) - 1
    n_cls = len(cls_levels)
    de_genes, de_cls, beta_de = _draw_de(rng("de"), params, n_cls)
    de_effect = np.zeros((n_cls + 1, m))
    de_effect[de_cls, de_genes] = beta_de
    sd = math.sqrt(params.var_randomeffects)
    random_effects = rng("random_effects").normal(0.0, sd, size=(len(sam_levels), m))

    libsize = draw_libsize(streams["libsize"], n, mu, phi, n_threads)
    log_lib = np.log(libsize)
    log_lib_mean = float(log_lib.mean())
    base = np.exp(np.log(mu)[None, :] + random_effects)
    effect = np.exp(de_effect)

    obs = pd.DataFrame(
        {
            "sam": pd.Categorical.from_codes(sam_code, categories=list(sam_levels)),
            "cls": pd.Categorical.from_codes(cls_code, categories=list(cls_levels)),
            "trt": pd.Categorical.from_codes(trt_code, categories=list(trt_levels)),
            "libsize": libsize,
        },
        index=pd.Index([f"cell{i + 1}" for i in range(n)], dtype=object),
    )
    de_codes = np.full(m, -1)
    de_codes[de_genes] = de_cls
    beta = np.zeros(m)
    beta[de_genes] = beta_de
    var = pd.DataFrame(
        {
            "de": de_codes >= 0,
            "de_celltype": pd.Categorical.from_codes(de_codes, categories=list(cls_levels)),
            "beta": beta,
            "gene_mean": mu,
            "dispersion": phi,
        },
        index=pd.Index([f"gene{j + 1}" for j in range(m)], dtype=object),
    )
    arguments = {k: v for k, v in vars(params).items() if k not in _PER_GENE_ARGUMENTS}
    simulation = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model": "simuRNAseq (R FLASHMM 1.3.0): negative binomial counts",
        **arguments,
        "dtype": params.dtype.name,
        "rng_block_cells": RNG_BLOCK_CELLS,
        "treatment": str(trt_levels[treated]),
        "samples_per_treatment": cells["per_trt"],
        "subjects": np.asarray(sam_levels, dtype=str),
        "random_effects": random_effects,
        "log_libsize_mean": log_lib_mean,
    }
    return _Model(
        obs=obs,
        var=var,
        uns={"simulation": simulation},
        effect=effect,
        varies=(effect != 1.0).any(axis=0),
        buckets=gene_buckets(base, effect.max(axis=0)),
        dispersion=phi,
        subject_code=sam_code,
        effect_code=np.where(trt_code == treated, cls_code, n_cls),
        lib=np.exp(log_lib - log_lib_mean),
        counts_seed=streams["counts"],
        dtype=params.dtype,
    )


def _draw_cells(rng: np.random.Generator, params: _Params) -> dict[str, Any]:
    """Each cell's treatment, cell type and subject, as (sorted levels, codes) pairs."""
    n, n_trt = params.n_cells, params.n_treatments
    trt_raw = rng.integers(n_trt, size=n)
    cls_raw = rng.integers(params.n_celltypes, size=n)
    per_trt = 1 + rng.multinomial(params.n_samples - n_trt, np.full(n_trt, 1.0 / n_trt))
    first_subject = np.concatenate([[0], np.cumsum(per_trt)[:-1]])
    sam_raw = first_subject[trt_raw] + rng.integers(per_trt[trt_raw])
    letters = np.array(list(string.ascii_uppercase[:n_trt]), dtype=object)
    subjects = [f"{letters[t]}{j + 1}" for t in range(n_trt) for j in range(per_trt[t])]
    cls_labels = [str(k + 1) for k in range(params.n_celltypes)]
    return {
        "trt": _sorted_levels(letters, trt_raw),
        "cls": _sorted_levels(np.array(cls_labels, dtype=object), cls_raw),
        "sam": _sorted_levels(np.array(subjects, dtype=object), sam_raw),
        "per_trt": per_trt.astype(np.int64),
    }


def _draw_de(
    rng: np.random.Generator, params: _Params, n_cls: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DE genes (the last n_de_genes), their cell-type codes (sorted order) and betas."""
    n_de = params.n_de_genes
    per_cls = rng.multinomial(n_de, np.full(n_cls, 1.0 / n_cls))
    beta = rng.uniform(params.minbeta, params.maxbeta, n_de)
    if params.direction == "both":
        beta *= 2 * rng.binomial(1, 0.5, n_de) - 1
    genes = np.arange(params.n_genes - n_de, params.n_genes)
    return genes, np.repeat(np.arange(n_cls), per_cls), beta
