"""Plain dict -> typed ``Config`` (``load_config``) and the defaults as a plain tree (``default_tree``).

Hydra composes ``conf/`` at the entry point (``megaopsd/train.py``), which turns the result into
a plain dict and calls ``load_config``; every key outside the schema is an error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from megaopsd.config.schema import REQUIRED, Config, ConfigError, check_literal


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        check_literal(where, value, annotation)
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        others = [option for option in options if option is not type(None)]
        if len(others) == 1:  # an optional field: the one type's own message is the clearest
            return _coerce(value, others[0], where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        expected = " or ".join(_describe(option) for option in options)
        raise ConfigError(f"config: {where}={value!r} has the wrong type; expected {expected}")
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config: {where}={value!r} must be a mapping with string keys")
        return dict(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config: {where}={value!r} must be a list")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config: {where}={value!r} must be true or false")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"config: {where}={value!r} must be an integer")
    if not isinstance(value, annotation):
        raise ConfigError(
            f"config: {where}={value!r} must be of type {annotation.__name__}, not {type(value).__name__}"
        )
    return value


def _describe(annotation: Any) -> str:
    """``true or false``, ``one of a, b``, or the type's name: for an error message."""
    if annotation is bool:
        return "true or false"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"config: unknown key {prefix}{unknown[0]}; known keys here are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in data or data[name] == REQUIRED:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config: {path} is required; set it, e.g. {path}=...")
            continue
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(data[name], Mapping):
                raise ConfigError(f"config: {path} must be a section (mapping), got {data[name]!r}")
            kwargs[name] = _build(annotation, data[name], path)
        else:
            kwargs[name] = _coerce(data[name], annotation, path)
    return cls(**kwargs)


def load_config(data: Mapping[str, Any]) -> Config:
    """Build the typed config from a plain (resolved) dict; keys outside the schema are errors.

    Top-level keys that only serve interpolation in ``conf/`` (``run_name``, ``output_dir``)
    and Hydra's own section are ignored.
    """
    sections = {k: v for k, v in data.items() if k not in ("hydra", "run_name", "output_dir")}
    return _build(Config, sections, "")


def default_tree() -> dict[str, Any]:
    """Every section's dataclass defaults as a plain dict (tuples as lists, required as ``???``).

    ``megaopsd/train.py`` gives it to Hydra as the base config ``megaopsd_defaults``; the files
    in ``conf/`` then hold only what differs from it (a test keeps it that way).
    """

    def section(cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                value = field.default
                out[field.name] = list(value) if isinstance(value, tuple) else value
            else:
                out[field.name] = REQUIRED
        return out

    hints = typing.get_type_hints(Config)
    return {field.name: section(hints[field.name]) for field in dataclasses.fields(Config)}
