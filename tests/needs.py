"""What some tests need of the machine, and what happens without it.

Outside CI a test whose need is missing (a Slurm installation, root to mount a tmpfs, an
optional package, two CPUs) is skipped with the reason. ``FLASHMM_NO_SKIP=1``, which
``.ci/run`` sets, turns every such skip into a failure: in CI everything must run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

NO_SKIP = "FLASHMM_NO_SKIP"


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it when :data:`NO_SKIP` is set."""
    if os.environ.get(NO_SKIP, "") not in ("", "0"):
        pytest.fail(f"{NO_SKIP} is set, so this test may not skip, but {reason}")
    pytest.skip(reason)


def module(name: str, install: str = "pip install -e '.[test]'") -> ModuleType:
    """Import ``name``, or :func:`missing` with how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed ({install})")
