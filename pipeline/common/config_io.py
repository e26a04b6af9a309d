"""The one configuration system of rdpt: YAML files + dotted overrides -> a validated schema.

    cfg = load_config(TrainConfig, "configs/train/tiny.yaml", ["optim.lr=3e-4", "run.name=x"])

Rules:
- Schemas are pydantic models deriving from `ConfigModel`: unknown keys are errors.
- A field whose type is itself a `ConfigModel` may be given in YAML as a *path* to another YAML
  file (relative to the file that names it, or to the working directory for a command-line
  override): `model: ../model/tiny.yaml`. That is how presets are shared between configs.
- Overrides are `dotted.key=value`; the value is parsed as YAML (`8`, `3e-4`, `true`, `[1,2]`).
- Errors name the file, the dotted key and the expected type (RdptConfigError).
- `save_resolved` writes the fully resolved config next to an output, so a run can be
  reproduced from that single file.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.common.atomic import atomic_write_text
from pipeline.common.errors import RdptConfigError

C = TypeVar("C", bound="ConfigModel")


class ConfigModel(BaseModel):
    """Base of every config section: strict about keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------- reading


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RdptConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RdptConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RdptConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _section_type(schema: type[BaseModel], key: str) -> type[ConfigModel] | None:
    """The ConfigModel class of field `key` of `schema` (also inside Optional[...]), or None."""
    field = schema.model_fields.get(key)
    if field is None:
        return None
    candidates = [field.annotation, *typing.get_args(field.annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, ConfigModel):
            return c
    return None


def _resolve_includes(schema: type[BaseModel], data: dict[str, Any], base_dir: Path) -> dict:
    """Replace string values of section-typed fields by the YAML file they name (recursively)."""
    out = dict(data)
    for key, value in data.items():
        sub = _section_type(schema, key)
        if sub is None:
            continue
        if isinstance(value, str):
            inc = Path(value)
            if not inc.is_absolute():
                inc = base_dir / inc
            if not inc.is_file():
                raise RdptConfigError(
                    f"{key}: '{value}' is neither a mapping nor an existing YAML file "
                    f"(looked for {inc})"
                )
            out[key] = _resolve_includes(sub, read_yaml(inc), inc.parent)
        elif isinstance(value, dict):
            out[key] = _resolve_includes(sub, value, base_dir)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], parsed value)."""
    if "=" not in text:
        raise RdptConfigError(
            f"override '{text}' is not of the form dotted.key=value (e.g. optim.lr=3e-4)"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RdptConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(schema: type[BaseModel], data: dict, parts: list[str], value: Any) -> None:
    """Set data[parts[0]][parts[1]]... = value, resolving section includes on the way."""
    node, node_schema = data, schema
    for i, part in enumerate(parts[:-1]):
        sub = _section_type(node_schema, part) if node_schema else None
        child = node.get(part)
        if isinstance(child, str) and sub is not None:  # an include not yet resolved
            child = _resolve_includes(node_schema, {part: child}, Path.cwd())[part]
        if child is None:
            child = {}
        if not isinstance(child, dict):
            dotted = ".".join(parts[: i + 1])
            raise RdptConfigError(f"override {'.'.join(parts)}: '{dotted}' is not a section")
        node[part] = child
        node, node_schema = child, sub
    last = parts[-1]
    sub = _section_type(node_schema, last) if node_schema else None
    if sub is not None and isinstance(value, str):
        value = _resolve_includes(node_schema, {last: value}, Path.cwd())[last]
    node[last] = value


# ---------------------------------------------------------------------------- validation


def _expected(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    table = {
        "int_parsing": "an integer",
        "int_type": "an integer",
        "int_from_float": "an integer",
        "float_parsing": "a number",
        "float_type": "a number",
        "bool_parsing": "a boolean (true/false)",
        "bool_type": "a boolean (true/false)",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "literal_error": "one of the allowed values",
    }
    return table.get(kind, "")


def format_validation_error(e: ValidationError, source: str, schema: type[BaseModel]) -> str:
    lines = []
    for err in e.errors():
        dotted = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parent = _schema_at(schema, [str(p) for p in err["loc"][:-1]])
            valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
            lines.append(f"{source}: unknown key '{dotted}' (valid keys here: {valid})")
            continue
        expected = _expected(err)
        got = err.get("input")
        got_s = f"{got!r} ({type(got).__name__})" if got is not None else "nothing"
        msg = err["msg"]
        if expected:
            lines.append(f"{source}: {dotted}: expected {expected}, got {got_s}: {msg}")
        else:
            lines.append(f"{source}: {dotted}: {msg} (got {got_s})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _schema_at(schema: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    node: type[BaseModel] | None = schema
    for p in path:
        if node is None:
            return None
        node = _section_type(node, p)
    return node


def validate(schema: type[C], data: dict, source: str) -> C:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RdptConfigError(format_validation_error(e, source, schema)) from None
    except ValueError as e:  # raised by our own cross-field validators outside pydantic
        raise RdptConfigError(f"{source}: {e}") from None


def load_config(
    schema: type[C],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> C:
    """Load `path` (optional), merge `base` under it, apply dotted `overrides`, validate."""
    data: dict[str, Any] = dict(base or {})
    source = "<defaults>"
    if path is not None:
        source = str(path)
        loaded = _resolve_includes(schema, read_yaml(path), Path(path).parent)
        data = _deep_merge(data, loaded)
    overrides = list(overrides)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(schema, data, parts, value)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return validate(schema, data, source)


def _deep_merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------- writing


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the fully resolved config (crash-safe) so the output can be reproduced from it."""
    atomic_write_text(path, to_yaml(cfg))


def flatten(cfg: BaseModel | Mapping, prefix: str = "") -> dict[str, Any]:
    """{'model.hidden_size': 128, ...}: for MLflow params and config diffs."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
