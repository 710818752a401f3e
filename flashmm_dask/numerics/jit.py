"""The one way the package compiles a loop with numba.

Every kernel (the fitter's in :mod:`.compiled`, the NB draws in :mod:`.nb_sparse`, the
block products in :mod:`flashmm_dask.stats.products`) is compiled here: lazily, on its
first call, and cached on disk where a cache folder is writable, so that a new process
(a Dask worker) loads the machine code instead of compiling it again. Each caller passes
its own numba options: they decide what is computed (IEEE division, fused multiply-adds,
reassociated sums), so they stay with the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba

__all__ = ["jit"]


def jit(fn: Callable[..., Any], **options: Any) -> Any:
    """``fn`` compiled by ``numba.njit(**options)``, cached on disk where possible.

    Parameters
    ----------
    fn : callable
        A function numba can compile in nopython mode.
    **options
        numba.njit options other than ``cache`` (e.g. ``nogil=True``,
        ``error_model="numpy"``, ``fastmath={"contract"}``).

    Returns
    -------
    numba dispatcher
        Compiles on its first call with each new signature of argument types.
    """
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache folder
        return numba.njit(cache=False, **options)(fn)
