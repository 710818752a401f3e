"""The model that saved summary statistics were reduced for, against a run's config.

Summary statistics fix the fixed and random formulas and the expression transform: a fit
from them (``flashmm-dask fit CONFIG --stats S.zarr``, ``stats.load``) can only fit that
model. :func:`check_stats_model` refuses a config that asks for another one, naming the
key, instead of silently fitting the stored model under the config's name. A config that
leaves ``model.fixed``/``model.random`` unset takes the statistics' model.
"""

from __future__ import annotations

from typing import Any

from flashmm_dask.errors import ConfigError
from flashmm_dask.run.config import RunConfig
from flashmm_dask.stats.summary import SummaryStats

__all__ = ["check_stats_model"]


def _formula(text: Any) -> str:
    return " ".join(str(text).split())


def _randoms(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    return [_formula(v) for v in items]


def check_stats_model(cfg: RunConfig, stats: SummaryStats, where: str) -> None:
    """Refuse a config whose model differs from the one ``stats`` were reduced for.

    Parameters
    ----------
    cfg : RunConfig
    stats : SummaryStats, with the ``fixed``, ``random`` and ``transform`` of its
        provenance (statistics of other origins, without them, are not checked)
    where : the statistics' location, for the message

    Raises
    ------
    ConfigError
        ``config key 'model.fixed' ('...') differs from the statistics' ('...') ...``
    """
    prov = dict(getattr(stats, "provenance", {}) or {})
    model = cfg.model
    pcs = [f"PC{i + 1}" for i in range(int(getattr(model, "pcs", 0) or 0))]
    checks: list[tuple[str, Any, Any]] = []
    if model.fixed is not None and "fixed" in prov:
        wanted = _formula(model.fixed + "".join(f" + {pc}" for pc in pcs))
        checks.append(("model.fixed", wanted, _formula(prov["fixed"])))
    if model.random is not None and "random" in prov:
        checks.append(("model.random", _randoms(model.random), _randoms(prov["random"])))
    if "transform" in prov:
        checks.append(("model.transform", model.transform, str(prov["transform"])))
        if prov["transform"] == model.transform and "target_sum" in prov:
            target = float(prov["target_sum"])
            checks.append(("model.target_sum", float(model.target_sum), target))
    for key, wanted, stored in checks:
        if wanted != stored:
            shown = wanted if key != "model.fixed" or not pcs else model.fixed
            raise ConfigError(
                f"config key '{key}' ({_show(shown)}) differs from the model of the summary "
                f"statistics in {where!r} ({_show(stored)}): statistics are reduced for one "
                f"model; set {key} to theirs (or leave model.fixed/model.random out to fit "
                "the statistics' model), or reduce the data again for this model "
                "(flashmm-dask stats CONFIG)"
            )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(repr(v) for v in value) + "]" if len(value) != 1 else repr(value[0])
    return repr(value)


def config_difference(stored: Any, cfg: RunConfig) -> str | None:
    """The first setting that determines the results and differs between a stored config
    (a results store's ``config`` attribute) and ``cfg``: ``"model.method ('REML' there,
    'ML' here)"``; None when none is found (e.g. a store written by another version)."""
    if not isinstance(stored, dict):
        return None
    now = cfg.to_dict()
    sections = ["data", "model", "contrasts", "test", "fit"]
    if cfg.data.path is None:
        sections.insert(1, "simulate")
    for section in sections:
        for key, there, here in _leaves(section, stored.get(section), now.get(section)):
            if key == "data.storage_options":
                continue
            if there != here:
                return f"{key} ({there!r} there, {here!r} here)"
    return None


def _leaves(path: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict) and path != "contrasts":
        out = []
        for key in list(dict.fromkeys([*a, *b])):
            out += _leaves(f"{path}.{key}", a.get(key), b.get(key))
        return out
    return [(path, a, b)]
