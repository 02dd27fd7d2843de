"""Webdataset tar shards (img2dataset layout) as a map-style sequence, indexed from tar headers (cached)."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from utils import atomic_write

SHARD_SUFFIX = ".tar"
STATS_SUFFIX = "_stats.json"
INDEX_SUFFIX = "_index.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
INDEX_VERSION = 1
CUT = -1  # the size recorded for a member whose data the tar file cuts short


class ShardError(ValueError):
    """A ``train_file`` entry that names no readable shards."""


class ShardSampleError(ValueError):
    """A shard sample without a usable image or caption (the message says which)."""


class ShardWarning(UserWarning):
    """A damaged shard, or a stats file that disagrees with its shard."""


def is_shard_source(entry: str) -> bool:
    """Whether a ``train_file`` entry names shards (a ``.tar`` path or brace pattern, or a folder)."""
    return entry.endswith(SHARD_SUFFIX) or os.path.isdir(entry)


def expand_shard_source(entry: str, key: str = "train_file") -> list[str]:
    """One entry's shards: a folder's ``.tar`` files or ``a/{00000..00009}.tar``, ``::``-joined."""
    if os.path.isdir(entry):
        shards = sorted(os.path.join(entry, name) for name in os.listdir(entry) if name.endswith(SHARD_SUFFIX))
        if not shards:
            raise ShardError(f"config key {key!r}: folder {entry!r} holds no {SHARD_SUFFIX} shards")
        return shards
    shards = expand_urls(entry)
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
        raise ShardError(f"config key {key!r}: {len(missing)} of the {len(shards)} shards of {entry!r} do not "
                         f"exist (first: {missing[0]!r})")
    return shards


def shard_stem(path: str) -> str:
    """``a/00000.tar`` -> ``a/00000``: the prefix of the shard's stats and index files."""
    return path[: -len(SHARD_SUFFIX)] if path.endswith(SHARD_SUFFIX) else path


@dataclass
class ShardIndex:
    """One shard's keys (tar order) and members; ``lost``: samples its stats count beyond the tar."""

    path: str
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, list[int]]] = field(default_factory=list)
    damage: str = ""
    lost: int = 0

    def __len__(self) -> int:
        return len(self.keys) + self.lost


def scan_shard(path: str) -> ShardIndex:
    """Index ``path`` from its tar headers; damage keeps earlier members (cut short: size :data:`CUT`)."""
    index = ShardIndex(path)
    positions: dict[str, int] = {}
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base, extension = base_plus_ext(info.name)
                if base is None:
                    continue
                if base not in positions:
                    positions[base] = len(index.keys)
                    index.keys.append(base)
                    index.members.append({})
                end = info.offset_data + info.size
                size = info.size if end <= file_size else CUT
                index.members[positions[base]][extension.lower()] = [info.offset_data, size]
                if size == CUT:
                    index.damage = f"member {info.name} is cut short at byte {file_size} of {end}"
    except (tarfile.TarError, EOFError) as exc:
        index.damage = f"{type(exc).__name__}: {exc}"
    return index


