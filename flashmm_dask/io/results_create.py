"""Several new local results stores created at once: a stratified run's groups.

:func:`~flashmm_dask.io.results.create_results` writes 26 arrays' metadata, five
coordinates and the consolidated metadata of a store: 55 ms alone, three times that in a
task on a busy Dask worker, and a stratified run creates one store per stratum (29 cell
states: 4-6 s of the workers' time). The strata's stores differ only in their root
attributes when their layouts are equal (the same features, coefficients, components,
contrasts and block size, as they are for every stratum of most designs). Here the
arrays of each distinct layout are created once, in a hidden template folder without
attributes, and each store is a copy of its template's folder, staged into place after
its attributes are written: the files of ``create_results(path, layout, attrs)``, byte
for byte, in a few milliseconds each.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zarr

from flashmm_dask.errors import StoreError
from flashmm_dask.io.results import full_attrs
from flashmm_dask.io.results_attrs import _default_versions
from flashmm_dask.io.results_layout import ResultsLayout
from flashmm_dask.io.writing import staged
from flashmm_dask.io.zarr_batch import create_arrays

__all__ = ["create_many"]

logger = logging.getLogger(__name__)


def create_many(
    stores: Sequence[tuple[str | os.PathLike[str], ResultsLayout, Mapping[str, Any]]],
    *,
    threads: int = 4,
) -> None:
    """``create_results(path, layout, attrs)`` for each new local store of ``stores``.

    The stores of one layout are copies of one template (see the module docstring),
    made in ``threads`` threads.

    Raises
    ------
    StoreError
        Something is at one of the paths (nothing is replaced here), or a store cannot
        be written (those created before stay).
    """
    if not stores:
        return
    for path, _, _ in stores:
        if os.path.lexists(path):
            raise StoreError(
                f"{os.fspath(path)!r} already exists; choose another output path, or "
                "overwrite it (--overwrite) to replace it"
            )
    versions = _default_versions()  # read once (package metadata)
    full = [full_attrs(layout, attrs, versions) for _, layout, attrs in stores]
    first = Path(stores[0][0])
    first.parent.mkdir(parents=True, exist_ok=True)
    templates: dict[ResultsLayout, Path] = {}
    try:
        for _, layout, _ in stores:
            if layout not in templates:
                folder = first.parent / f".{first.name}.template-{uuid.uuid4().hex[:12]}"
                create_arrays(
                    zarr.open_group(store=str(folder), mode="w-", zarr_format=3), layout, None
                )
                templates[layout] = folder

        def copy(index: int) -> None:
            path, layout, _ = stores[index]
            with staged(Path(path), overwrite=False) as tmp:
                shutil.copytree(templates[layout], tmp)
                root = zarr.open_group(store=str(tmp), mode="r+")
                root.update_attributes(full[index])  # the attributes last, as create_results

        with ThreadPoolExecutor(max(1, min(threads, len(stores)))) as pool:
            list(pool.map(copy, range(len(stores))))
    except OSError as exc:
        raise StoreError(
            f"cannot create the results stores under {str(first.parent)!r}: {exc}"
        ) from exc
    finally:
        for folder in templates.values():
            shutil.rmtree(folder, ignore_errors=True)
    logger.info(
        "created %d results stores (%d layouts) under %s", len(stores), len(templates), first.parent
    )
