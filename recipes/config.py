"""Run settings: YAML files plus `key=value` overrides, checked against a dataclass.

Every recipe declares its settings as a dataclass; `load_config` reads the YAML, applies the
command-line overrides (values parsed as YAML, so `lr=1e-4`, `flag=true`, `betas=[0.9,0.98]` work;
`vision.layer=-2` reaches into a dict setting) and checks everything at once: an unknown key fails
with the list of valid keys, a value of the wrong type fails naming the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} not found.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not a {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} must look like key=value (e.g. lr=1e-4).")
        value = Override(raw)
        head, _, rest = key.partition(".")
        if rest:  # vision.layer=-2: one level into a dict setting
            inner = dict(data.get(head) or {})
            inner[rest] = value
            data[head] = inner
        else:
            data[key] = value
    return data


class Override(str):
    """A command-line value: read as YAML where the setting's type wants that (numbers, lists,
    booleans), kept as the typed text where the setting is a string (`prompt=a : b`)."""

    def parsed(self) -> Any:
        try:
            return yaml.safe_load(str(self)) if self else ""
        except yaml.YAMLError:
            return str(self)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> T:
    """Build `cls` from a YAML file, overrides and keyword values (in that order of precedence,
    the last winning); every problem is reported in one error."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides({**data, **values}, overrides or [])
    return from_dict(cls, data, source=str(path) if path else "settings")


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "settings") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    problems = []
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(f"unknown key `{key}`{hint}; valid keys: {', '.join(sorted(fields))}")
    values = {}
    for key, value in data.items():
        if key in fields:
            ok, converted = _check(value, hints[key])
            if ok:
                values[key] = converted
            else:
                problems.append(f"`{key}` must be {_describe(hints[key])}, got {value!r}")
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    problems += [f"`{name}` is required" for name in missing]
    if problems:
        raise ConfigError(f"Invalid {cls.__name__} in {source}:\n  - " + "\n  - ".join(problems))
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"Invalid {cls.__name__} in {source}:\n{err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The settings as plain JSON values (tuples become lists), as a checkpoint stores them."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def differences(a: dict[str, Any], b: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """Settings that differ between two configs, as `key: a -> b`."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if k not in ignore and a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------
# type checking of plain YAML values against annotations
# ------------------------------------------------------------------------------------------
def _check(value: Any, hint: Any) -> tuple[bool, Any]:
    if isinstance(value, Override):
        ok, converted = _check(value.parsed(), hint)
        if not ok and _accepts_str(hint):
            return True, str(value)
        return ok, converted
    if isinstance(value, dict):
        value = {k: v.parsed() if isinstance(v, Override) else v for k, v in value.items()}
    origin = get_origin(hint)
    if hint is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arm in get_args(hint):
            ok, converted = _check(value, arm)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if origin is Literal:
        return value in get_args(hint), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):  # YAML reads 2e-3 (no dot) as text
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            checked = [_check(v, a) for v, a in zip(value, args)]
        else:
            arm = args[0] if args else Any
            checked = [_check(v, arm) for v in value]
        if not all(ok for ok, _ in checked):
            return False, value
        items = [c for _, c in checked]
        return True, tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return isinstance(value, hint), value


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    return get_origin(hint) in (Union, types.UnionType) and any(_accepts_str(a) for a in get_args(hint))


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (list, tuple):
        return f"a list ({hint})"
    if origin is dict:
        return "a mapping"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