def _stat_key(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _cached_index(path: str) -> ShardIndex | None:
    cache = shard_stem(path) + INDEX_SUFFIX
    try:
        with open(cache, encoding="utf-8") as handle:
            data = json.load(handle)
        if data["version"] != INDEX_VERSION or data["tar"] != _stat_key(path):
            return None
        keys, members = list(data["keys"]), list(data["members"])
        if len(keys) != len(members):
            return None
        return ShardIndex(path, keys, members, str(data["damage"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_index_cache(index: ShardIndex) -> None:
    data = {"version": INDEX_VERSION, "tar": _stat_key(index.path), "keys": index.keys, "members": index.members,
            "damage": index.damage}
    text = json.dumps(data, separators=(",", ":")).encode("utf-8")
    with contextlib.suppress(OSError):  # a read-only data folder just goes without a cache
        atomic_write(shard_stem(index.path) + INDEX_SUFFIX, lambda handle: handle.write(text))


def stats_successes(path: str) -> int | None:
    """The ``successes`` count of the shard's ``_stats.json``, or ``None`` without a usable one."""
    stats = shard_stem(path) + STATS_SUFFIX
    if not os.path.isfile(stats):
        return None
    try:
        with open(stats, encoding="utf-8") as handle:
            count = json.load(handle)["successes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(ShardWarning(f"{stats}: no usable 'successes' count ({type(exc).__name__}: {exc}); "
                                   "the shard's length comes from the tar alone"), stacklevel=3)
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        warnings.warn(ShardWarning(f"{stats}: 'successes' must be a non-negative integer, got {count!r}; "
                                   "the shard's length comes from the tar alone"), stacklevel=3)
        return None
    return count


def load_index(path: str, cache: bool = True) -> ShardIndex:
    """The (cached) index of shard ``path``, stats-counted samples beyond the tar added as lost."""
    index = _cached_index(path) if cache else None
    if index is None:
        index = scan_shard(path)
        if cache:
            _write_index_cache(index)
    successes = stats_successes(path)
    if successes is not None and successes > len(index.keys):
        index.lost = successes - len(index.keys)
    if index.damage or index.lost:
        lost = (f"; {index.lost} samples counted by {shard_stem(path) + STATS_SUFFIX} are missing from it"
                if index.lost else "")
        warnings.warn(ShardWarning(f"shard {path} is damaged ({index.damage or 'fewer samples than its stats'})"
                                   f": {len(index.keys)} samples listed{lost}; unreadable ones are skipped and "
                                   "counted"), stacklevel=2)
    return index


class ShardSample(NamedTuple):
    """One sample's members as bytes (``None`` if cut short); ``key`` ``None``: a sample the tar lost."""

    shard: str
    key: str | None
    members: dict[str, bytes | None]
    where: str


class ShardSet:
    """The samples of a list of shards, in shard order and tar order within a shard, by position."""

    def __init__(self, shards: Sequence[str], cache: bool = True) -> None:
        self.indexes = [load_index(path, cache) for path in shards]
        self.starts = list(itertools.accumulate((len(index) for index in self.indexes), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, position: int) -> ShardSample:
        if not 0 <= position < len(self):
            raise IndexError(f"sample {position} of {len(self)} shard samples")
        shard = bisect.bisect_right(self.starts, position) - 1
        index = self.indexes[shard]
        local = position - self.starts[shard]
        if local >= len(index.keys):
            where = f"shard {index.path}, sample {local}"
            return ShardSample(index.path, None, {}, where)
        key = index.keys[local]
        members: dict[str, bytes | None] = {}
        with open(index.path, "rb") as handle:
            for extension, (offset, size) in index.members[local].items():
                if size == CUT:
                    members[extension] = None
                    continue
                handle.seek(offset)
                members[extension] = handle.read(size)
        return ShardSample(index.path, key, members, f"shard {index.path}, key {key}")


def sample_image(sample: ShardSample) -> tuple[str, bytes]:
    """``(member name, bytes)`` of the sample's image; :class:`ShardSampleError` says why there is none."""
    if sample.key is None:
        raise ShardSampleError("counted by the shard's stats file but missing from the tar (truncated?)")
    for extension in IMAGE_EXTENSIONS:
        if extension in sample.members:
            data = sample.members[extension]
            name = f"{sample.key}.{extension}"
            if data is None:
                raise ShardSampleError(f"image {name} is cut short (truncated tar)")
            return name, data
    raise ShardSampleError(f"no image member (members: {sorted(sample.members) or 'none'}; expected one of "
                           f"{', '.join(IMAGE_EXTENSIONS)})")


def sample_caption(sample: ShardSample, caption_key: str | None = None) -> str | list[str]:
    """The ``.txt`` caption or ``caption_key`` of the ``.json``; else :class:`ShardSampleError`."""
    if sample.key is None:
        raise ShardSampleError("counted by the shard's stats file but missing from the tar (truncated?)")
    extension = "txt" if caption_key is None else "json"
    name = f"{sample.key}.{extension}"
    if extension not in sample.members:
        raise ShardSampleError(f"no caption: no member {name}")
    data = sample.members[extension]
    if data is None:
        raise ShardSampleError(f"caption {name} is cut short (truncated tar)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardSampleError(f"caption {name} is not UTF-8 text: {exc}") from None
    if caption_key is None:
        return text
    try:
        metadata: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardSampleError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(metadata, dict) or caption_key not in metadata:
        raise ShardSampleError(f"no caption: {name} has no key {caption_key!r} (shard_caption_key)")
    caption = metadata[caption_key]
    if isinstance(caption, str) or isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return caption
    raise ShardSampleError(f"{name} key {caption_key!r} must be a string or a list of strings, got {caption!r}")
