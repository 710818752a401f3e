"""Chunks added to the strata's running sums in one pass over several (reduce_strata's
pending chunks, for sums larger than a cache): each stratum's statistics still equal
those of its cells reduced alone, every block is read once, a chunk the pass cannot take
is reduced stratum by stratum beside the others, and nothing is left waiting at the end
of a chain."""

import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from dask.sizeof import sizeof
from test_reduce import counting_expr, reads
from test_strata import FIXED, RANDOM, STATS, atlas

import flashmm_dask.stats.reduce_strata as module
from flashmm_dask.design.formula import build_design
from flashmm_dask.design.strata import plan_strata, select_obs
from flashmm_dask.io.readers import read_expression
from flashmm_dask.stats.reduce import reduce_stats
from flashmm_dask.stats.reduce_strata import strata_graph

CHUNK = 150


@pytest.fixture(scope="module")
def data():
    return atlas(n_cells=2000, n_genes=20, seed=7)


@pytest.fixture
def passes(monkeypatch, data):
    """Every chunk waits for a pass over about three (the number of chunks of each pass
    is recorded)."""
    monkeypatch.setattr(module, "_FOLD_ABOVE", 0)
    stored = np.count_nonzero(data.X[:CHUNK].toarray()) * 12  # float64 values, int32 indices
    monkeypatch.setattr(module, "_FOLD_BYTES", 3 * stored)
    sizes: list[int] = []
    compiled = module.strata_products

    def counted(blocks, *args):
        sizes.append(len(blocks))
        return compiled(blocks, *args)

    monkeypatch.setattr(module, "strata_products", counted)
    return sizes


def assert_each_stratum_alone(stats, data, counts, transform, fixed=FIXED, random=RANDOM):
    for level in stats:
        mask = (data.obs["cls"] == level).to_numpy()
        sub = select_obs(data.obs, mask)
        alone = reduce_stats(
            read_expression(counts[mask], obs=sub, chunk_cells=97),
            build_design(sub, fixed, random),
            transform=transform,
        )
        assert stats[level].n == alone.n == mask.sum()
        np.testing.assert_array_equal(stats[level].nnz, np.count_nonzero(counts[mask], axis=0))
        for key in STATS:
            np.testing.assert_allclose(
                getattr(stats[level], key), getattr(alone, key), rtol=1e-12, err_msg=key
            )


@pytest.mark.parametrize("chains", [1, 2])
def test_a_pass_over_several_chunks_equals_each_stratum_alone(data, passes, chains):
    counts = data.X.toarray().astype(float)
    expr = counting_expr(data.obs, counts, (CHUNK, -1), f"fold-{chains}")
    graph = strata_graph(expr, plan_strata(data.obs, FIXED, RANDOM, by="cls"), chains=chains)
    with dask.config.set(scheduler="threads"):
        stats = graph.compute()
    counted = reads(f"fold-{chains}")
    assert len(counted) == expr.data.npartitions and set(counted.values()) == {1}
    # every chunk in exactly one pass, most passes over several
    assert sum(passes) == expr.data.npartitions and max(passes) >= 3
    assert_each_stratum_alone(stats, data, counts, "none")


def test_wide_designs_and_several_random_components(data, passes):
    """Columns of X past those added in the pass over the values (p = 7 > 5), and two
    random components (two entries of Z a cell), each added in a pass of its own."""
    obs = data.obs.copy()
    rng = np.random.default_rng(11)
    obs["age"] = rng.normal(50, 10, len(obs))
    obs["batch"] = pd.Categorical(rng.choice(["b1", "b2", "b3"], len(obs)))
    obs["sex"] = pd.Categorical(rng.choice(["F", "M"], len(obs)))
    obs["plate"] = pd.Categorical(rng.choice([f"p{k}" for k in range(5)], len(obs)))
    fixed = "~ log(libsize) + trt + age + sex + batch"
    random = ["~ 0 + sam", "~ 0 + plate"]
    counts = data.X.toarray().astype(float)
    expr = counting_expr(obs, counts, (CHUNK, -1), "fold-wide")
    strata = plan_strata(obs, fixed, random, by="cls")
    assert all(d.p == 7 and len(d.components) == 2 for d in strata.designs)
    with dask.config.set(scheduler="sync"):
        stats = strata_graph(expr, strata, transform="log2p1", chains=2).compute()
    assert sum(passes) == expr.data.npartitions and max(passes) >= 3
    wide = data.copy()
    wide.obs = obs
    assert_each_stratum_alone(stats, wide, counts, "log2p1", fixed, random)


