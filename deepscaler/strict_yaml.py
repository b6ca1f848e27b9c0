"""Dataclass trees from YAML with strict keys: the generic half of the config.

Every value of a file or a ``key.path=value`` override is checked against the dataclass field
it lands in; errors are one line and name the source (file or override), the dotted key and
the closest valid key. A file may say ``extends: base.yaml`` (or a list), resolved by the
caller (``deepscaler/config.py``, which holds the schema: next to the file, else a shipped name);
the files and overrides are layers, merged in order, later ones winning.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A bad config file, key, value or override. The message is one line."""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def hint(word: str, valid: list[str], prefix: str = "") -> str:
    """' (did you mean 'prefix.closest'?)', or the valid choices when nothing is close."""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid: {', '.join(prefix + v for v in valid)})" if valid else ""


def fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` checked against ``tp`` (with the few safe coercions YAML needs)."""

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"{source}: key '{key}' must be {type_name(tp)}, got {value!r}{extra}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        valid = fields(tp)
        out = {}
        for name, sub in value.items():
            name = str(name)
            path = f"{key}.{name}" if key else name
            if name not in valid:
                prefix = f"{key}." if key else ""
                raise ConfigError(f"{source}: unknown key '{path}'{hint(name, list(valid), prefix)}")
            out[name] = check(sub, valid[name], path, source)
        return out
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check(value, arg, key, source)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise fail(hint(str(value), [str(c) for c in choices]))
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item,) = typing.get_args(tp)
        return [check(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, item = typing.get_args(tp)
        return {str(k): check(v, item, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. slurm.time: 60
        raise fail()
    raise TypeError(f"config type {tp!r} of '{key}' is not supported")  # a bug in this module


def build(cls: type, data: dict[str, Any]) -> Any:
    """Instantiate the dataclass tree from checked, merged plain data."""
    kwargs = {}
    for name, tp in fields(cls).items():
        if name not in data:
            continue
        kwargs[name] = _build_value(tp, data[name])
    return cls(**kwargs)


def _build_value(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value)
    if typing.get_origin(tp) is dict:
        _, item = typing.get_args(tp)
        return {k: _build_value(item, v) for k, v in value.items()}
    return value


def merge(base: dict, top: dict) -> dict:
    """Deep-merge ``top`` into ``base``; free-form mappings (dict fields) merge per entry."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of plain nested data; lists and empty mappings are leaves."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_file(path: Path, root: type, extends: Callable[[Path, str], Path],
              seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The layers of one YAML file, (file, checked data) in the order they merge: what it extends
    first, each found by ``extends(file, name)``, then the file itself; each checked against the
    dataclass ``root``. Layers, not one merged mapping, so that a value's file can be shown."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: 'extends' forms a cycle ({chain})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (a config file holds at least one key, e.g. 'extends: base.yaml')")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    parents = raw.pop("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: key 'extends' must be a file name or a list of them")
    layers = [layer for parent in parents for layer in read_file(extends(path, parent), root, extends, (*seen, path))]
    return [*layers, (path, check(raw, root, "", str(path)))]


def flags_to_overrides(argv: list[str]) -> list[str]:
    """``--a.b value`` and ``--a.b=value`` as ``a.b=value``: the flag style of the recipe's own
    commands (``--wandb.project deepscaler``). Only dotted flags are config keys, so ``--stage``
    and friends stay options; a wrong key then fails as any override does, naming it."""
    out, items = [], iter(argv)
    for item in items:
        name, sep, value = item[2:].partition("=")
        if not item.startswith("--") or "." not in name or not name.split(".")[0].isidentifier():
            out.append(item)
        elif sep:
            out.append(f"{name}={value}")
        else:
            value = next(items, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"'{item}': expected a value ('{item} VALUE' or '{name}=VALUE')")
            out.append(f"{name}={value}")
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> (key, value parsed as a YAML scalar/list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def read_override(text: str, root: type) -> dict[str, Any]:
    """The override ``text`` as nested data (a layer), checked against the dataclass ``root``."""
    key, value = parse_override(text)
    source = f"override '{text}'"
    # Walk the schema so the error names the first wrong part of the path.
    tp: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(tp):
            valid = fields(tp)
            if part not in valid:
                prefix = ".".join(parts[:i]) + "." if i else ""
                raise ConfigError(f"{source}: unknown key '{path}'{hint(part, list(valid), prefix)}")
            tp = valid[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"{source}: key '{'.'.join(parts[:i])}' has no sub-keys")
    # A string field keeps the text as typed ("run.name=007" stays "007").
    if _accepts_str(tp) and isinstance(value, (int, float, bool)):
        value = text.partition("=")[2].strip()
    checked = check(value, tp, key, source)
    nested: Any = checked
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return str in args and int not in args and float not in args
    return False
