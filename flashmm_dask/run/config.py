"""Run configurations of the ``flashmm-dask`` command line: YAML files validated on load.

A configuration has the sections data, simulate, model, contrasts, test, stats, fit,
cluster and output, and the keys progress and log_level (``configs/demo.yaml`` lists every
key with its default).
It is built in three layers:

1. the defaults (no model and no contrasts: a config states its own; with no source,
   :func:`default_config`, the demo run on simulated data with its model, :data:`DEMO`);
2. a YAML file or a mapping (:func:`load_config`); its sections merge into the defaults and
   its values (a whole mapping such as ``contrasts`` included) replace them;
3. overrides ``"dotted.key=value"``, the value parsed as YAML: ``model.method=ML``,
   ``cluster.slurm.cores=8``, ``contrasts.B-A=trtB - trtA`` (``contrasts.B-A=null`` removes
   that entry), ``model.random=[~ 0 + sam, ~ 0 + sam:time]``.

Only then is the result validated, so an error names the final key path, what is wrong
and what is allowed, in one line (:class:`~flashmm_dask.errors.ConfigError`). The schema
is the dataclasses below: each field carries its rule in its metadata. YAML is read with
``yaml.safe_load``, so tags such as ``!!python/object`` are refused.

Relative paths written in a config file (data.path, data.obs, stats.load, output.path) are
resolved against the file's folder; URLs ("s3://...") and absolute paths are kept.
:func:`dump_config` writes relative paths as absolute ones (against the current folder),
so a dumped file means the same wherever it is loaded from.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from flashmm_dask.errors import ConfigError
from flashmm_dask.run.config_rules import (
    _BOOL,
    _POSITIVE,
    _TEXT,
    _Bad,
    _block_size,
    _choice,
    _entries,
    _fail,
    _features,
    _integer,
    _is_counts_alias,
    _key,
    _mapping,
    _number,
    _random,
    _resources,
    _scalar_text,
    _size,
    _string,
    _strings,
    _transform,
    _walltime,
)

__all__ = ["DEMO", "RunConfig", "default_config", "dump_config", "load_config", "require_model"]


@dataclass(frozen=True)
class DataConfig:
    """The expression data; ``path`` null simulates them (section simulate)."""

    path: str | None = _TEXT()
    layer: str | None = _TEXT()
    orientation: str | None = _key(_choice("cells_x_features", "features_x_cells"))
    obs: str | None = _TEXT()
    chunk_cells: int | None = _POSITIVE()
    storage_options: dict[str, Any] = field(
        default_factory=dict, metadata=_entries(_mapping(lambda v: v), "nested")
    )
    features: tuple[str, ...] | Mapping[str, str] | None = _key(_features)
    cells: str | None = _TEXT()
    drop_missing: bool = _BOOL(False)
    # TileDB-SOMA experiments only (flashmm_dask.io.soma): null is the reader's default
    measurement: str | None = _TEXT()
    obs_filter: str | None = _TEXT()
    var_filter: str | None = _TEXT()
    var_column: str | None = _TEXT()


#: The data keys of SOMA experiments; left out of the config hash while null, so that the
#: hash of a config without them is what it was before they existed.
SOMA_KEYS = ("measurement", "obs_filter", "var_filter", "var_column")


@dataclass(frozen=True)
class SimulateConfig:
    """Arguments of :func:`flashmm_dask.simulate.simulate_rnaseq`."""

    n_genes: int = _POSITIVE(200)
    n_cells: int = _POSITIVE(20000)
    n_samples: int = _POSITIVE(12)
    n_celltypes: int = _POSITIVE(3)
    n_treatments: int = _POSITIVE(2)
    n_de_genes: int | None = _key(_integer(0), 20, optional=True)
    minbeta: float = _key(_number(), 0.25)
    maxbeta: float = _key(_number(), 1.0)
    var_randomeffects: float = _key(_number(0.0), 0.1)
    seed: int | None = _key(_integer(0), 1, optional=True)
    chunk_cells: int = _POSITIVE(10000)


@dataclass(frozen=True)
class ModelConfig:
    """The mixed model: formulas, method, expression transform and Fisher scoring limits."""

    # no default model: a config for the user's data states its own (the demo's is DEMO)
    fixed: str | None = _TEXT()
    random: str | tuple[str, ...] | None = _key(_random)
    method: str = _key(_choice("REML", "ML"), "REML")
    # Calibrated defaults for runs (benchmarks/CALIBRATION.md); "residual" / False are R
    # FLASHMM's behaviour, and the defaults of the Python entry points.
    df: str = _key(_choice("residual", "satterthwaite"), "satterthwaite")
    nonnegative: bool = _BOOL(True)
    # Satterthwaite's df at a variance held at zero: "retain" keeps it (continuous df),
    # "lmertest" drops it as lmerTest does (numerics/satterthwaite.py)
    boundary_df: str = _key(_choice("lmertest", "retain"), "lmertest")
    transform: str = _key(_transform, "log2p1")
    target_sum: float = _key(_number(0.0, strict=True), 1e4)
    max_iter: int = _POSITIVE(50)
    epsilon: float = _key(_number(0.0, strict=True), 1e-5)
    pcs: int = _key(_integer(0), 0)
    by: str | None = _TEXT()
    min_cells: int = _key(_integer(0), 0)


@dataclass(frozen=True)
class InferenceConfig:
    """Section ``test``: the alternative hypothesis of the contrast tests and the
    multiple-testing adjustment of the p-values (Benjamini-Hochberg or -Yekutieli)."""

    alternative: str = _key(_choice("two.sided", "less", "greater"), "two.sided")
    p_adjust: str = _key(_choice("BH", "BY"), "BH")


@dataclass(frozen=True)
class StatsConfig:
    """Summary statistics: ``load`` them instead of reading the data; ``save`` them."""

    load: str | None = _TEXT()
    save: bool = _BOOL(True)
    split_every: int = _key(_integer(2), 8)


@dataclass(frozen=True)
class FitConfig:
    block_size: int | str = _key(_block_size, "auto")
    store_cov: bool = _BOOL(True)


@dataclass(frozen=True)
class AdaptiveConfig:
    minimum: int | None = _key(_integer(0))
    maximum: int | None = _POSITIVE()


@dataclass(frozen=True)
class SlurmConfig:
    """dask_jobqueue.SLURMCluster arguments, the number of jobs and adaptive scaling."""

    cores: int = _POSITIVE(1)
    processes: int = _POSITIVE(1)
    memory: str = _key(_size(auto=False), "4GiB")
    walltime: str = _key(_walltime, "01:00:00")
    queue: str | None = _TEXT()
    account: str | None = _TEXT()
    job_extra_directives: tuple[str, ...] = _key(_strings(), ())
    job_script_prologue: tuple[str, ...] = _key(_strings(), ())
    local_directory: str | None = _TEXT()
    log_directory: str | None = _TEXT()
    interface: str | None = _TEXT()
    n_jobs: int = _POSITIVE(1)
    adaptive: AdaptiveConfig | None = field(default=None, metadata={"section": AdaptiveConfig})


def _default_resources() -> dict[str, dict[str, str]]:
    return {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}}


@dataclass(frozen=True)
class KubernetesConfig:
    """The worker pods of a dask-kubernetes cluster."""

    image: str = _TEXT("flashmm-dask:latest")
    namespace: str | None = _TEXT()
    n_workers: int = _POSITIVE(2)
    resources: dict[str, dict[str, str]] = field(
        default_factory=_default_resources, metadata=_entries(_resources, "nested")
    )
    env: dict[str, str] = field(
        default_factory=dict, metadata=_entries(_mapping(_scalar_text), "flat")
    )
    service_account: str | None = _TEXT()


@dataclass(frozen=True)
class ClusterConfig:
    """Where the work runs: a local cluster, a running scheduler, Slurm or Kubernetes."""

    kind: str = _key(_choice("local", "address", "slurm", "kubernetes"), "local")
    address: str | None = _TEXT()
    n_workers: int | None = _POSITIVE()
    threads_per_worker: int = _POSITIVE(1)
    memory_limit: str | int = _key(_size(auto=True), "auto")
    processes: bool = _BOOL(True)
    dashboard_address: str | None = _TEXT("127.0.0.1:0", optional=True)
    # seconds to wait for the first worker of a Slurm or Kubernetes cluster
    worker_timeout: float = _key(_number(0.0, strict=True), 600.0)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)


@dataclass(frozen=True)
class OutputConfig:
    path: str = _TEXT("flashmm-output")
    overwrite: bool = _BOOL(False)
    tables: tuple[str, ...] = _key(_strings("csv", "parquet"), ("csv", "parquet"))
    plots: bool = _BOOL(True)


#: The model and contrasts of the demo (simulated data with columns libsize, cls, trt,
#: sam). They are not defaults: ``load_config(None)`` (the ``demo`` command) merges them
#: in; a config file or mapping states its own model and contrasts.
DEMO: dict[str, Any] = {
    "model": {"fixed": "~ 0 + log(libsize) + cls + cls:trt", "random": "~ 0 + sam"},
    "contrasts": {"trt_in_cls1": "cls1:trtB", "trt_cls2_vs_cls1": "cls2:trtB - cls1:trtB"},
}


@dataclass(frozen=True)
class RunConfig:
    """A validated run configuration; build it with :func:`load_config`.

    Sections are frozen dataclasses and lists are tuples. Change a copy with
    :meth:`with_overrides` (validated), not ``dataclasses.replace`` (not validated).
    """

    data: DataConfig = field(default_factory=DataConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    contrasts: dict[str, str] = field(
        default_factory=dict, metadata=_entries(_mapping(_string), "flat")
    )
    test: InferenceConfig = field(default_factory=InferenceConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    progress: bool = _BOOL(True)  # progress bars, shown only when stderr is a terminal
    log_level: str = _key(_choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "INFO")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able nested dict; ``load_config(cfg.to_dict()) == cfg``."""
        return dict(_plain(self))

    def hash(self) -> str:
        """Hex sha256 of the settings that determine the results.

        Covers data (except storage_options, which say how to reach the data, e.g.
        credentials), simulate (only when data.path is null), model, contrasts, test and
        fit; not stats, cluster, output, progress or log_level, so a run resumed elsewhere matches.
        """
        d = self.to_dict()
        # the keys of strata, selection and SOMA count only when set, so that the hash of a
        # config without them is the one it had before they existed
        unset: dict[tuple[str, str], Any] = {("data", "cells"): None, ("model", "by"): None}
        unset.update({("data", "drop_missing"): False, ("model", "min_cells"): 0})
        unset.update({("data", key): None for key in SOMA_KEYS})
        for (section, key), default in unset.items():
            if d[section].get(key) == default:
                d[section].pop(key)
        data = {k: v for k, v in d["data"].items() if k != "storage_options"}
        simulate = d["simulate"] if self.data.path is None else None
        payload = {"hash_version": 1, "data": data, "simulate": simulate}
        payload.update({k: d[k] for k in ("model", "contrasts", "test", "fit")})
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def with_overrides(self, overrides: Iterable[str]) -> RunConfig:
        """A validated copy with ``"dotted.key=value"`` overrides applied."""
        return load_config(self.to_dict(), overrides)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _section_type(f: Field[Any]) -> Any:
    factory = f.default_factory
    section = factory if isinstance(factory, type) and is_dataclass(factory) else None
    return f.metadata.get("section", section)


