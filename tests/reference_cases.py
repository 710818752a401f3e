"""Loading of the R FLASHMM 1.3.0 reference cases in tests/reference/ (see its README)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

REFERENCE = Path(__file__).parent / "reference"
CASES = ("doc_example_reml", "doc_example_ml", "simu_reml_k1", "simu_ml_k1", "simu_reml_k2")
SIMU_CASES = ("simu_reml_k1", "simu_ml_k1", "simu_reml_k2")


def as_array(x) -> np.ndarray:
    """JSON nested lists (R's NA as null) -> float64 array with NaN."""
    return np.array(x, dtype=np.float64)


@cache
def load_case(name: str) -> dict:
    with open(REFERENCE / f"{name}.json") as fh:
        return json.load(fh)


def summary_args(case: dict, labelled: bool = True) -> dict:
    """The summary statistics of a case as keyword arguments of lmm().

    With ``labelled`` the matrices are DataFrames carrying R's names (covariates, random
    effect columns, features); otherwise plain arrays.
    """
    s = case["summary"]
    if labelled:
        cov, ran, feat = s["covariates"], s["random"], s["features"]
        return {
            "XX": pd.DataFrame(as_array(s["XX"]), index=cov, columns=cov),
            "XY": pd.DataFrame(as_array(s["XY"]), index=cov, columns=feat),
            "ZX": pd.DataFrame(as_array(s["ZX"]), index=ran, columns=cov),
            "ZY": pd.DataFrame(as_array(s["ZY"]), index=ran, columns=feat),
            "ZZ": pd.DataFrame(as_array(s["ZZ"]), index=ran, columns=ran),
            "Ynorm": pd.Series(as_array(s["Ynorm"]), index=feat),
            "n": s["n"],
            "d": list(np.atleast_1d(s["d"])),
        }
    return {
        "XX": as_array(s["XX"]),
        "XY": as_array(s["XY"]),
        "ZX": as_array(s["ZX"]),
        "ZY": as_array(s["ZY"]),
        "ZZ": as_array(s["ZZ"]),
        "Ynorm": as_array(s["Ynorm"]),
        "n": s["n"],
        "d": list(np.atleast_1d(s["d"])),
    }
