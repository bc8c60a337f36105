"""Typed validation of parsed JSON against dataclass annotations: the manifest's schema, in one place.

The manifest's dataclasses (`rnnserve.export.manifest`) are the single source of truth: their field
names, annotations and defaults *are* the schema. `check_dataclass(Manifest, data)` walks the JSON and
returns every problem in plain words, each naming its field path, e.g.

    state[1].batch_axis: must be an integer, got "1" (a string)
    cell: missing (required)
    inputs[0].dtpe: unknown field

Torch-free and dependency-free, so the server and `rnnserve models validate` use it as they are.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def check_dataclass(cls: type, data: Any, path: str = "") -> list[str]:
    """Every way `data` (parsed JSON) fails to be an instance of dataclass `cls`; [] when it fits."""
    if not isinstance(data, dict):
        return [f"{path or 'the manifest'}: must be a JSON object, got {_describe(data)}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{_join(path, name)}: unknown field" for name in sorted(set(data) - set(fields))]
    for name, f in fields.items():
        where = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{where}: missing (required)")
            continue
        problems += check_value(data[name], hints[name], where)
    return problems


def check_value(value: Any, tp: Any, where: str) -> list[str]:
    """Every way `value` fails to fit annotation `tp` (str, int, float, bool, Any, Literal, unions,
    list[...], dict[str, ...] and nested dataclasses)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return []
    if dataclasses.is_dataclass(tp):
        return check_dataclass(tp, value, where)  # type: ignore[arg-type]
    if origin is Literal:
        return [] if value in args else [f"{where}: must be one of {list(args)}, got {value!r}"]
    if origin in (Union, types.UnionType):
        if any(not check_value(value, a, where) for a in args):
            return []
        return [f"{where}: must be {' or '.join(_name(a) for a in args)}, got {_describe(value)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: must be a list, got {_describe(value)}"]
        return [p for i, v in enumerate(value) for p in check_value(v, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: must be an object, got {_describe(value)}"]
        return [p for k, v in value.items() for p in check_value(v, args[1], f"{where}[{k!r}]")]
    if _fits_scalar(value, tp):
        return []
    return [f"{where}: must be {_name(tp)}, got {_describe(value)}"]


def _fits_scalar(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # JSON writes 2.0 as 2.0 but people write 2
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(value: Any) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
    text = repr(value) if not isinstance(value, dict | list) else ""
    if isinstance(value, str):
        text = f'"{value}"'
    return f"{text} ({kind})" if text else kind


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
