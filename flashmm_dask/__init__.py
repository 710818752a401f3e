"""flashmm_dask: FLASH-MM linear mixed models for single-cell data on Dask and Zarr.

The public API is re-exported here; see the README for a tour.
"""

from flashmm_dask.api import flashmm, lmm_stats, lmmfit, sslmm
from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.design.formula import Design, build_design
from flashmm_dask.design.strata import plan_strata, select_obs
from flashmm_dask.errors import (
    ConfigError,
    ContrastError,
    ConvergenceWarning,
    DataError,
    DesignError,
    FlashmmError,
    FlashmmWarning,
    InputError,
    StoreError,
    ZeroFeatureWarning,
)
from flashmm_dask.io.anndata_results import write_results
from flashmm_dask.io.anndata_store import write_store
from flashmm_dask.io.readers import Expression, read_expression, read_obs
from flashmm_dask.io.resultsets import top_table
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.lmm import lmm
from flashmm_dask.model.lmmtest import lmmtest
from flashmm_dask.model.lrt import lrt_fixed, vctest
from flashmm_dask.numerics.inference import p_adjust
from flashmm_dask.simulate import simulate_rnaseq, simulate_to_store
from flashmm_dask.stats.reduce import TRANSFORMS, reduce_stats, stats_graph
from flashmm_dask.stats.strata import StratifiedStats, load_stats
from flashmm_dask.stats.summary import SummaryStats

__version__ = "0.1.0"

__all__ = [
    "TRANSFORMS",
    "ConfigError",
    "ContrastError",
    "ConvergenceWarning",
    "DataError",
    "Design",
    "DesignError",
    "Expression",
    "FlashmmError",
    "FlashmmWarning",
    "InputError",
    "LmmFit",
    "StoreError",
    "StratifiedStats",
    "SummaryStats",
    "ZeroFeatureWarning",
    "__version__",
    "build_design",
    "contrast_matrix",
    "flashmm",
    "lmm",
    "lmm_stats",
    "lmmfit",
    "lmmtest",
    "load_stats",
    "lrt_fixed",
    "p_adjust",
    "plan_strata",
    "read_expression",
    "read_obs",
    "reduce_stats",
    "select_obs",
    "simulate_rnaseq",
    "simulate_to_store",
    "sslmm",
    "stats_graph",
    "top_table",
    "vctest",
    "write_results",
    "write_store",
]
