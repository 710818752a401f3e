"""flashmm_dask: FLASH-MM linear mixed models for single-cell data on Dask and Zarr.

The public API is re-exported here; see the README for a tour.
"""

from flashmm_dask.contrasts import contrast_matrix
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
from flashmm_dask.lmm import lmm
from flashmm_dask.lmmtest import lmmtest

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ContrastError",
    "ConvergenceWarning",
    "DataError",
    "DesignError",
    "FlashmmError",
    "FlashmmWarning",
    "InputError",
    "LmmFit",
    "StoreError",
    "ZeroFeatureWarning",
    "__version__",
    "contrast_matrix",
    "lmm",
    "lmmtest",
]
