"""Exception and warning classes of flashmm_dask.

Every error a user can cause derives from :class:`FlashmmError`, so that the command
line can print one clear line for it instead of a traceback. Each error message says
what was wrong, where, and what to do about it.
"""

from __future__ import annotations


class FlashmmError(Exception):
    """Base class of every error flashmm_dask raises on purpose."""


class InputError(FlashmmError, ValueError):
    """Input of the wrong shape, type or value (arrays, arguments, names)."""


class DesignError(InputError):
    """A design that cannot be fitted: rank-deficient X, unknown formula columns, bad d."""


class ContrastError(InputError):
    """A contrast string that cannot be parsed or names an unknown coefficient."""


class DataError(InputError):
    """Expression data that cannot be used: NaN/Inf, negative counts, wrong store."""


class ConfigError(InputError):
    """A run configuration that is malformed or inconsistent."""


class StoreError(FlashmmError):
    """A results or statistics store that is missing, incomplete, locked or incompatible."""


class FlashmmWarning(UserWarning):
    """Base class of the warnings flashmm_dask emits."""


class ZeroFeatureWarning(FlashmmWarning):
    """Some features are all zero (Ynorm <= 0) and were not fitted."""


class ConvergenceWarning(FlashmmWarning):
    """Some features did not converge within max_iter iterations."""


class DuplicateFeatureWarning(FlashmmWarning):
    """Some feature names are duplicated; they were made unique as anndata does."""
