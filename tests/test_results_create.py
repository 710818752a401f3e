"""Results stores created at once (create_many) and the batched creation of a store's
arrays: the same files as create_results writes, byte for byte, and stores that read
back, take blocks and finalize as create_results' do."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from flashmm_dask.errors import StoreError
from flashmm_dask.io.results import (
    ResultsLayout,
    blocks_done,
    create_results,
    finalize_results,
    open_results,
    write_block,
)
from flashmm_dask.io.results_create import create_many
from flashmm_dask.io.results_layout import _COORDS, _VARS
from flashmm_dask.model.status import STATUS

ATTRS: dict[str, Any] = {
    "method": "REML",
    "fixed": "~ x",
    "n_cells": 100,
    "created": "2026-01-01T00:00:00+00:00",  # fixed, so that two creations are equal
}


def _layout(p: int = 3, contrasts: tuple[str, ...] = ("c1",), block_size: int = 4) -> ResultsLayout:
    return ResultsLayout(
        features=tuple(f"g{i}" for i in range(10)),
        covariates=tuple(f"x{i}" for i in range(p)),
        components=("sample", "residual"),
        contrasts=contrasts,
        block_size=block_size,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _sync_create(path: Path, layout: ResultsLayout, attrs: dict[str, Any]) -> None:
    """The store create_results wrote before its arrays were created in one call: one
    synchronous Zarr call per array (the reference for the batched creation)."""
    from flashmm_dask.io.results import full_attrs
    from flashmm_dask.io.zarr_batch import compressors

    group = zarr.open_group(store=str(path), mode="w-", zarr_format=3)
    sizes = layout.dim_sizes()
    names = {
        "feature": layout.features,
        "covariate": layout.covariates,
        "covariate2": layout.covariates,
        "component": layout.components,
        "contrast": layout.contrasts,
    }
    for dim in _COORDS:
        coord = group.create_array(
            dim,
            shape=(sizes[dim],),
            dtype=str,
            chunks=(max(1, sizes[dim]),),
            fill_value="",
            dimension_names=(dim,),
        )
        if sizes[dim]:
            coord[:] = np.array(names[dim], dtype=object)
    fill = {"bool": False, "int8": -1}
    for name in layout.variables():
        var = _VARS[name]
        dims = ("feature", *var.dims)
        shape = tuple(sizes[d] for d in dims)
        attributes: dict[str, Any] = {"description": var.description}
        if name == "status":
            attributes.update(flag_values=list(range(len(STATUS))), flag_meanings=" ".join(STATUS))
        group.create_array(
            name,
            shape=shape,
            dtype=var.dtype,
            chunks=(layout.block_size, *(max(1, s) for s in shape[1:])),
            fill_value=fill.get(var.dtype, np.nan),
            compressors=compressors(),
            dimension_names=dims,
            attributes=attributes,
        )
    group.create_array(
        "block_done",
        shape=(layout.n_blocks,),
        dtype="bool",
        chunks=(1,),
        fill_value=False,
        dimension_names=("block",),
        attributes={"description": "whether the block's features have been written"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(group.store, zarr_format=3)
    zarr.open_group(store=group.store, mode="r+").update_attributes(full_attrs(layout, attrs))


@pytest.mark.parametrize("contrasts", [("c1",), ()])
def test_create_results_writes_the_files_of_one_call_per_array(
    tmp_path: Path, contrasts: tuple[str, ...]
) -> None:
    layout = _layout(contrasts=contrasts)
    create_results(tmp_path / "batched.zarr", layout, ATTRS)
    _sync_create(tmp_path / "reference.zarr", layout, ATTRS)
    assert _files(tmp_path / "batched.zarr") == _files(tmp_path / "reference.zarr")


def test_create_many_writes_the_files_of_create_results(tmp_path: Path) -> None:
    layouts = [_layout(), _layout(p=2), _layout(), _layout(contrasts=())]
    stores = [
        (tmp_path / "many" / f"s{i}", layout, {**ATTRS, "stratum": f"level {i}"})
        for i, layout in enumerate(layouts)
    ]
    create_many(stores)
    for i, (path, layout, attrs) in enumerate(stores):
        create_results(tmp_path / "one" / f"s{i}", layout, attrs)
        assert _files(path) == _files(tmp_path / "one" / f"s{i}")
    # the templates are gone: only the stores are there
    assert sorted(os.listdir(tmp_path / "many")) == ["s0", "s1", "s2", "s3"]


def test_stores_created_at_once_take_blocks_and_finalize(tmp_path: Path) -> None:
    layout = _layout()
    paths = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    create_many([(path, layout, ATTRS) for path in paths])
    rng = np.random.default_rng(0)
    for path in paths:
        for b in range(layout.n_blocks):
            nb = len(range(10)[layout.block_slice(b)])
            arrays: dict[str, np.ndarray] = {
                name: rng.normal(size=(nb, 3)) for name in ("coef", "se", "t", "df")
            }
            arrays["p"] = rng.uniform(size=(nb, 3))
            for name in ("theta", "se_theta", "dlogL"):
                arrays[name] = rng.uniform(size=(nb, 2))
            arrays.update(
                logLik=rng.normal(size=nb),
                niter=np.full(nb, 3.0),
                converged=np.ones(nb, dtype=bool),
                cov=np.broadcast_to(np.eye(3), (nb, 3, 3)).copy(),
            )
            for name in ("contrast_coef", "contrast_se", "contrast_t", "contrast_df"):
                arrays[name] = rng.normal(size=(nb, 1))
            arrays["contrast_p"] = rng.uniform(size=(nb, 1))
            write_block(path, b, arrays)
        assert blocks_done(path).all()
        finalize_results(path)
        ds = open_results(path)
        assert ds.attrs["n_cells"] == 100 and ds.attrs["complete"]
        assert list(ds["feature"].values) == list(layout.features)
        assert np.isfinite(ds["padj"].values).all()


def test_create_many_refuses_an_existing_path(tmp_path: Path) -> None:
    layout = _layout()
    (tmp_path / "taken").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        create_many([(tmp_path / "free", layout, ATTRS), (tmp_path / "taken", layout, ATTRS)])
    assert sorted(os.listdir(tmp_path)) == ["taken"]
