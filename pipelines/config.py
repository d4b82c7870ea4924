"""YAML run configs -> config dataclasses, strictly.

A run config is a YAML mapping of sections (``model``, ``loss``, ``train``, ``data``); each
section loads 1:1 into a dataclass (a section left out takes its defaults). An unknown key or section,
a key given twice, a wrong type or a non-finite number is a ``ConfigError`` that names the key and lists
the valid ones. ``--set a.b=value`` overrides any key
(the value is parsed as YAML, so ``--set train.lr=1e-4`` gives a float and
``--set model.scales=[1,2,4]`` a list). Files and overrides are read with ``parse_yaml``: PyYAML's
safe loader plus YAML 1.2's floats without a dot ("3e-4"), which its YAML 1.1 rules read as strings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config a person wrote is wrong; the message says which key and why."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2's exponent floats ("1e-4", "2E5"): YAML 1.1 requires a dot; a key
    given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue                     # SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, safely (no objects), with "3e-4" read as the float 0.0003."""
    return yaml.load(text, Loader=_Loader)   # noqa: S506 - _Loader is a SafeLoader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples where asked;
    ConfigError names ``where`` (a key, or e.g. a sampler option) otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):     # .inf / .nan pass every `< 0` check and train a NaN model
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are ConfigErrors.

    The dataclass's own ``__post_init__`` then checks values (impossible combinations raise
    ValueError, re-raised here as ConfigError with the section named).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{where}.{unknown[0]}' for {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        message = str(e)        # a dataclass that already names the key ("model.resolution ...") is not prefixed twice
        raise ConfigError(message if message.startswith(f"{where}.") else f"{where}: {message}") from None


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def config_hash(obj: Any) -> str:
    """Short stable hash of a config dataclass (or dict): identifies a model's architecture."""
    d = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.lr=1e-4", "model.dim=64"]`` -> nested dict, values parsed as YAML."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set: bad key '{key}'")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: '{key}' conflicts with another override")
        node[parts[-1]] = parse_yaml(raw) if raw.strip() else ""
    return out


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:   # its str() spans several lines (with a caret drawing): keep the problem + place
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_sections(path: str | Path | None, sections: dict[str, type], overrides: list[str] | None = None,
                  base: dict | None = None) -> dict[str, Any]:
    """Load a run config: each top-level section into its dataclass.

    ``sections`` maps a section name to its dataclass; an unknown section is an error.
    ``base`` is an optional dict merged under the file (e.g. a checkpoint's saved config).
    """
    data = merge(base or {}, load_yaml(path) if path is not None else {})
    data = merge(data, parse_overrides(overrides))
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; valid sections: {', '.join(sections)}")
    return {name: from_dict(cls, data.get(name), name) for name, cls in sections.items()}


def load_run_config(args: Any, sections: dict[str, type]) -> dict[str, Any]:
    """The run config of a training command: ``--config`` (or, with ``--resume``, the output dir's
    saved ``run.yaml``), then ``--max-steps`` / ``--checkpoint-every`` / ``--set`` overrides."""
    overrides = list(args.set or [])
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if getattr(args, "checkpoint_every", None) is not None:
        overrides.append(f"train.checkpoint_every={args.checkpoint_every}")
    config = args.config
    if config is None:
        run_yaml = Path(args.output) / "run.yaml"
        if not (args.resume and run_yaml.is_file()):
            raise ConfigError("give --config (or --resume an output dir that has a run.yaml)")
        config = run_yaml
    return load_sections(config, sections, overrides)
