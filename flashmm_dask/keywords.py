"""Keyword arguments checked before any work: a misspelled one is named at once.

:func:`flashmm_dask.flashmm` and :func:`flashmm_dask.lmmfit` pass ``**kwargs`` on to
:func:`flashmm_dask.lmm` after the data are read; a typo there (``layers="counts"``)
would otherwise surface only after the whole reduction.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from flashmm_dask.errors import InputError

__all__ = ["check_keywords", "keyword_names"]


def keyword_names(func: Callable[..., Any]) -> list[str]:
    """The names ``func`` accepts as keywords (no ``*args``/``**kwargs`` catch-alls)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(func).parameters.values() if p.kind in kinds]


def check_keywords(where: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Refuse keywords not in ``valid``, suggesting the closest valid one.

    Parameters
    ----------
    where : the function's name, for the message
    given : the keywords passed
    valid : the keywords accepted

    Raises
    ------
    InputError
        ``flashmm() got an unexpected keyword 'layers' (did you mean 'layer'?); valid
        keywords: ...``
    """
    allowed = list(dict.fromkeys(valid))
    unknown = [k for k in given if k not in allowed]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    noun = "keyword" if len(unknown) == 1 else "keywords"
    raise InputError(
        f"{where}() got an unexpected {noun} {', '.join(parts)}; valid keywords: "
        f"{', '.join(sorted(allowed))}"
    )