def test_chunks_off_the_table_are_reduced_beside_the_pass(data, passes):
    counts = data.X.toarray().astype(float)
    rows = slice(2 * CHUNK, 3 * CHUNK)  # the third chunk's values are not counts
    counts[rows] = np.where(counts[rows] > 0, counts[rows] + 0.5, 0.0)
    expr = counting_expr(data.obs, counts, (CHUNK, -1), "fold-mixed")
    graph = strata_graph(expr, plan_strata(data.obs, FIXED, RANDOM, by="cls"), chains=1)
    with dask.config.set(scheduler="sync"):
        stats = graph.compute()
    assert sum(passes) == expr.data.npartitions - 1 and max(passes) >= 3
    assert_each_stratum_alone(stats, data, counts, "none")


def test_pending_chunks_reduced_one_by_one_without_the_compiled_pass(data, monkeypatch):
    """The pending chunks are reduced chunk by chunk, stratum by stratum, when the
    compiled pass is not there (numba missing)."""
    monkeypatch.setattr(module, "_FOLD_ABOVE", 0)
    monkeypatch.setattr(module, "strata_products", lambda *args: False)
    counts = data.X.toarray().astype(float)
    expr = counting_expr(data.obs, counts, (CHUNK, -1), "fold-uncompiled")
    graph = strata_graph(expr, plan_strata(data.obs, FIXED, RANDOM, by="cls"), transform="log2p1")
    with dask.config.set(scheduler="sync"):
        stats = graph.compute()
    assert_each_stratum_alone(stats, data, counts, "log2p1")


def test_running_sums_tell_dask_their_size(data):
    """dask.sizeof of a chain's sums (what the scheduler weighs to keep a chain on the
    worker that holds its sums) counts the sums and the chunks they hold."""
    strata = plan_strata(data.obs, FIXED, RANDOM, by="cls")
    sums = module._Sums(strata, 1000)
    assert sizeof(sums) >= sums.out.nbytes + sums.Yn.nbytes + sums.nnz.nbytes


def test_columns_set_by_the_donor_left_out_of_the_pass_until_a_cell_disagrees(data, monkeypatch):
    """The intercept, the treatment and a donor-level age are left out of the compiled
    pass (their X'E formed from Z'E when the chain ends); age loses its place when a
    later chunk's cells disagree with their donor's age, and every stratum still equals
    its cells reduced alone."""
    monkeypatch.setattr(module, "_FOLD_ABOVE", 0)
    stored = np.count_nonzero(data.X[:CHUNK].toarray()) * 4  # 16-bit indices and codes
    monkeypatch.setattr(module, "_FOLD_BYTES", 3 * stored)
    skipped: list[dict[int, np.ndarray]] = []
    compiled = module.strata_products

    def recorded(blocks, table, parts, *args):
        skipped.append({s: np.asarray(skip) for s, *_, skip in parts})
        return compiled(blocks, table, parts, *args)

    monkeypatch.setattr(module, "strata_products", recorded)
    obs = data.obs.copy()
    donor_age = dict(zip(obs["sam"].cat.categories, np.arange(40.0, 48.0), strict=True))
    age = obs["sam"].map(donor_age).astype(float).to_numpy()
    age[len(age) - 40 :] += 0.5  # the last chunk's cells disagree with their donors
    obs["age"] = age
    fixed = "~ log(libsize) + trt + age"
    counts = data.X.toarray().astype(float)
    expr = counting_expr(obs, counts, (CHUNK, -1), "fold-donor")
    with dask.config.set(scheduler="sync"):
        stats = strata_graph(
            expr, plan_strata(obs, fixed, RANDOM, by="cls"), transform="log2p1", chains=1
        ).compute()
    # columns: intercept, log(libsize), trt, age
    assert all(skip.tolist() == [True, False, True, True] for skip in skipped[0].values())
    assert any(not skip[3] for skip in skipped[-1].values()), "age kept its place"
    aged = data.copy()
    aged.obs = obs
    assert_each_stratum_alone(stats, aged, counts, "log2p1", fixed)


def test_packed_blocks_keep_their_values():
    from flashmm_dask.stats.products import lookup_table
    from flashmm_dask.stats.strata_products import Packed

    rng = np.random.default_rng(3)
    dense = rng.poisson(0.3, (50, 300)).astype(np.int32)
    dense[0, 7] = 65_535
    E = sp.csr_matrix(dense)
    packed = Packed.of(E, lookup_table("none"))
    assert packed.indices.dtype == packed.data.dtype == np.uint16
    assert packed.nbytes == 4 * E.nnz
    back = packed.csr()
    assert back.dtype == E.dtype
    np.testing.assert_array_equal(back.toarray(), dense)