def _schema(path: str) -> tuple[Field[Any] | None, Any]:
    """(field, section class or None) at a dotted key path; (None, None) if unknown."""
    found: Field[Any] | None = None
    section: Any = RunConfig
    for part in path.split(".") if path else []:
        found = {f.name: f for f in fields(section)}.get(part) if section else None
        if found is None:
            return None, None
        section = _section_type(found)
    return found, section


def _unknown(key: str, section: str) -> str:
    names = sorted(f.name for f in fields(_schema(section)[1]))
    where = f"under '{section}'" if section else "at the top level"
    close = difflib.get_close_matches(key.rpartition(".")[2], names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"config key '{key}' is unknown; valid keys {where}: {', '.join(names)}{hint}"


_PATH_KEYS = ("data.path", "data.obs", "stats.load", "output.path")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# -- loading and dumping --------------------------------------------------------------


def default_config() -> RunConfig:
    """The demo configuration: simulated data, the demo's model and contrasts (:data:`DEMO`),
    fitted on a local cluster. ``RunConfig()`` itself has no model and no contrasts."""
    return load_config(None)


def require_model(cfg: RunConfig) -> None:
    """Refuse a run whose config states no model (``model.fixed`` and ``model.random``).

    Raises
    ------
    ConfigError
        One line naming the missing key and an example.
    """
    examples = {"fixed": "'~ 0 + log(libsize) + cell_type + cell_type:condition'"}
    examples["random"] = "'~ 0 + donor' (one random intercept per donor)"
    for key in ("fixed", "random"):
        if getattr(cfg.model, key) is None:
            raise ConfigError(
                f"config key 'model.{key}' is not set: a config states its own model, e.g. "
                f"model.{key}: {examples[key]} over columns of the cell metadata (obs); "
                "configs/demo.yaml shows a whole config"
            )


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | RunConfig | None = None,
    overrides: Iterable[str] = (),
) -> RunConfig:
    """Read, merge and validate a run configuration.

    Parameters
    ----------
    source : str or os.PathLike or Mapping or RunConfig, optional
        A YAML file, a mapping of sections, or None for :func:`default_config` (the demo:
        its model and contrasts, :data:`DEMO`, are merged in only then). Relative paths in
        a file are resolved against the file's folder (not those of a mapping).
    overrides : iterable of str
        ``"dotted.key=value"`` strings, the value parsed as YAML, applied in order after
        the source; ``contrasts.NAME=null`` removes one contrast.

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        One line naming the key path, the problem and what is allowed (and where the
        value came from); or the file, and line, that could not be read.
    """
    tree = _plain(RunConfig())
    origins: dict[str, str] = {}
    if isinstance(source, RunConfig):
        source = source.to_dict()
    if source is None:
        _merge(tree, copy.deepcopy(DEMO), "", "in the demo configuration", origins)
    if isinstance(source, Mapping):
        _merge(tree, copy.deepcopy(dict(source)), "", "in the given mapping", origins)
    elif source is not None:
        path = Path(source)
        layer = _read_yaml(path)
        _resolve_paths(layer, path.resolve().parent)
        _merge(tree, layer, "", f"in {path}", origins)
    for text in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(tree, text, origins)
    cfg: RunConfig = _build(RunConfig, "", tree, origins)
    _check_consistency(cfg, origins)
    return cfg


