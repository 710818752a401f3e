"""Run configurations: shipped files, round trips, overrides, the hash and every error."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flashmm_dask.errors import ConfigError
from flashmm_dask.run.config import DEMO, RunConfig, default_config, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def raises(message: str) -> pytest.RaisesContext[ConfigError]:
    """Expect a ConfigError whose message starts with ``message`` exactly."""
    return pytest.raises(ConfigError, match="^" + re.escape(message))


def leaves(tree: dict, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of a nested dict (mappings that are values excluded)."""
    out = set()
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        section = isinstance(value, dict) and key not in ("contrasts", "storage_options", "env")
        if section and key != "resources":
            out |= leaves(value, path)
        else:
            out.add(path)
    return out


def absolute(cfg: RunConfig, base: Path) -> RunConfig:
    """``cfg`` with its relative local paths joined to ``base``."""
    d = cfg.to_dict()
    for section, key in [("data", "path"), ("data", "obs"), ("stats", "load"), ("output", "path")]:
        value = d[section][key]
        if value is not None and "://" not in value and not os.path.isabs(value):
            d[section][key] = str(base / value)
    return load_config(d)


# -- the shipped configs --------------------------------------------------------------


def test_the_four_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "local.yaml", "slurm.yaml", "kubernetes.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path, monkeypatch):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert load_config(cfg.to_dict()) == cfg
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    dump_config(cfg, tmp_path / "sub" / "again.yaml")
    # relative paths (the demo's output.path) are written against the current folder
    assert load_config(tmp_path / "sub" / "again.yaml") == absolute(cfg, tmp_path)
    # every section the file writes is validated, not ignored: the values arrive
    raw = yaml.safe_load(path.read_text())
    assert cfg.cluster.kind == raw["cluster"]["kind"]
    if raw.get("contrasts"):
        assert cfg.contrasts == raw["contrasts"]


def test_demo_config_writes_out_every_default():
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert load_config(CONFIGS / "demo.yaml") == default_config()
    # output.path is left commented out, so that the default is the current folder
    assert leaves(default_config().to_dict()) - leaves(raw) == {"output.path"}


def test_shipped_examples_use_their_cluster_kind():
    local = load_config(CONFIGS / "local.yaml")
    assert local.data.path == str(CONFIGS / "data" / "atlas.zarr")
    assert local.data.layer == "counts"
    slurm = load_config(CONFIGS / "slurm.yaml")
    assert slurm.cluster.kind == "slurm"
    assert slurm.cluster.slurm.walltime == "04:00:00"
    assert slurm.cluster.slurm.job_script_prologue[0] == "module load python/3.11"
    kube = load_config(CONFIGS / "kubernetes.yaml")
    assert kube.cluster.kind == "kubernetes"
    assert kube.data.path.startswith("s3://") and kube.output.path == "/results/atlas"
    assert kube.cluster.kubernetes.resources["limits"]["memory"] == "8Gi"


def test_simulate_keys_are_arguments_of_simulate_rnaseq():
    from flashmm_dask.simulate import simulate_rnaseq

    parameters = inspect.signature(simulate_rnaseq).parameters
    assert {f.name for f in dataclasses.fields(default_config().simulate)} <= set(parameters)


@pytest.mark.parametrize("transform", ["log2p1", "none", "log1p_scaled"])
def test_every_transform_is_one_the_reducer_knows(transform):
    from flashmm_dask.stats.reduce import TRANSFORMS

    assert load_config(None, [f"model.transform={transform}"]).model.transform in TRANSFORMS


# -- round trips and values -----------------------------------------------------------


def test_to_dict_is_plain_json_and_loads_back_equal():
    cfg = load_config(
        None,
        [
            "data.path=/data/x.zarr",
            "data.features=[g1, g2]",
            "data.storage_options={anon: true, client_kwargs: {region_name: eu}}",
            "model.random=[~ 0 + sam, ~ 0 + sam:time]",
            "cluster.slurm.adaptive={minimum: 1, maximum: 4}",
            "cluster.kubernetes.env={A: x}",
            "fit.block_size=64",
        ],
    )
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert load_config(d) == cfg
    assert load_config(json.loads(json.dumps(d))) == cfg
    assert load_config(cfg) == cfg


def test_dump_writes_relative_paths_as_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output.path=out", "data.path=data/x.zarr"])
    (tmp_path / "elsewhere").mkdir()
    dump_config(cfg, tmp_path / "elsewhere" / "run.yaml")
    again = load_config(tmp_path / "elsewhere" / "run.yaml")
    assert again.output.path == str(tmp_path / "out")
    assert again.data.path == str(tmp_path / "data" / "x.zarr")
    assert dataclasses.replace(again, output=cfg.output, data=cfg.data) == cfg


