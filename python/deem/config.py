"""The one config mechanism of train, data and eval: YAML files read into mappings, `key=value` overrides with
dotted keys, and dataclass sections built from mappings with unknown keys rejected and numbers coerced.

    raw = apply_overrides(read_yaml(path, "training config", ConfigError), ["optim.lr=3e-4"])
    optim = from_mapping(OptimSection, raw["optim"], "optim", ConfigError)

Every error is the caller's `error` class (a `UserError`) with a message naming the file or key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deem.errors import ConfigError, UserError
from deem.io import read_text

T = TypeVar("T")


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def read_yaml(path: str | Path, what: str = "config", error: type[Exception] = UserError) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is `{}`); a missing, non-UTF-8 or invalid file raises
    `error` naming `what` and the file."""
    text = read_text(path, what, error)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML ({yaml_problem(err)})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must be a mapping, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        return key.split("."), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({yaml_problem(err)})") from err


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `cfg` with each `a.b.c=value` override set (missing mappings are created)."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a mapping")
        node[keys[-1]] = value
    return out


def check_keys(values: dict[str, Any], known: typing.Iterable[str], where: str, error: type[Exception] = ConfigError,
               ignore_prefix: str | None = None) -> None:
    """Reject keys of `values` not in `known` (keys starting with `ignore_prefix`, e.g. YAML-anchor holders
    `x-...`, pass)."""
    known = set(known)
    bad = sorted(k for k in values if k not in known and not (ignore_prefix and str(k).startswith(ignore_prefix)))
    if bad:
        raise error(f"{where}: unknown keys {bad}; expected {sorted(known)}")


def _number(hint: Any) -> type | None:
    """float or int when the annotation is one (optionally `| None`), else None."""
    kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    return float if float in kinds else int if int in kinds else None


def from_mapping(cls: type[T], values: dict[str, Any] | None, where: str, error: type[Exception] = ConfigError,
                 **fixed: Any) -> T:
    """Build dataclass `cls` from a mapping: unknown keys are an error naming `where`; numbers become their
    declared type (YAML reads `3e-4` as a string), tuples of floats included. `fixed` fields are passed as given."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise error(f"{where}: expected a mapping of keys, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    check_keys(values, fields, where, error)
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        hint = hints[key]
        try:
            if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
                out[key] = tuple(float(v) for v in value)
            elif value is not None and (kind := _number(hint)) is not None:
                out[key] = kind(value)
        except (TypeError, ValueError) as err:
            raise error(f"{where}.{key}: expected a number, got {value!r}") from err
    return cls(**out, **fixed)