def dump_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config.

    Relative local paths are written as absolute paths (resolved against the current
    folder), since a config file's relative paths are read against the file's folder.
    """
    tree = cfg.to_dict()
    _resolve_paths(tree, Path.cwd())
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)
    header = "# flashmm-dask run configuration (written by dump_config)\n"
    Path(path).write_text(header + text, encoding="utf-8")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise ConfigError(f"config file {path} {what}; give the path of a YAML run config")
    try:
        layer = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise ConfigError(f"cannot read config file {path}{where}: {problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read config file {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(layer, dict):
        got = "it is empty" if layer is None else f"got a {type(layer).__name__}"
        raise ConfigError(f"config file {path} must be a mapping of sections (data:, ...); {got}")
    return layer


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    for key in _PATH_KEYS:
        section, name = key.split(".")
        node = tree.get(section)
        value = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(value, str) and value and not _URL.match(value):
            node[name] = os.path.normpath(base / os.path.expanduser(value))


# -- merging layers -------------------------------------------------------------------


def _merge(
    tree: dict[str, Any], layer: Any, path: str, origin: str, origins: dict[str, str]
) -> None:
    """Merge a user mapping into the tree of section ``path``; values replace defaults."""
    if not isinstance(layer, Mapping):
        what = f"config section '{path}'" if path else "a config"
        raise _fail(f"{what} must be a mapping of keys; got {layer!r}", origin)
    layer = dict(layer)
    if path == "model" and "is_counts" in layer:
        _is_counts_alias(layer, origin)
    for key, value in layer.items():
        full = f"{path}.{key}" if path else str(key)
        found, section = _schema(full)
        if found is None:
            raise _fail(_unknown(full, path), origin)
        if section is None:
            tree[key] = value
            origins[full] = origin
        elif value is None and found.default is None:  # a nullable section set to null
            tree[key] = None
        else:
            tree[key] = tree[key] if tree[key] is not None else _plain(section())
            _merge(tree[key], {} if value is None else value, full, origin, origins)


def _apply_override(tree: dict[str, Any], text: Any, origins: dict[str, str]) -> None:
    """Apply one ``"dotted.key=value"`` override as a one-key layer."""
    origin = f"from override {text!r}"
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} has no '='; write key=value, e.g. model.method=ML")
    key, raw = (s.strip() for s in text.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has a malformed key; write e.g. cluster.n_workers=4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(
            f"cannot parse the value of override {text!r} as YAML: {problem}"
        ) from None
    for i in range(1, len(parts) + 1):
        found, section = _schema(".".join(parts[:i]))
        if found is None or section is None:
            break
    rule = found.metadata.get("rule") if found is not None else None
    if rule is not None:
        leaf, rest = parts[:i], parts[i:]
        plain = value is not None and not isinstance(value, str | list | dict)
        if rule.text and plain and (rest or rule.keys is None):
            value = raw  # e.g. data.layer=1 names the layer "1"
        if rest and rule.keys is None:
            raise _fail(
                f"config key '{key}' is unknown; '{'.'.join(leaf)}' holds one value", origin
            )
        if rest:
            current = functools.reduce(lambda node, k: node[k], leaf, tree)
            value = _set_entry(current, rest if rule.keys == "nested" else [".".join(rest)], value)
            parts = leaf
    for part in reversed(parts):
        value = {part: value}
    _merge(tree, value, "", origin, origins)


def _set_entry(mapping: Any, keys: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``mapping`` with the entry at ``keys`` set (or removed by a null value)."""
    out = dict(mapping) if isinstance(mapping, Mapping) else {}
    head, rest = keys[0], keys[1:]
    if rest:
        out[head] = _set_entry(out.get(head), rest, value)
    elif value is None:
        out.pop(head, None)
    else:
        out[head] = value
    return out