def test_config_is_frozen():
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.method = "ML"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = cfg.model  # type: ignore[misc]


def test_numbers_written_the_yaml_1_1_way_are_read(tmp_path):
    # PyYAML reads 1e4 (no dot) and 2e4 as strings and an unquoted 1:30:00 as seconds
    path = write(
        tmp_path / "c.yaml",
        "model: {target_sum: 1e4, epsilon: 1e-6}\nsimulate: {n_cells: 2e4}\n"
        "cluster: {slurm: {walltime: 1:30:00}}\n",
    )
    cfg = load_config(path)
    assert cfg.model.target_sum == 10000.0 and isinstance(cfg.model.target_sum, float)
    assert cfg.model.epsilon == 1e-6
    assert cfg.simulate.n_cells == 20000 and isinstance(cfg.simulate.n_cells, int)
    assert cfg.cluster.slurm.walltime == "01:30:00"


def test_choices_are_case_insensitive_and_normalised():
    cfg = load_config({"model": {"method": "ml"}, "test": {"alternative": "Greater"}})
    assert (cfg.model.method, cfg.test.alternative) == ("ML", "greater")


def test_file_sections_merge_into_defaults_and_mappings_replace(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  method: ML\ncontrasts:\n  only: cls2\n")
    cfg = load_config(path)
    assert cfg.model.method == "ML"
    # a file merges into the defaults, which carry no model: not the demo's (issue 16)
    assert cfg.model.fixed is None and cfg.model.random is None
    assert cfg.model.max_iter == default_config().model.max_iter
    assert cfg.contrasts == {"only": "cls2"}


def test_a_config_without_contrasts_inherits_none_of_the_demo(tmp_path):
    path = write(
        tmp_path / "c.yaml", "model:\n  fixed: '~ 0 + cell_type'\n  random: '~ 0 + donor'\n"
    )
    cfg = load_config(path)
    assert cfg.contrasts == {}
    assert default_config().contrasts == DEMO["contrasts"]
    assert load_config(None).model.fixed == DEMO["model"]["fixed"]


def test_is_counts_alias():
    assert load_config({"model": {"is_counts": False}}).model.transform == "none"
    assert load_config({"model": {"is_counts": True, "transform": "log2p1"}}).model.transform == (
        "log2p1"
    )
    assert load_config(None, ["model.is_counts=false"]).model.transform == "none"
    # an override replaces the file's transform rather than conflicting with it
    assert (
        load_config({"model": {"transform": "log2p1"}}, ["model.is_counts=false"]).model.transform
        == "none"
    )


# -- overrides ------------------------------------------------------------------------


def test_overrides_of_nested_keys():
    cfg = load_config(
        None,
        [
            "model.method=ML",
            "cluster.n_workers=2",
            "cluster.slurm.cores=8",
            "cluster.slurm.adaptive.maximum=10",
            "output.overwrite=true",
            "progress=false",
            "cluster.dashboard_address=null",
        ],
    )
    assert cfg.model.method == "ML"
    assert cfg.cluster.n_workers == 2
    assert cfg.cluster.slurm.cores == 8
    assert cfg.cluster.slurm.adaptive is not None
    assert (cfg.cluster.slurm.adaptive.minimum, cfg.cluster.slurm.adaptive.maximum) == (None, 10)
    assert cfg.output.overwrite is True
    assert cfg.progress is False
    assert cfg.cluster.dashboard_address is None


def test_overrides_of_lists():
    cfg = load_config(None, ["model.random=[~ 0 + sam, ~ 0 + sam:time]", "output.tables=[csv]"])
    assert cfg.model.random == ("~ 0 + sam", "~ 0 + sam:time")
    assert cfg.output.tables == ("csv",)
    assert load_config(None, ["model.random=~ 0 + sam:cls"]).model.random == "~ 0 + sam:cls"
    # a list of one formula is the same model as the formula, and hashes the same
    single = load_config(None, ["model.random=[~ 0 + sam]"])
    assert single == default_config() and single.hash() == default_config().hash()


def test_overrides_of_mapping_entries():
    cfg = load_config(
        None,
        [
            "contrasts.B-A=trtB - trtA",
            "contrasts.trt_in_cls1=null",
            "data.storage_options.client_kwargs.region_name=eu-west-1",
            "cluster.kubernetes.resources.limits.cpu=4",
            "cluster.kubernetes.env.DASK_X.Y=1",
        ],
    )
    assert cfg.contrasts == {"trt_cls2_vs_cls1": "cls2:trtB - cls1:trtB", "B-A": "trtB - trtA"}
    assert cfg.data.storage_options == {"client_kwargs": {"region_name": "eu-west-1"}}
    # a nested entry is set without dropping its siblings
    assert cfg.cluster.kubernetes.resources == {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "4Gi"},
    }
    # a flat mapping takes the rest of the key, dots included, as the entry name
    assert cfg.cluster.kubernetes.env == {"DASK_X.Y": "1"}


