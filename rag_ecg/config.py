"""The one loader for dataclass configs: a YAML file, then overrides, into a typed, checked dataclass.

    cfg = load_config(EncoderTrainConfig, "training/configs/encoder_cpu.yaml", ["lr=1e-3", "epochs=2"])

Overrides come in two shapes with one meaning each:
- `key=value` strings (the CLI's `--set`): the value is parsed as YAML, so `key=null` sets the field to None;
- a dict (typed CLI options, library callers): a None value means "not given", keeping the file's value.
Unknown fields are an error naming the file; YAML's `1e-4` (a string) becomes the float the field declares.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rag_ecg.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A YAML mapping from `path`; a missing, unreadable or non-mapping file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read {what} ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} fields, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["lr=1e-3", "run-dir=null"]` -> `{"lr": 0.001, "run_dir": None}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: {str(exc).splitlines()[0]}") from None
    return out


def merge_overrides(data: dict, overrides: Mapping[str, Any] | Sequence[str] | None) -> dict:
    """`data` updated by overrides of either shape (see the module docstring)."""
    out = dict(data)
    if overrides is None:
        return out
    if isinstance(overrides, Mapping):
        out.update({k: v for k, v in overrides.items() if v is not None})
    else:
        out.update(parse_overrides(overrides))
    return out


def coerce_fields(cls: type, data: Mapping[str, Any], where: str = "config") -> dict:
    """Check names against `cls`'s fields and turn strings/ints into the float/int a field declares."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(types))})")
    out = dict(data)
    for key, value in data.items():
        kind = types[key].replace(" | None", "").replace("Optional[", "").rstrip("]")
        if isinstance(value, str) and kind in ("float", "int"):
            try:
                out[key] = float(value) if kind == "float" else int(value)
            except ValueError:
                raise ConfigError(f"{where}: {key}: {value!r} is not a valid {kind}") from None
        elif isinstance(value, int) and not isinstance(value, bool) and kind == "float":
            out[key] = float(value)
    return out


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """A `cls` from a mapping of its fields; a field's own check (`__post_init__`) names what is wrong."""
    fields = coerce_fields(cls, dict(data or {}), where)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from None


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Mapping[str, Any] | Sequence[str] | None = None, what: str = "config") -> T:
    """YAML file (optional) + overrides -> a checked `cls` instance."""
    data = read_yaml(path, what) if path is not None else {}
    where = str(path) if path is not None else "overrides"
    return from_dict(cls, merge_overrides(data, overrides), where)


def to_yaml(cfg: Any) -> str:
    """A dataclass config as the YAML `load_config` reads back (saved beside the artifacts it made)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
