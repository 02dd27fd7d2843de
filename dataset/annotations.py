"""Reading annotation JSON files with errors that name the file, the entry and the field."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image


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


def open_rgb(path: str) -> Image.Image:
    """Open an image file and convert it to RGB (grayscale, palette, RGBA, CMYK, 16-bit all handled)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = img.point(lambda v: v * (1 / 256)).convert("L")
        return img.convert("RGB")
