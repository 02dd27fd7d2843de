"""Reading annotation JSON files with errors that name the file, the entry and the field."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any


class AnnotationError(ValueError):
    """A malformed annotation file or entry."""


def as_file_list(value: str | Sequence[str], key: str) -> list[str]:
    """Config values that the original iterates must be lists; a single string is accepted too."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AnnotationError(f"config key {key!r} must be a file path or a list of file paths, got {value!r}")
    return list(value)


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno} "
                              f"(character {exc.pos}): {exc.msg}") from None


def load_annotations(files: Iterable[str], required: Sequence[str]) -> list[dict]:
    """Concatenate JSON lists of entries, checking that each entry is an object with ``required``."""
    entries: list[dict] = []
    for path in files:
        data = read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
        for index, entry in enumerate(data):
            if not isinstance(entry, dict):
                raise AnnotationError(f"{path}: entry {index} is a {type(entry).__name__}, expected an object")
            for field in required:
                if field not in entry:
                    raise AnnotationError(f"{path}: entry {index} has no field {field!r} "
                                          f"(fields: {sorted(entry)})")
        entries.extend(data)
    return entries


def join_image_path(root: str | None, path: str) -> str:
    """``os.path.join(root, path)``; an absolute ``path`` overrides ``root`` as in the original."""
    return os.path.join(root, path) if root else path


def annotations_by_file(files: Iterable[str], required: Sequence[str]) -> Iterator[tuple[str, int, dict]]:
    """``(file, index in that file, entry)`` for every entry, checked as in :func:`load_annotations`."""
    for path in files:
        for index, entry in enumerate(load_annotations([path], required)):
            yield path, index, entry


def require_text(entry: Mapping[str, Any], field: str, path: str, index: int) -> str:
    """``entry[field]`` if a string (empty allowed); anything else is an error naming file, entry and field."""
    value = entry[field]
    if not isinstance(value, str):
        raise AnnotationError(f"{path}: entry {index} field {field!r} must be a string, got "
                              f"{type(value).__name__} {value!r}")
    return value
