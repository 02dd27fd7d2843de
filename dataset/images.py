"""Reading dataset images: RGB conversion, a pixel-count guard, truncated JPEGs loaded as the original."""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, BinaryIO

from PIL import Image, ImageFile

from configs.schema import COMMON_OPTIONAL

ImageFile.LOAD_TRUNCATED_IMAGES = True
Image.MAX_IMAGE_PIXELS = None

# 2**28 pixels (16384^2, 768 MiB as RGB): fits real photos, refuses crafted huge headers.
MAX_IMAGE_PIXELS_KEY = "max_image_pixels"
DEFAULT_MAX_IMAGE_PIXELS = COMMON_OPTIONAL[MAX_IMAGE_PIXELS_KEY]

# first failures reported one by one, later ones only when the count reaches a power of ten
REPORT_FIRST = 10

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file that is missing, empty, not an image, corrupt or over the pixel limit."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


class UnreadableImageWarning(UserWarning):
    """A training sample was skipped because its image could not be read."""


def max_pixels_from_config(config: Any) -> int | None:
    """The ``max_image_pixels`` of a config: a positive integer, or ``None`` (``null`` / 0: no limit)."""
    return check_max_pixels(config[MAX_IMAGE_PIXELS_KEY])


def check_max_pixels(value: Any) -> int | None:
    """Validate a pixel limit; ``None`` and 0 disable the guard."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config key {MAX_IMAGE_PIXELS_KEY!r} must be a positive integer, or null / 0 for no "
                         f"limit, got {value!r}")
    return value


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; 16-bit grayscale is scaled down by 256 rather than clipped."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        # palette images with transparency go through RGBA, as PIL recommends
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_rgb(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, check against ``max_pixels`` and decode ``path`` to RGB, or :class:`UnreadableImageError`."""
    if not os.path.isfile(path):
        raise UnreadableImageError(path, "no such file" if not os.path.exists(path) else "not a regular file")
    if os.path.getsize(path) == 0:
        raise UnreadableImageError(path, "empty file")
    return decode_rgb(path, path, max_pixels)


def decode_rgb(source: str | BinaryIO, name: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
               ) -> Image.Image:
    """Decode ``source`` (a path or binary file) to RGB, checked as :func:`read_rgb`; errors name ``name``."""
    try:
        with Image.open(source) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise UnreadableImageError(name, f"{width}x{height} = {width * height} pixels exceeds "
                                                 f"{MAX_IMAGE_PIXELS_KEY}={max_pixels} (decompression-bomb guard)")
            img.load()
            return to_rgb(img)
    except UnreadableImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImageError(name, f"{type(exc).__name__}: {exc}") from exc


class ImageReader:
    """Reads one dataset's images; ``skip_unreadable`` (training): ``None`` and a rate-limited warning."""

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, skip_unreadable: bool = True) -> None:
        self.max_pixels = check_max_pixels(max_pixels)
        self.skip_unreadable = skip_unreadable
        self.failures = 0

    def __call__(self, path: str, index: int, sample: str = "") -> Image.Image | None:
        """The RGB image for entry ``index`` (``sample`` adds e.g. a question id), or ``None`` if skipped."""
        try:
            return read_rgb(path, self.max_pixels)
        except UnreadableImageError as exc:
            where = f"dataset entry {index}{f', {sample}' if sample else ''}"
            if not self.skip_unreadable:
                raise UnreadableImageError(path, f"{exc.reason} ({where}; evaluation needs every image)") from exc
            return self.skip(str(exc), where)

    def decode(self, data: bytes, name: str, where: str) -> Image.Image | None:
        """The RGB image encoded in ``data``, or ``None`` with a warning when unreadable (training only)."""
        try:
            return decode_rgb(io.BytesIO(data), name, self.max_pixels)
        except UnreadableImageError as exc:
            if not self.skip_unreadable:
                raise
            return self.skip(str(exc), where)

    def skip(self, reason: str, where: str) -> None:
        """Count a skipped sample and warn (rate-limited) with ``where`` it is and the ``reason``."""
        self.failures += 1
        if self._should_report(self.failures):
            later = "; later ones are reported at counts 100, 1000, ..." if self.failures == REPORT_FIRST else ""
            warnings.warn(UnreadableImageWarning(
                f"skipping sample ({where}): {reason} [unreadable image {self.failures} in this process{later}]"
            ), stacklevel=4)
        return None

    @staticmethod
    def _should_report(count: int) -> bool:
        if count <= REPORT_FIRST:
            return True
        while count % 10 == 0:
            count //= 10
        return count == 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_pixels={self.max_pixels}, skip_unreadable={self.skip_unreadable})"