def test_override_replaces_a_whole_mapping():
    cfg = load_config(None, ["contrasts={a: cls2, b: cls3 - cls2}"])
    assert cfg.contrasts == {"a": "cls2", "b": "cls3 - cls2"}


def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {method: ML}\ncluster: {n_workers: 3}\n")
    cfg = load_config(path, ["model.method=REML", "cluster.n_workers=5", "cluster.n_workers=6"])
    assert (cfg.model.method, cfg.cluster.n_workers) == ("REML", 6)
    assert cfg.with_overrides(["cluster.n_workers=1"]).cluster.n_workers == 1


def test_override_values_keep_their_text_for_string_keys():
    # YAML would read these as a number and as 330 seconds; the keys want text
    cfg = load_config(None, ["data.path=x.zarr", "data.layer=1", "contrasts.c=5:30"])
    assert cfg.data.layer == "1"
    assert cfg.contrasts["c"] == "5:30"


def test_override_section_mapping_and_null():
    cfg = load_config(None, ["cluster.slurm={cores: 4, memory: 16GiB}"])
    assert (cfg.cluster.slurm.cores, cfg.cluster.slurm.memory) == (4, "16GiB")
    assert cfg.cluster.slurm.processes == 1
    assert (
        load_config(
            None, ["cluster.slurm.adaptive={maximum: 3}", "cluster.slurm.adaptive=null"]
        ).cluster.slurm.adaptive
        is None
    )


# -- the hash -------------------------------------------------------------------------


def test_hash_is_stable_for_equal_configs():
    a = default_config()
    b = load_config(CONFIGS / "demo.yaml")
    reordered = dict(reversed(list(a.to_dict().items())))
    assert a.hash() == b.hash() == load_config(reordered).hash()
    assert re.fullmatch(r"[0-9a-f]{64}", a.hash())


def test_hash_is_the_same_in_another_process():
    code = "from flashmm_dask.run.config import default_config; print(default_config().hash())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == default_config().hash()


@pytest.mark.parametrize(
    "override",
    [
        "cluster.kind=slurm",
        "cluster.n_workers=7",
        "cluster.slurm.cores=16",
        "cluster.kubernetes.image=other:1",
        "output.path=elsewhere",
        "output.overwrite=true",
        "output.tables=[csv]",
        "output.plots=false",
        "progress=false",
        "log_level=DEBUG",
        "stats.save=false",
        "stats.split_every=4",
        "stats.load=/stats",
    ],
)
def test_hash_ignores_where_and_how_a_run_is_executed(override):
    assert load_config(None, [override]).hash() == default_config().hash()


@pytest.mark.parametrize(
    "override",
    [
        "model.method=ML",
        "model.fixed=~ 0 + cls + cls:trt",
        "model.random=[~ 0 + sam, ~ 0 + sam:cls]",
        "model.transform=none",
        "model.epsilon=1e-6",
        "contrasts.extra=cls2",
        "contrasts.trt_in_cls1=cls2:trtB",
        "test.alternative=less",
        "fit.block_size=32",
        "fit.store_cov=false",
        "simulate.seed=2",
        "simulate.n_cells=1000",
        "data.path=/data/atlas.zarr",
    ],
)
def test_hash_changes_with_what_determines_the_results(override):
    assert load_config(None, [override]).hash() != default_config().hash()


def test_hash_of_real_data_ignores_simulation_and_storage_options():
    real = load_config(None, ["data.path=s3://b/x.zarr", "data.layer=counts"])
    assert real.with_overrides(["simulate.seed=9"]).hash() == real.hash()
    assert real.with_overrides(["data.storage_options.anon=true"]).hash() == real.hash()
    assert real.with_overrides(["data.layer=raw"]).hash() != real.hash()