# -- validation -----------------------------------------------------------------------


def _build(cls: type, path: str, tree: dict[str, Any], origins: dict[str, str]) -> Any:
    kwargs = {}
    for f in fields(cls):
        full, value = f"{path}.{f.name}" if path else f.name, tree[f.name]
        section, rule = _section_type(f), f.metadata.get("rule")
        if section is not None:
            kwargs[f.name] = None if value is None else _build(section, full, value, origins)
        elif value is None and rule is not None and rule.optional:
            kwargs[f.name] = None
        else:
            try:
                kwargs[f.name] = rule.check(value)  # type: ignore[union-attr]
            except _Bad as exc:
                raise _fail(f"config key '{full}' {exc}", origins.get(full)) from None
    return cls(**kwargs)


def _check_consistency(cfg: RunConfig, origins: dict[str, str]) -> None:
    """Rules that span several keys."""

    def fail(key: str, message: str) -> ConfigError:
        return _fail(f"config key '{key}' {message}", origins.get(key))

    if cfg.cluster.kind == "address" and cfg.cluster.address is None:
        raise fail(
            "cluster.address",
            "is required when cluster.kind is 'address'; e.g. tcp://127.0.0.1:8786",
        )
    if "://" in cfg.output.path and not cfg.output.path.startswith("file://"):
        raise fail(
            "output.path",
            "must be a folder on a filesystem that the driver and every worker share (a "
            "local disk, NFS/Lustre, or a volume mounted in every pod); object-store URLs "
            f"are supported for data.path, not for the output; got {cfg.output.path!r}",
        )
    sim = cfg.simulate
    if sim.minbeta > sim.maxbeta:
        raise fail(
            "simulate.minbeta", f"({sim.minbeta:g}) must be <= simulate.maxbeta ({sim.maxbeta:g})"
        )
    if sim.n_de_genes is not None and sim.n_de_genes > sim.n_genes:
        raise fail(
            "simulate.n_de_genes", f"({sim.n_de_genes}) must be <= simulate.n_genes ({sim.n_genes})"
        )
    if cfg.data.features is not None and not cfg.data.features:
        raise fail(
            "data.features",
            "is an empty list; list the features to keep, or remove the key to keep all",
        )
    # names of features select among loaded statistics (stats.load) without the data
    by_name = cfg.stats.load is not None and not isinstance(cfg.data.features, Mapping)
    for name in ("layer", "orientation", "obs", "features", *SOMA_KEYS):
        if name == "features" and by_name:
            continue
        if cfg.data.path is None and getattr(cfg.data, name) is not None:
            raise fail(
                f"data.{name}",
                "is set but data.path is null (the data are simulated); "
                f"set data.path or remove data.{name}",
            )
    adaptive = cfg.cluster.slurm.adaptive
    low, high = (adaptive.minimum, adaptive.maximum) if adaptive else (None, None)
    if low is not None and high is not None and low > high:
        raise fail("cluster.slurm.adaptive.minimum", f"({low}) must be <= maximum ({high})")
