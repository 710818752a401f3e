"""Rules for single config values: each checker returns the normalised value or raises _Bad.

Also the field helpers (``_key``, ``_entries``) with which :mod:`flashmm_dask.run.config`'s
dataclasses attach a rule to each key, and the model.is_counts alias of model.transform.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, NamedTuple

from dask.utils import parse_bytes

from flashmm_dask.errors import ConfigError

# -- rules for single values: each returns the normalised value or raises _Bad ---------


class _Bad(Exception):
    """A value that breaks its key's rule; the message follows "config key 'a.b' "."""


def _need(ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise _Bad(f"must be {what}; got {value!r}")


def _string(v: Any) -> str:
    _need(isinstance(v, str) and v.strip() != "", "a non-empty string", v)
    return str(v)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        for option in options:
            if isinstance(v, str) and v.strip().lower() == option.lower():
                return option
        raise _Bad(f"must be one of {', '.join(options)}; got {v!r}")

    return check


def _boolean(v: Any) -> bool:
    _need(isinstance(v, bool), "true or false", v)
    return bool(v)


def _as_number(v: Any) -> float | None:
    """A finite number from an int, float or numeric string (YAML reads 1e4 as a string)."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _number(minimum: float = -math.inf, strict: bool = False, integer: bool = False) -> Any:
    kind = "integer" if integer else "number"
    what = f"{'an' if integer else 'a'} {kind}"
    if (minimum, strict) in ((0, True), (1, False)) and (integer or strict):
        what = f"a positive {kind}"
    elif minimum == 0:
        what = f"a non-negative {kind}"
    elif minimum > -math.inf:
        what += f" {'>' if strict else '>='} {minimum:g}"

    def check(v: Any) -> float | int:
        x = _as_number(v)
        ok = x is not None and (x > minimum if strict else x >= minimum)
        _need(ok and (not integer or float(x or 0).is_integer()), what, v)
        if integer:
            return v if isinstance(v, int) else int(x or 0)
        return float(x or 0)

    return check


def _integer(minimum: int) -> Callable[[Any], int]:
    return _number(minimum, integer=True)


def _strings(*allowed: str) -> Callable[[Any], tuple[str, ...]]:
    what = f"a list of entries from {', '.join(allowed)}" if allowed else "a list of strings"
    item = _choice(*allowed) if allowed else _string

    def check(v: Any) -> tuple[str, ...]:
        items = [v] if isinstance(v, str) else v
        _need(isinstance(items, list | tuple), what, v)
        try:
            out = tuple(item(s) for s in items)
        except _Bad:
            raise _Bad(f"must be {what}; got {v!r}") from None
        return tuple(dict.fromkeys(out)) if allowed else out

    return check


def _random(v: Any) -> str | tuple[str, ...]:
    if isinstance(v, str):
        return _string(v)
    _need(isinstance(v, list | tuple) and len(v) > 0, "a formula or a list of formulas", v)
    formulas = _strings()(v)
    return formulas[0] if len(formulas) == 1 else formulas  # one component: one spelling


def _mapping(value: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    def check(v: Any) -> dict[str, Any]:
        _need(isinstance(v, Mapping), "a mapping", v)
        out = {}
        for key, item in v.items():
            _need(isinstance(key, str) and key != "", "a mapping with non-empty string keys", v)
            try:
                out[key] = value(item)
            except _Bad as exc:
                raise _Bad(f"entry {key!r} {exc}") from None
        return out

    return check


def _scalar_text(v: Any) -> str:
    _need(isinstance(v, str | int | float) and not isinstance(v, bool), "a string", v)
    return str(v)


def _resources(v: Any) -> dict[str, dict[str, str]]:
    out = _mapping(_mapping(_scalar_text))(v)
    _need(set(out) <= {"requests", "limits"}, "a mapping with keys requests, limits", v)
    return out


def _size(auto: bool) -> Callable[[Any], Any]:
    what = ("'auto', " if auto else "") + "a size such as '4GiB' or a number of bytes"

    def check(v: Any) -> Any:
        if (auto and v == "auto") or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        try:
            ok = isinstance(v, str) and parse_bytes(v) > 0
        except (ValueError, TypeError):
            ok = False
        _need(ok, what, v)
        return v

    return check


def _walltime(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        # YAML 1.1 reads an unquoted 1:30:00 as 5400 seconds
        return f"{v // 3600:02d}:{v % 3600 // 60:02d}:{v % 60:02d}"
    ok = isinstance(v, str) and re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", v.strip()) is not None
    _need(ok, "a Slurm time such as '01:30:00' or '2-00:00:00'", v)
    return str(v).strip()


def _features(v: Any) -> tuple[str, ...] | dict[str, str]:
    """data.features: a list of names, or {var_column: NAME} (a boolean var column)."""
    if isinstance(v, Mapping):
        _need(
            set(v) == {"var_column"} and isinstance(v["var_column"], str) and bool(v["var_column"]),
            "a list of feature names or a mapping {var_column: NAME} naming a boolean var "
            "column (e.g. {var_column: highly_variable})",
            v,
        )
        return {"var_column": str(v["var_column"])}
    return _strings()(v)


def _block_size(v: Any) -> Any:
    ok = v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
    _need(ok, "'auto' or a positive integer", v)
    return v


# -- the schema: each field carries its rule ------------------------------------------


class _Rule(NamedTuple):
    check: Callable[[Any], Any]
    optional: bool = False  # null is allowed
    text: bool = False  # an override's raw text is the value when YAML reads no string in it
    keys: str | None = None  # "flat"/"nested": overrides may set entries of this mapping


def _key(check: Callable[[Any], Any], default: Any = None, optional: bool = False) -> Any:
    rule = _Rule(check, optional or default is None, text=check in (_string, _random))
    return field(default=default, metadata={"rule": rule})


def _entries(check: Callable[[Any], Any], keys: str) -> dict[str, _Rule]:
    """Field metadata of a mapping whose entries overrides may set one by one."""
    return {"rule": _Rule(check, text=True, keys=keys)}


_transform = _choice("log2p1", "none", "log1p_scaled")
_TEXT = functools.partial(_key, _string)
_POSITIVE = functools.partial(_key, _integer(1))
_BOOL = functools.partial(_key, _boolean)


# -- the is_counts alias of model.transform ---------------------------------------------

# R's is_counts=TRUE is the log2(1 + y) transform
_IS_COUNTS = {True: "log2p1", False: "none"}


def _fail(message: str, origin: str | None) -> ConfigError:
    return ConfigError(f"{message} ({origin})" if origin else message)


def _is_counts_alias(layer: dict[str, Any], origin: str) -> None:
    """Replace ``is_counts`` in a model section by the transform it means."""
    value = layer.pop("is_counts")
    if not isinstance(value, bool):
        raise _fail(f"config key 'model.is_counts' must be true or false; got {value!r}", origin)
    if "transform" in layer:
        try:
            given = _transform(layer["transform"])
        except _Bad:
            given = None  # reported when the transform is validated
        if given is not None and given != _IS_COUNTS[value]:
            flag = str(value).lower()
            raise _fail(
                f"config keys 'model.is_counts' ({flag}) and 'model.transform' ({given!r}) "
                f"conflict; give only one (is_counts: {flag} means transform: "
                f"{_IS_COUNTS[value]})",
                origin,
            )
    layer["transform"] = _IS_COUNTS[value]
