"""Bad files for the bad-input campaign: broken, unusual and oversized images generated from a demo image,
each with clean reference images of what a correct read gives."""

from __future__ import annotations

import io
import math
import random
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# PIL's own default limit, used only when neither the config nor the schema names max_image_pixels
PIL_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def image_pixel_limit(config: dict[str, Any], task: str) -> tuple[int, str]:
    """The pixel limit the datasets should enforce for ``config`` and where it comes from."""
    if "max_image_pixels" in config and config["max_image_pixels"]:
        return int(config["max_image_pixels"]), "config"
    try:
        from configs.schema import COMMON_OPTIONAL, TASK_SCHEMAS, canonical_task

        optional = {**COMMON_OPTIONAL, **TASK_SCHEMAS[canonical_task(task)].optional}
    except (ImportError, KeyError):
        optional = {}
    if optional.get("max_image_pixels"):
        return int(optional["max_image_pixels"]), "schema default"
    return PIL_DEFAULT_MAX_PIXELS, "PIL default (no max_image_pixels configured)"


@lru_cache(maxsize=4)
def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels, a few kilobytes on disk."""
    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@dataclass
class BadImage:
    """A generated image file; ``references`` name clean PNG files holding what a correct read gives."""

    path: Path
    references: dict[str, Path]
    note: str = ""


def _encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _save_reference(image: Any, path: Path) -> Path:
    image.convert("RGB").save(path, format="PNG")
    return path


def make_bad_image(kind: str, folder: Path, stem: str, rng: random.Random, source_path: str,
                   max_pixels: int, extension: str = "") -> BadImage:
    """Write the bad image of ``kind`` (from the demo image ``source_path``) and its references.

    ``extension`` forces the file name extension (a dataset that appends ``.jpg`` to its entries);
    otherwise it follows the format, as real files mostly do.
    """
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(source_path) as opened:
        source = opened.convert("RGB")
    ext = ".png"
    if kind in ("truncated_jpeg", "text_as_jpg", "cmyk", "exif_rotated") or (kind in ("missing", "random_bytes")
                                                                            and rng.random() < 0.5):
        ext = ".jpg"
    ext = extension or ext
    path = folder / f"{stem}{ext}"
    ref = folder / f"{stem}_reference{ext}"
    refs: dict[str, Path] = {}
    note = ""
    if kind == "missing":
        pass
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
    elif kind == "text_as_jpg":
        path.write_text("this is a caption file, not a picture\n" * rng.randint(1, 50), encoding="utf-8")
    elif kind in ("truncated_jpeg", "truncated_png"):
        full = _encode(source, "JPEG", quality=95) if kind == "truncated_jpeg" else _encode(source, "PNG")
        cut = rng.randrange(1, len(full))
        path.write_bytes(full[:cut])
        with Image.open(io.BytesIO(full)) as decoded:
            refs["full"] = _save_reference(decoded, ref)
        note = f"cut at byte {cut} of {len(full)}"
    elif kind == "grayscale":
        gray = source.convert("L")
        gray.save(path, format="PNG")
        refs["gray"] = _save_reference(gray, ref)
    elif kind == "rgba":
        rgba = source.copy()
        rgba.putalpha(255)
        rgba.save(path, format="PNG")
        refs["rgb"] = _save_reference(source, ref)
    elif kind == "cmyk":
        source.convert("CMYK").save(path, format="JPEG", quality=95)
        refs["rgb"] = _save_reference(source, ref)
    elif kind == "i16":
        gray = np.asarray(source.convert("L"), dtype=np.uint16)
        low = np.array([[rng.getrandbits(8) for _ in range(gray.shape[1])] for _ in range(gray.shape[0])],
                       dtype=np.uint16)
        Image.fromarray(gray * 256 + low).save(path, format="PNG")
        refs["gray"] = _save_reference(Image.fromarray(gray.astype(np.uint8), "L"), ref)
    elif kind == "palette":
        colors = rng.choice((2, 16, 64, 256))
        palette = source.quantize(colors=colors)
        palette.save(path, format="PNG")
        refs["rgb"] = _save_reference(palette, ref)
        note = f"{colors} colours"
    elif kind == "one_bit":
        bits = source.convert("1")
        bits.save(path, format="PNG")
        refs["rgb"] = _save_reference(bits, ref)
    elif kind == "huge":
        side = math.isqrt(max_pixels) + 1
        path.write_bytes(huge_png(side + 1, side))
        note = f"{side + 1}x{side} = {(side + 1) * side} pixels > limit {max_pixels}"
    elif kind == "exif_rotated":
        orientation = rng.randint(2, 8)
        exif = Image.Exif()
        exif[0x0112] = orientation
        path.write_bytes(_encode(source, "JPEG", quality=95, exif=exif.tobytes()))
        with Image.open(path) as decoded:
            decoded.load()
            refs["raw orientation, as the original"] = _save_reference(decoded, folder / f"{stem}_raw{ext}")
            refs["EXIF orientation applied"] = _save_reference(ImageOps.exif_transpose(decoded),
                                                               folder / f"{stem}_turned{ext}")
        note = f"EXIF orientation {orientation}"
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return BadImage(path, refs, note)
