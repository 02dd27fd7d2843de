"""Loading, overriding and saving YAML task configurations."""

from __future__ import annotations

import difflib
import errno
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from configs.schema import ConfigError, as_written, validate_config
from utils import atomic_write

__all__ = [
    "ConfigError",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_value",
    "resolve_config_path",
    "save_config",
]

_MISSING = object()


def _yaml_loader() -> YAML:
    return YAML(typ="safe", pure=True)


def _yaml_dumper() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = None  # innermost collections in flow style, as the original's yaml.dump
    yaml.allow_unicode = False  # escape non-ASCII (e.g. U+0085 would read back as a line break)
    yaml.width = 2**30  # no folding: a folded double-quoted scalar with escapes does not read back intact
    return yaml


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if it exists, else a case-insensitive match in the same directory."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    parent = candidate.parent
    if parent.is_dir():
        wanted = candidate.name.lower()
        matches = sorted(p for p in parent.iterdir() if p.name.lower() == wanted and p.is_file())
        if len(matches) == 1:
            return matches[0]
    raise FileNotFoundError(errno.ENOENT, "config file not found", str(path))


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar or flow collection."""
    if text.strip() == "":
        return ""
    try:
        return _yaml_loader().load(text)
    except YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}") from exc


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            full = f"{prefix}{key}"
            keys.append(full)
            keys.extend(_flat_keys(value, full + "."))
    return keys


def _closest_key(key: str, config: Mapping[str, Any]) -> str | None:
    matches = difflib.get_close_matches(key, _flat_keys(config), n=1, cutoff=0.0)
    return matches[0] if matches else None


def _child(node: Any, part: str) -> Any:
    if isinstance(node, Mapping):
        return node.get(part, _MISSING)
    if isinstance(node, list):
        try:
            index = int(part)
        except ValueError:
            return _MISSING
        return node[index] if -len(node) <= index < len(node) else _MISSING
    return _MISSING


def _set_child(node: Any, part: str, value: Any) -> None:
    if isinstance(node, list):
        node[int(part)] = value
    else:
        node[part] = value


def _del_child(node: Any, part: str) -> None:
    if isinstance(node, list):
        del node[int(part)]
    else:
        del node[part]


def _split_override(override: str, source: str) -> tuple[str, str, str | None]:
    text = override.strip()
    prefix = ""
    for candidate in ("++", "+", "~"):
        if text.startswith(candidate):
            prefix = candidate
            text = text[len(candidate):]
            break
    key, sep, value = text.partition("=")
    key = key.strip()
    if not key or any(part == "" for part in key.split(".")) or any(c.isspace() for c in key):
        raise ConfigError(f"malformed override {override!r} for {source}: expected key=value")
    if not sep:
        if prefix != "~":
            raise ConfigError(
                f"malformed override {override!r} for {source}: expected key=value "
                f"(or ~key to delete a key)"
            )
        return prefix, key, None
    return prefix, key, value


def apply_overrides(
    config: dict[str, Any], overrides: Iterable[str] | None, source: str = "<config>"
) -> dict[str, Any]:
    """Apply Hydra-style override strings to ``config`` in place and return it."""
    for override in overrides or ():
        prefix, key, raw = _split_override(override, source)
        parts = key.split(".")
        parent: Any = config
        blocked = ""  # path of a missing entry that cannot be created (inside a list)
        for depth, part in enumerate(parts[:-1]):
            child = _child(parent, part)
            where = ".".join(parts[: depth + 1])
            if child is _MISSING and prefix in ("+", "++") and isinstance(parent, dict):
                child = {}
                parent[part] = child
            if child is _MISSING:
                parent, blocked = None, where
                break
            if not isinstance(child, (dict, list)):
                raise ConfigError(
                    f"cannot apply override {override!r} to {source}: '{where}' is not a mapping"
                )
            parent = child
        last = parts[-1]
        current = _MISSING if parent is None else _child(parent, last)

        if prefix == "~":
            if current is _MISSING:
                raise ConfigError(
                    f"cannot delete '{key}' from {source}: the key does not exist"
                    + _closest_hint(key, config)
                )
            if raw is not None and parse_value(raw) != current:
                raise ConfigError(
                    f"cannot delete '{key}' from {source}: its value is {current!r}, not {raw!r}"
                )
            _del_child(parent, last)
            continue

        assert raw is not None
        try:
            value = parse_value(raw)
        except ConfigError as exc:
            raise ConfigError(f"cannot apply override {override!r} to {source}: {exc}") from None
        if prefix == "+":
            if current is not _MISSING:
                raise ConfigError(
                    f"cannot add '{key}' to {source}: the key already exists (value {current!r}); "
                    f"use '{key}={raw}' to change it or '++{key}={raw}' to add or change it"
                )
        elif prefix == "":
            if current is _MISSING:
                raise ConfigError(
                    f"cannot override '{key}' in {source}: the key does not exist"
                    + _closest_hint(key, config)
                    + f". To add a new key use '+{key}={raw}'"
                )
        if parent is None:
            raise ConfigError(
                f"cannot apply override {override!r} to {source}: '{blocked}' does not exist and "
                "cannot be created inside a list"
            )
        if isinstance(parent, list) and current is _MISSING:
            raise ConfigError(
                f"cannot apply override {override!r} to {source}: list index '{last}' out of range"
            )
        _set_child(parent, last, value)
    return config


def _closest_hint(key: str, config: Mapping[str, Any]) -> str:
    guess = _closest_key(key, config)
    return f" (closest existing key: '{guess}')" if guess else ""


def load_config(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """Load a YAML config, apply ``overrides`` and, with ``task``, validate it (:class:`ConfigError`)."""
    source = str(path)
    resolved = resolve_config_path(path)
    try:
        with open(resolved, encoding="utf-8") as handle:
            config = _yaml_loader().load(handle)
    except YAMLError as exc:
        raise ConfigError(f"invalid YAML in {source}: {exc}") from exc
    if not isinstance(config, dict):
        kind = "empty" if config is None else f"a {type(config).__name__}"
        raise ConfigError(f"config file {source} must contain a mapping at the top level, not {kind}")
    apply_overrides(config, overrides, source)
    if task is not None:
        validate_config(config, task, source)
    return config


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k if isinstance(k, (str, int, float)) else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()  # numpy / torch scalars
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def _reads_back(text: str, value: Any) -> bool:
    try:
        return _yaml_loader().load(text) == value
    except YAMLError:
        return False


def dump_config(config: Mapping[str, Any]) -> str:
    """Render ``config`` as ``config.yaml`` text: sorted keys, innermost collections in flow style."""
    plain = _plain(config)
    stream = io.StringIO()
    _yaml_dumper().dump(plain, stream)
    text = stream.getvalue()
    if not _reads_back(text, plain):
        # an unusual key or value the plain style would misread (e.g. a key '?0'): quote every scalar
        dumper = _yaml_dumper()
        dumper.default_style = '"'
        stream = io.StringIO()
        dumper.dump(plain, stream)
        text = stream.getvalue()
        if not _reads_back(text, plain):
            # last resort: JSON, which YAML reads as it is
            text = json.dumps(plain, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    return text


def save_config(config: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> str:
    """Write ``output_dir/config.yaml`` atomically, without the filled-in defaults; return its path."""
    text = dump_config(as_written(config))
    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(os.fspath(output_dir), "config.yaml")
    atomic_write(target, lambda handle: handle.write(text.encode("utf-8")))
    return target