# -- relative paths -------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "project" / "configs"
    path = write(
        folder / "run.yaml",
        "data: {path: ../data/atlas.zarr, obs: obs.csv}\n"
        "stats: {load: stats}\noutput: {path: out/run1}\n",
    )
    cfg = load_config(path.relative_to(tmp_path))
    assert cfg.data.path == str(tmp_path / "project" / "data" / "atlas.zarr")
    assert cfg.data.obs == str(folder / "obs.csv")
    assert cfg.stats.load == str(folder / "stats")
    assert cfg.output.path == str(folder / "out" / "run1")


def test_absolute_paths_urls_and_overrides_are_kept(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "data: {path: 's3://bucket/atlas.zarr', obs: /abs/obs.csv}\noutput: {path: /abs/out}\n",
    )
    cfg = load_config(path, ["stats.load=rel/stats"])
    assert cfg.data.path == "s3://bucket/atlas.zarr"
    assert cfg.data.obs == "/abs/obs.csv"
    assert cfg.output.path == "/abs/out"
    assert cfg.stats.load == "rel/stats"  # command-line values are relative to the caller
    assert load_config({"output": {"path": "rel"}}).output.path == "rel"


# -- errors ---------------------------------------------------------------------------


def test_output_url_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"'output.path' must be a folder on a filesystem"):
        load_config(None, ["output.path=s3://bucket/results"])


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "cluster:\n  slurm:\n    coress: 4\n")
    valid = sorted(f.name for f in dataclasses.fields(default_config().cluster.slurm))
    message = (
        "config key 'cluster.slurm.coress' is unknown; valid keys under 'cluster.slurm': "
        + ", ".join(valid)
    )
    with raises(message) as info:
        load_config(path)
    assert str(path) in str(info.value)
    with raises("config key 'modle' is unknown; valid keys at the top level: cluster, contrasts"):
        load_config({"modle": {}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.method=GLS", "config key 'model.method' must be one of REML, ML; got 'GLS'"),
        (
            "fit.block_size=-3",
            "config key 'fit.block_size' must be 'auto' or a positive integer; got -3",
        ),
        (
            "fit.block_size=2.5",
            "config key 'fit.block_size' must be 'auto' or a positive integer; got 2.5",
        ),
        (
            "cluster.kind=address",
            "config key 'cluster.address' is required when cluster.kind is 'address'",
        ),
        (
            "cluster.kind=yarn",
            "config key 'cluster.kind' must be one of local, address, slurm, kubernetes; "
            "got 'yarn'",
        ),
        ("cluster.n_workers=0", "config key 'cluster.n_workers' must be a positive integer; got 0"),
        (
            "cluster.threads_per_worker=1.5",
            "config key 'cluster.threads_per_worker' must be a positive integer; got 1.5",
        ),
        (
            "cluster.processes=maybe",
            "config key 'cluster.processes' must be true or false; got 'maybe'",
        ),
        (
            "cluster.memory_limit=lots",
            "config key 'cluster.memory_limit' must be 'auto', a size such as '4GiB' or a "
            "number of bytes; got 'lots'",
        ),
        (
            "cluster.slurm.memory=auto",
            "config key 'cluster.slurm.memory' must be a size such as '4GiB'",
        ),
        ("cluster.slurm.walltime=soon", "config key 'cluster.slurm.walltime' must be a Slurm time"),
        (
            "cluster.slurm.adaptive={minimum: 5, maximum: 2}",
            "config key 'cluster.slurm.adaptive.minimum' (5) must be <= maximum (2)",
        ),
        (
            "cluster.kubernetes.resources={request: {cpu: 1}}",
            "config key 'cluster.kubernetes.resources' must be a mapping with keys requests, "
            "limits",
        ),
        (
            "model.transform=log",
            "config key 'model.transform' must be one of log2p1, none, log1p_scaled; got 'log'",
        ),
        ("model.epsilon=0", "config key 'model.epsilon' must be a positive number; got 0"),
        ("model.max_iter=ten", "config key 'model.max_iter' must be a positive integer; got 'ten'"),
        ("model.pcs=-1", "config key 'model.pcs' must be a non-negative integer; got -1"),
        (
            "model.random=[]",
            "config key 'model.random' must be a formula or a list of formulas; got []",
        ),
        ("model.fixed=''", "config key 'model.fixed' must be a non-empty string; got ''"),
        (
            "model.is_counts=yes please",
            "config key 'model.is_counts' must be true or false; got 'yes please'",
        ),
        ("contrasts=[a]", "config key 'contrasts' must be a mapping; got ['a']"),
        ("contrasts.c=[1]", "config key 'contrasts' entry 'c' must be a non-empty string; got [1]"),
        (
            "test.alternative=both",
            "config key 'test.alternative' must be one of two.sided, less, greater; got 'both'",
        ),
        ("stats.split_every=1", "config key 'stats.split_every' must be an integer >= 2; got 1"),
        (
            "output.tables=[csv, xlsx]",
            "config key 'output.tables' must be a list of entries from csv, parquet; "
            "got ['csv', 'xlsx']",
        ),
        (
            "data.orientation=rows",
            "config key 'data.orientation' must be one of cells_x_features, features_x_cells; "
            "got 'rows'",
        ),
        (
            "data.layer=counts",
            "config key 'data.layer' is set but data.path is null (the data are simulated)",
        ),
        ("simulate.minbeta=2", "config key 'simulate.minbeta' (2) must be <= simulate.maxbeta (1)"),
        (
            "simulate.n_de_genes=500",
            "config key 'simulate.n_de_genes' (500) must be <= simulate.n_genes (200)",
        ),
        (
            "log_level=LOUD",
            "config key 'log_level' must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; "
            "got 'LOUD'",
        ),
        ("model=3", "config section 'model' must be a mapping of keys; got 3"),
        ("nothing=1", "config key 'nothing' is unknown; valid keys at the top level:"),
        (
            "cluster.slurm.coress=4",
            "config key 'cluster.slurm.coress' is unknown; valid keys under 'cluster.slurm': "
            "account, adaptive, cores,",
        ),
        (
            "model.method.x=ML",
            "config key 'model.method.x' is unknown; 'model.method' holds one value",
        ),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(override, message):
    with raises(message) as info:
        load_config(None, [override])
    text = str(info.value)
    assert "\n" not in text
    if "required" not in text:  # the one message about a key no override set
        assert text.endswith(f"(from override {override!r})")


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  method: GLS\n")
    with raises("config key 'model.method' must be one of REML, ML; got 'GLS'") as info:
        load_config(path)
    assert str(info.value).endswith(f"(in {path})")


def test_conflicting_is_counts_and_transform():
    with raises(
        "config keys 'model.is_counts' (true) and 'model.transform' ('none') conflict; "
        "give only one (is_counts: true means transform: log2p1)"
    ):
        load_config({"model": {"is_counts": True, "transform": "none"}})


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  method: ML\n  fixed: [unclosed\ncluster: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"cannot read config file {path}, line ")
    line = int(re.search(r"line (\d+)", text).group(1))
    assert line in (3, 4)
    assert "\n" not in text


def test_yaml_tab_indentation_is_reported(tmp_path):
    path = write(tmp_path / "tabs.yaml", "model:\n\tmethod: ML\n")
    with pytest.raises(ConfigError, match=r"^cannot read config file .*line 2"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "got"),
    [("- a\n- b\n", "got a list"), ("just text\n", "got a str"), ("", "it is empty")],
)
def test_a_file_that_is_not_a_mapping(tmp_path, text, got):
    path = write(tmp_path / "c.yaml", text)
    with raises(f"config file {path} must be a mapping of sections (data:, ...); {got}"):
        load_config(path)


def test_missing_file_and_folder(tmp_path):
    with raises(
        f"config file {tmp_path / 'nope.yaml'} not found; give the path of a YAML run config"
    ):
        load_config(tmp_path / "nope.yaml")
    with raises(f"config file {tmp_path} is a folder"):
        load_config(tmp_path)


def test_malformed_overrides():
    with raises("override 'model.method' has no '='; write key=value, e.g. model.method=ML"):
        load_config(None, ["model.method"])
    with raises("override 'model..method=ML' has a malformed key"):
        load_config(None, ["model..method=ML"])
    with raises("cannot parse the value of override 'model.random=[a' as YAML"):
        load_config(None, ["model.random=[a"])


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write(
        tmp_path / "evil.yaml",
        f"data:\n  path: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
    )
    with pytest.raises(ConfigError, match=r"^cannot read config file .*python/object"):
        load_config(path)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="cannot parse the value of override"):
        load_config(None, [f"data.path=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert not marker.exists()


def test_a_non_string_section_key_is_unknown():
    with raises("config key '1' is unknown; valid keys at the top level:"):
        load_config({1: {}})


def test_a_mapping_source_is_not_changed():
    source = {"model": {"is_counts": False}, "cluster": {"slurm": {"cores": 2}}}
    before = json.dumps(source, sort_keys=True)
    load_config(source, ["cluster.slurm.cores=3"])
    assert json.dumps(source, sort_keys=True) == before
