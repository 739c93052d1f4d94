"""YAML -> typed dataclasses, with `base:` inheritance, named presets and `key=value` overrides.

Unknown keys are errors that name the key, the file, the nearest allowed key and all allowed keys
(the original code's `**ignore_kwargs` silently swallowed typos).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from .schema import RunConfig

# Presets are the YAML files of the repository's configs/ folder. The package reaches them as its
# data folder `presets/`: in a checkout a link to ../configs, in a wheel a copy the build makes
# (pyproject.toml package-data), so an install outside the checkout has them and there is one source.
PRESET_DIR = resources.files("taming_dist") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml"))


def _did_you_mean(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean `{prefix}{close[0]}`?)" if close else ""


def _resolve_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_absolute() and relative_to is not None and not p.exists():
            p = relative_to / p
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = preset_names()
        raise ValueError(f"{name_or_path!r} is neither a YAML file nor a preset{_did_you_mean(name_or_path, names)}; "
                         f"presets: {', '.join(names)}")
    return preset


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_tree(name_or_path: str, relative_to: Path | None = None, _seen: tuple = ()) -> tuple[dict, str]:
    """Read a YAML file (or preset), following `base:` chains. Returns (dict, source description)."""
    path = _resolve_path(name_or_path, relative_to)
    if path in _seen:
        raise ValueError(f"config `base:` cycle: {' -> '.join(map(str, _seen + (path,)))}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw, str(path)
    base_tree, base_src = read_yaml_tree(base, path.parent, _seen + (path,))
    return _deep_merge(base_tree, raw), f"{path} (base {base_src})"


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: `{where}` must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, source, prefix=where + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: `{where}` must be a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{source}: `{where}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float)):
            raise ValueError(f"{source}: `{where}` must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{source}: `{where}` must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{source}: `{where}` must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: `{where}` must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{source}: `{where}` must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config field type {tp} at {where}")


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = ""):
    """Build dataclass `cls` from `data`; an unknown key raises a ValueError naming the key, the file,
    the nearest allowed key and all allowed keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = str(unknown[0])
        raise ValueError(f"{source}: unknown config key `{prefix}{key}`{_did_you_mean(key, names, prefix)}; "
                         f"allowed keys of {cls.__name__}: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    # YAML parsing gives numbers, booleans, lists ([1,2]) and null the usual spelling.
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = dict(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for k in path[:-1]:
            nxt = node.get(k)
            nxt = dict(nxt) if isinstance(nxt, dict) else {}
            node[k] = nxt
            node = nxt
        node[path[-1]] = value
    return tree


def load_config(name_or_path: str, overrides: list[str] | None = None, cls: type = RunConfig):
    """Load a run config from a YAML path or preset name, apply `key=value` overrides, validate."""
    tree, source = read_yaml_tree(name_or_path)
    if overrides:
        tree = apply_overrides(tree, overrides)
        source = f"{source} with overrides {' '.join(overrides)}"
    cfg = from_dict(cls, tree, source)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def dump_config(cfg, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
