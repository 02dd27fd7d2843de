"""Convert pretraining annotations between JSON + image files and webdataset shards (img2dataset layout)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, BinaryIO

from PIL import Image
from webdataset import TarWriter

from dataset.annotations import as_file_list
from dataset.pretrain import read_pretrain_entries
from dataset.shards import (
    IMAGE_EXTENSIONS,
    SHARD_SUFFIX,
    STATS_SUFFIX,
    ShardSampleError,
    ShardSet,
    ShardWarning,
    expand_shard_source,
    sample_caption,
    sample_image,
    shard_stem,
)
from utils import atomic_write

DEFAULT_SAMPLES_PER_SHARD = 10000
# fixed member times, owner and mode: the same input always gives the same shard bytes
MEMBER_MTIME = 0.0


def image_extension(path: str, data: bytes) -> str | None:
    """The member extension of an image file: its known suffix, else the format PIL recognises."""
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    try:
        with Image.open(io.BytesIO(data)) as img:
            found = (img.format or "").lower()
    except Exception:  # noqa: BLE001 - PIL raises many types for what is not an image
        return None
    found = "jpg" if found == "jpeg" else found
    return found if found in IMAGE_EXTENSIONS else None


def _write_shard(handle: BinaryIO, samples: list[dict[str, Any]]) -> None:
    with TarWriter(handle, encoder=False, mtime=MEMBER_MTIME) as writer:
        for sample in samples:
            writer.write(sample)


def json_to_shards(ann_files: str | Sequence[str], out_dir: str,
                   samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, url_base: str | None = None) -> dict[str, Any]:
    """Write pretraining JSON entries as shards; unreadable images are left out and counted as failed."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    files = as_file_list(ann_files, "train_file")
    entries = [(path, index, entry) for path in files for index, entry in enumerate(read_pretrain_entries(path))]
    digits = max(4, len(str(samples_per_shard - 1)))
    os.makedirs(out_dir, exist_ok=True)
    shards: list[str] = []
    successes = failed = 0
    for shard_id, first in enumerate(range(0, len(entries), samples_per_shard)):
        rows = entries[first:first + samples_per_shard]
        samples = []
        for row, (path, index, entry) in enumerate(rows):
            key = f"{shard_id:05d}{row:0{digits}d}"
            try:
                with open(entry["image"], "rb") as handle:
                    data = handle.read()
            except (OSError, TypeError) as exc:
                warnings.warn(ShardWarning(f"{path}: entry {index} left out: cannot read image {entry['image']!r} "
                                           f"({type(exc).__name__}: {exc})"), stacklevel=2)
                continue
            extension = image_extension(str(entry["image"]), data)
            if extension is None:
                warnings.warn(ShardWarning(f"{path}: entry {index} left out: {entry['image']!r} is not an image "
                                           "of a known format"), stacklevel=2)
                continue
            caption = entry["caption"]
            text = caption if isinstance(caption, str) else (caption[0] if caption else "")
            url = entry["image"] if url_base is None else os.path.relpath(entry["image"], url_base)
            metadata = {"key": key, "status": "success", "caption": caption, "url": url,
                        "error_message": None}
            samples.append({"__key__": key, extension: data, "txt": text.encode("utf-8"),
                            "json": json.dumps(metadata).encode("utf-8")})
        shard = os.path.join(out_dir, f"{shard_id:05d}{SHARD_SUFFIX}")
        atomic_write(shard, lambda handle, s=samples: _write_shard(handle, s))
        stats = {"count": len(rows), "successes": len(samples), "failed_to_download": len(rows) - len(samples),
                 "failed_to_resize": 0}
        stats_text = (json.dumps(stats, indent=4) + "\n").encode("utf-8")
        atomic_write(shard_stem(shard) + STATS_SUFFIX, lambda handle, t=stats_text: handle.write(t))
        shards.append(shard)
        successes += len(samples)
        failed += len(rows) - len(samples)
    return {"shards": shards, "successes": successes, "failed": failed}


def shards_to_json(sources: str | Sequence[str], out_dir: str, caption_key: str | None = None,
                   name: str = "annotations.json") -> dict[str, Any]:
    """Write shard samples as image files and one JSON file; those without image or caption are skipped."""
    entries: list[dict[str, Any]] = []
    skipped = 0
    root = os.path.abspath(out_dir)
    for source in as_file_list(sources, "shards"):
        shard_set = ShardSet(expand_shard_source(source, "shards"), cache=False)
        for position in range(len(shard_set)):
            sample = shard_set.read(position)
            try:
                member, data = sample_image(sample)
                caption = sample_caption(sample, caption_key)
            except ShardSampleError as exc:
                warnings.warn(ShardWarning(f"{sample.where} left out: {exc}"), stacklevel=2)
                skipped += 1
                continue
            shard_name = os.path.basename(shard_stem(sample.shard))
            target = os.path.join(root, "images", shard_name, member.replace("/", "_"))
            atomic_write(target, lambda handle, d=data: handle.write(d))
            entries.append({"image": target, "caption": caption})
    annotations = os.path.join(root, name)
    text = json.dumps(entries).encode("utf-8")
    atomic_write(annotations, lambda handle: handle.write(text))
    return {"annotations": annotations, "written": len(entries), "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Convert pretraining data between JSON + images and shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_shards = commands.add_parser("to-shards", help="JSON annotation files and their images -> shards")
    to_shards.add_argument("--train_file", nargs="+", required=True, help="pretraining JSON files")
    to_shards.add_argument("--out_dir", required=True)
    to_shards.add_argument("--samples_per_shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    to_shards.add_argument("--url_base", default=None, help="record image paths relative to this folder")
    to_json = commands.add_parser("to-json", help="shards -> image files and one JSON annotation file")
    to_json.add_argument("--shards", nargs="+", required=True, help="shard paths, brace patterns or folders")
    to_json.add_argument("--out_dir", required=True)
    to_json.add_argument("--caption_key", default=None,
                         help="read the caption from this key of the .json members (default: the .txt members)")
    args = parser.parse_args(argv)
    if args.command == "to-shards":
        result = json_to_shards(args.train_file, args.out_dir, args.samples_per_shard, args.url_base)
        print(f"{len(result['shards'])} shards with {result['successes']} samples in {args.out_dir}"
              f" ({result['failed']} entries left out)")
    else:
        result = shards_to_json(args.shards, args.out_dir, args.caption_key)
        print(f"{result['written']} samples written to {result['annotations']} ({result['skipped']} left out)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
