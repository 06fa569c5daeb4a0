"""Recipes: YAML files plus `--set key=value` overrides, read into typed settings.

One reader for every file a user writes by hand (training recipes, sweep files, evaluation-suite
settings, model configs): a missing file, invalid YAML, a key that does not exist, or a value of the
wrong type each raise one CrossLayerError naming the key and what it takes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import CrossLayerError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string (it wants `3.0e-4`); people write the former, and JSON does too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML (or JSON) text -> Python values, with scientific notation read as floats."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path, what: str = "recipe") -> dict[str, Any]:
    """The mapping a YAML (or JSON) file holds; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise CrossLayerError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except json.JSONDecodeError as e:
        raise CrossLayerError(f"{path} is not valid JSON: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CrossLayerError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CrossLayerError(f"{path} must hold a mapping of {what} keys, got a {type(raw).__name__}")
    return raw


def apply_sets(raw: dict[str, Any], sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` overrides (values read as YAML: 3e-4, true, [1, 2]); `a.b=v` sets key b of mapping a.

    A dotted key whose parent is a string (a preset name) turns it into `{preset: name, b: v}`."""
    raw = dict(raw)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CrossLayerError(f"--set expects key=value, got {item!r}")
        try:
            parsed = load_yaml(value) if value else None
        except yaml.YAMLError:
            parsed = value
        parent, dot, child = key.partition(".")
        if dot:
            inner = raw.get(parent)
            inner = {"preset": inner} if isinstance(inner, str) else dict(inner or {})
            inner[child] = parsed
            raw[parent] = inner
        else:
            raw[key] = parsed
    return raw


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` as the type `annotation` names (int, float, bool, str, their `| None`, Any);
    ints may be written 1e6 or 16_384, booleans true/false/yes/no."""
    if value is None or annotation is Any:
        return value
    kinds = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    try:
        if "bool" in kinds:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if "int" in kinds and "list" not in kinds:
            if isinstance(value, bool):
                raise ValueError
            number = float(str(value).replace("_", ""))
            if not number.is_integer():
                raise ValueError
            return int(number)
        if "float" in kinds:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "str" in kinds and "list" not in kinds and "dict" not in kinds:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise CrossLayerError(f"{key}: expected {kinds.replace(' | None', '').replace('typing.', '')}, "
                              f"got {value!r}") from None
    return value


def settings_from(cls: type[T], raw: dict[str, Any], what: str) -> T:
    """A settings dataclass from a mapping: unknown keys refused (naming the allowed ones), values coerced."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(raw) - set(fields)
    if unknown:
        raise CrossLayerError(f"unknown {what} key(s): {', '.join(sorted(unknown))}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(k, v, hints.get(k, Any)) for k, v in raw.items()})


def parse_list(value: Any, kind: type, what: str) -> list:
    """`"1,2,3"` (or a YAML list) -> [1, 2, 3] of `kind` (int, float or str); empty items dropped."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [x.strip() if isinstance(x, str) else x for x in items]
    items = [x for x in items if x != ""]
    try:
        values = [kind(x) if kind is not int else int(float(x)) if float(x).is_integer() else _not_int(x)
                  for x in items]
    except (TypeError, ValueError):
        raise CrossLayerError(f"{what}: expected comma-separated {kind.__name__} values, got {value!r}") from None
    if not values:
        raise CrossLayerError(f"{what}: expected at least one value, got {value!r}")
    return values


def _not_int(x: Any) -> int:
    raise ValueError(x)
