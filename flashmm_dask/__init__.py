"""flashmm_dask: FLASH-MM linear mixed models for single-cell data on Dask and Zarr.

The public API is re-exported here; see the README for a tour.
"""

from flashmm_dask.contrasts import contrast_matrix
from flashmm_dask.design import Design, build_design
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
from flashmm_dask.fit import LmmFit
from flashmm_dask.fitting import flashmm, lmm_stats, lmmfit, sslmm
from flashmm_dask.io.anndata_results import write_results
from flashmm_dask.io.anndata_store import write_store
from flashmm_dask.io.readers import Expression, read_expression, read_obs
from flashmm_dask.lmm import lmm
from flashmm_dask.lmmtest import lmmtest
from flashmm_dask.lrt import lrt_fixed, vctest
from flashmm_dask.numerics.inference import p_adjust
from flashmm_dask.reduce import TRANSFORMS, reduce_stats, stats_graph
from flashmm_dask.resultsets import top_table
from flashmm_dask.simulate import simulate_rnaseq, simulate_to_store
from flashmm_dask.stats import SummaryStats
from flashmm_dask.strata import plan_strata, select_obs
from flashmm_dask.strata_stats import StratifiedStats, load_stats

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
