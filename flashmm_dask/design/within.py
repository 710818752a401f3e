"""Fixed effects that vary within the levels of a random component without a random slope.

With donors as the random component, an effect that varies within donors (a condition
every donor was observed in, a cell type) is tested against the cells of each donor as
replicates of that effect. Where the effect itself differs between donors (a
donor-by-condition variance), those cells are not independent replicates of it and its
test is anti-conservative: in the package's calibration of a paired design (every donor in
both conditions, 6 or 10 donors) the null false-positive rate at 0.05 was 0.18 with random
``~ 0 + donor`` alone and 0.044 with ``["~ 0 + donor", "~ 0 + donor:cond"]``; lme4 with
``(1 | donor)`` gives the same and does not warn. :func:`within_level_effects` names, from
the cross-products alone, the indicator (0/1) fixed-effect columns that vary within the
levels of an indicator random component while no random component is constant where they
are (none holds their interaction with it), and :func:`warn_within_level_effects` logs one
warning naming them.

For a 0/1 column x and an indicator component k with level counts c_l = (Z_k'Z_k)_ll and
sums s_l = (Z_k'X)_lx, x varies within the levels of k when x'x - sum_l s_l^2 / c_l > 0
(the residual of x projected on the columns of Z_k). x is 0/1 when x'x = 1'x = sum_l s_l.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from flashmm_dask.numerics.structured import _is_diagonal

__all__ = ["warn_within_level_effects", "within_level_effects"]

logger = logging.getLogger(__name__)

#: Relative residual below which a column counts as constant within a component's levels.
WITHIN_RTOL = 1e-9


def _indicator_blocks(ZZ: np.ndarray, d: Sequence[int]) -> list[tuple[slice, np.ndarray] | None]:
    """Per component, its slice and level counts where it is an indicator (diagonal block,
    every cell in exactly one level: counts sum to the cells of the component)."""
    out: list[tuple[slice, np.ndarray] | None] = []
    start = 0
    for size in d:
        s = slice(start, start + int(size))
        start += int(size)
        block = ZZ[s, s]
        counts = np.diag(block)
        diagonal = _is_diagonal(block)  # one pass, no copy of the block
        integral = np.allclose(counts, np.round(counts)) and (counts >= 0).all()
        out.append((s, counts) if diagonal and integral and counts.sum() > 0 else None)
    return out


def within_level_effects(
    XX: ArrayLike,
    ZX: ArrayLike,
    ZZ: ArrayLike,
    d: Sequence[int],
    n: int,
    covariates: Sequence[str],
    components: Sequence[str],
) -> dict[str, list[str]]:
    """Component name -> the 0/1 fixed-effect columns that vary within its levels, with two
    cells or more of value 1 in some level (otherwise their interaction with it is the
    residual), while no indicator random component is constant where they are.
    Components that are not indicators of a factor covering every cell are not judged."""
    XX = np.asarray(XX, dtype=np.float64)
    ZX = np.asarray(ZX, dtype=np.float64)
    ZZ = np.asarray(ZZ, dtype=np.float64)
    blocks = _indicator_blocks(ZZ, d)
    xx = np.diag(XX)
    # per indicator component: x'x - sum_l s_l^2 / c_l of every column
    residual: list[np.ndarray | None] = []
    # and whether some level holds two cells or more of the column's value 1 beside others:
    # with one cell per level and value (a classical split plot) the interaction is the
    # residual itself, and nothing is missing from the model
    replicated: list[np.ndarray | None] = []
    for b in blocks:
        if b is None or not np.isclose(b[1].sum(), n):
            residual.append(None)
            replicated.append(None)
            continue
        s, counts = b
        sums = ZX[s]
        with np.errstate(invalid="ignore", divide="ignore"):
            explained = np.where(counts[:, None] > 0, sums**2 / counts[:, None], 0.0).sum(axis=0)
        residual.append(xx - explained)
        replicated.append(((sums >= 1.5) & (counts[:, None] - sums >= 0.5)).any(axis=0))
    # 0/1 columns: x'x equals the sum of x (read off any component covering every cell)
    covering = [b for b, r in zip(blocks, residual, strict=True) if r is not None]
    totals = ZX[covering[0][0]].sum(axis=0) if covering else None  # type: ignore[index]
    if totals is None:
        return {}
    scale = np.maximum(xx, 1.0)
    binary = np.isclose(xx, totals, rtol=1e-12, atol=1e-9) & (xx > 0) & (xx < n)
    within: dict[str, list[str]] = {}
    spanned = np.zeros(len(xx), dtype=bool)  # constant within the levels of some component
    for r in residual:
        if r is not None:
            spanned |= r <= WITHIN_RTOL * scale
    for name, r, rep in zip(components, residual, replicated, strict=True):
        if r is None or rep is None:
            continue
        varies = binary & (r > WITHIN_RTOL * scale) & ~spanned & rep
        if varies.any():
            within[str(name)] = [str(covariates[int(j)]) for j in np.flatnonzero(varies)]
    return within


def warn_within_level_effects(
    XX: ArrayLike,
    ZX: ArrayLike,
    ZZ: ArrayLike,
    d: Sequence[int],
    n: int,
    covariates: Sequence[str],
    components: Sequence[str],
    where: str = "",
) -> dict[str, list[str]]:
    """:func:`within_level_effects`, and one logged warning naming them (if any)."""
    found = within_level_effects(XX, ZX, ZZ, d, n, covariates, components)
    if found:
        shown = "; ".join(
            f"{', '.join(repr(c) for c in cols[:6])}{' and more' if len(cols) > 6 else ''} "
            f"within the levels of random component '{name}'"
            for name, cols in found.items()
        )
        logger.warning(
            "fixed effects vary within the levels of a random component that holds no "
            "interaction with them%s: %s. Their tests take the cells of each level as "
            "independent replicates of the effect; if the effect may differ between those "
            "levels (a donor-by-condition variance), add a random component of the "
            "interaction, e.g. random: ['~ 0 + donor', '~ 0 + donor:condition'] (a paired "
            "design's null false-positive rate at 0.05 was 0.18 without it and 0.044 with "
            "it), or fit each level of the effect's factor apart (model.by)",
            f" ({where})" if where else "",
            shown,
        )
    return found
