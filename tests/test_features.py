"""data.features: names (repeated names keep every column, reported with their positions)
or a boolean var column; the config keys of strata and selection."""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from flashmm_dask import write_store
from flashmm_dask.errors import ConfigError, InputError
from flashmm_dask.run.config import load_config
from flashmm_dask.run.features import duplicated_names, feature_positions

NAMES = ["CD3E", "MS4A1", "CD3E", "LYZ", "GAPDH", "LYZ"]


@pytest.fixture
def adata():
    var = pd.DataFrame(
        {"highly_variable": [True, False, True, True, False, False], "score": np.arange(6.0)},
        index=NAMES,
    )
    obs = pd.DataFrame({"x": np.arange(4.0)}, index=[f"c{i}" for i in range(4)])
    with pytest.warns(UserWarning, match="not unique"):
        return ad.AnnData(X=sp.csr_matrix(np.ones((4, 6))), obs=obs, var=var)


def test_repeated_names_keep_every_column(caplog):
    assert duplicated_names(NAMES) == {"CD3E": [0, 2], "LYZ": [3, 5]}
    with caplog.at_level(logging.WARNING):
        positions = feature_positions(["LYZ", "MS4A1", "LYZ"], NAMES)
    np.testing.assert_array_equal(positions, [1, 3, 5])
    assert "'LYZ' at positions 3, 5" in caplog.text and "more than once" in caplog.text
    assert feature_positions(None, NAMES) is None


def test_a_column_two_names_select_is_kept_once():
    """A repeated name selects its every column, and one of its unique names (as the
    readers make them, the second 'LYZ' is 'LYZ-1') its one column: that column once."""
    unique = ["CD3E", "MS4A1", "CD3E-1", "LYZ", "GAPDH", "LYZ-1"]
    positions = feature_positions(["LYZ", "LYZ-1", "CD3E-1"], unique, as_read=NAMES)
    np.testing.assert_array_equal(positions, [2, 3, 5])


def test_unknown_names_are_listed():
    with pytest.raises(InputError, match=r"2 features that the data do not have: 'CD4', 'CD8A'"):
        feature_positions(["CD4", "CD3E", "CD8A"], NAMES)


def test_var_column_in_memory_and_in_stores(adata, tmp_path):
    spec = {"var_column": "highly_variable"}
    np.testing.assert_array_equal(feature_positions(spec, NAMES, data=adata), [0, 2, 3])
    for suffix in (".zarr", ".h5ad"):
        path = write_store(adata, tmp_path / f"data{suffix}")
        np.testing.assert_array_equal(feature_positions(spec, NAMES, data=str(path)), [0, 2, 3])
        with pytest.raises(InputError, match="'hvg' is not a column of var; var has"):
            feature_positions({"var_column": "hvg"}, NAMES, data=str(path))
    with pytest.raises(InputError, match="not boolean"):
        feature_positions({"var_column": "score"}, NAMES, data=adata)


def test_config_keys():
    cfg = load_config(
        None,
        (
            "data.path=x.zarr",
            "data.features={var_column: highly_variable}",
            "data.cells=n_genes >= 200 and cell_type != 'doublet'",
            "data.drop_missing=true",
            "model.by=cell_type",
            "model.min_cells=10",
        ),
    )
    assert cfg.data.features == {"var_column": "highly_variable"}
    assert cfg.data.cells == "n_genes >= 200 and cell_type != 'doublet'"
    assert cfg.model.by == "cell_type" and cfg.model.min_cells == 10 and cfg.data.drop_missing
    assert load_config(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"data\.features.*var_column"):
        load_config(None, ("data.path=x.zarr", "data.features={column: hv}"))
    with pytest.raises(ConfigError, match=r"model\.min_cells"):
        load_config(None, ("model.min_cells=-1",))
    # unset, the new keys leave the hash of a config as it was
    plain = load_config(None, ())
    assert plain.hash() != load_config(None, ("model.by=cls",)).hash()
    assert plain.hash() == load_config(None, ("model.min_cells=0",)).hash()


def test_auto_blocks_of_strata():
    """With many strata, each of the atlas's strata (11,596 genes, p = 5, q = 259) is one
    block: its task runs where its statistics are and writes once; a plain run still gets a
    few blocks per worker, and the work arrays of a block stay bounded."""
    from flashmm_dask.run.blocks import MAX_AUTO_BLOCK, auto_block_size

    assert auto_block_size(29 * 11_596, 5, 259, 1, 2) >= 11_596
    assert auto_block_size(11_596, 61, 259, 1, 2) == 1_450  # 4 blocks per worker
    assert auto_block_size(10**7, 5, 259, 1, 2) == MAX_AUTO_BLOCK
    # K = 2 at q = 7,770: (6 q^2) doubles per feature, the memory cap decides
    assert auto_block_size(10**5, 30, 7_770, 2, 2) == 16
    # ... unless the fit's own work arrays are O(q) (the structured path)
    assert auto_block_size(11_596, 61, 7_770, 2, 2, work_values=4 * 7_770) == 137


def test_runs_size_blocks_by_the_path_they_fit_on():
    """A run sizes its blocks by the prepared terms: K = 1 by balance alone (1,450 features
    per block at the atlas shape, not the 80 that a q^2 work array would allow); the
    structured path by its O(q) work arrays, the dense K = 2 path by its q^2 ones."""
    from flashmm_dask.numerics.fisher import prepare
    from flashmm_dask.run.blocks import auto_block_size, block_work

    rng = np.random.default_rng(0)
    n, p = 3000, 4
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    donor = rng.integers(0, 40, n)
    state = rng.integers(0, 5, n)
    Z = np.hstack([np.eye(40)[donor], np.eye(200)[donor * 5 + state]])
    for d, cols, structured in (((40,), slice(0, 40), None), ((40, 200), slice(None), True)):
        Zk = Z[:, cols]
        terms = prepare(X.T @ X, Zk.T @ X, Zk.T @ Zk, n, np.array(d), "REML", structured=structured)
        work = block_work(terms)
        if len(d) == 1:
            assert work is None
            assert auto_block_size(11_596, 61, 259, 1, 2, work) == 1_450
        else:
            assert terms.path == "structured" and work == terms.work_values < 240 * 240
