"""Loading of the lme4/lmerTest reference cases in tests/reference/lmertest/ (see its README)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from flashmm_dask import SummaryStats

FOLDER = Path(__file__).parent / "reference" / "lmertest"
CASES = ("k1", "k2")


@cache
def load(name: str) -> dict:
    with open(FOLDER / f"{name}.json") as fh:
        return json.load(fh)


def cell_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """X (n, p), Y (m, n), Z (n, q) and the component sizes of a case."""
    cells = load(name)["cells"]
    X = np.array(cells["X"], dtype=np.float64)
    Y = np.array(cells["Y"], dtype=np.float64)
    S = len(cells["sam_levels"])
    Z1 = np.eye(S)[np.array(cells["sam"]) - 1]
    if name == "k2":
        Z = np.hstack([Z1, Z1 * np.array(cells["time"])[:, None]])
        return X, Y, Z, {"sam": S, "time": S}
    return X, Y, Z1, {"sam": S}


@cache
def stats(name: str) -> SummaryStats:
    """The summary statistics of a case's cell-level data, with R's names."""
    case = load(name)
    X, Y, Z, d = cell_arrays(name)
    S = len(case["cells"]["sam_levels"])
    random = [f"{c}{i + 1}" for c in d for i in range(S)]
    return SummaryStats.from_arrays(
        X,
        Y,
        Z,
        d=list(d.values()),
        covariates=case["cells"]["covariates"],
        random=random,
        components=list(d),
        features=case["cells"]["features"],
    )


def ref(name: str, method: str) -> dict:
    return load(name)["fits"][method]


def arr(x) -> np.ndarray:
    return np.array(x, dtype=np.float64)


def interior(name: str, method: str) -> np.ndarray:
    """Features whose lme4 fit is not on the boundary (bool, (m,))."""
    return ~np.array(ref(name, method)["singular"], dtype=bool)
