"""RandAugment on RGB ``uint8`` HWC arrays with the original op table and numpy draw order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

MAX_LEVEL = 10
TRANSLATE_CONST = 10
FILL = (128, 128, 128)
APPLY_PROB = 0.5

# Every op of the original table, in its order (the default ``augs``).
ALL_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "TranslateX",
    "TranslateY",
    "Posterize",
    "ShearY",
)

PIPELINE_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def identity(img: np.ndarray) -> np.ndarray:
    return img


def _per_channel_lut(img: np.ndarray, make_table: Callable[[np.ndarray], np.ndarray | None]) -> np.ndarray:
    channels = []
    for c in range(img.shape[2]):
        ch = img[:, :, c]
        table = make_table(ch)
        channels.append(ch if table is None else table[ch])
    return np.ascontiguousarray(np.stack(channels, axis=2))


def auto_contrast(img: np.ndarray, fix_offset: bool = False) -> np.ndarray:
    """Stretch each channel to ``[0, 255]``, with the original's uint8 wrap unless ``fix_offset``."""

    def table_for(ch: np.ndarray) -> np.ndarray | None:
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            return None
        scale = 255 / (high - low)
        neg_low = -low if fix_offset else (-low) % 256
        table = np.arange(256) * scale + neg_low * scale
        return np.clip(table, 0, 255).astype(np.uint8)

    return _per_channel_lut(img, table_for)


def equalize(img: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation with the same lookup table as ``PIL.ImageOps.equalize``."""

    def table_for(ch: np.ndarray) -> np.ndarray | None:
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            return None
        shifted = np.empty_like(hist)
        shifted[0] = step // 2
        shifted[1:] = hist[:-1]
        return np.clip(np.cumsum(shifted) // step, 0, 255).astype(np.uint8)

    return _per_channel_lut(img, table_for)


def _warp(img: np.ndarray, matrix: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    height, width = img.shape[:2]
    return cv2.warpAffine(
        img, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=tuple(int(v) for v in fill)
    )


def rotate(img: np.ndarray, degrees: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Rotate counter-clockwise by ``degrees`` about ``(W/2, H/2)``; uncovered pixels get ``fill``."""
    height, width = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1)
    return _warp(img, matrix, fill)


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert every value at or above ``threshold``."""
    values = np.arange(256)
    table = np.where(values < threshold, values, 255 - values).clip(0, 255).astype(np.uint8)
    return table[img]


def color(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a grey version (weights in OpenCV's BGR order applied to RGB, as the original)."""
    matrix = np.float32(
        [[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]
    ) * factor + np.float32([[0.114], [0.587], [0.299]])
    return np.matmul(img, matrix).clip(0, 255).astype(np.uint8)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale values about the weighted mean (BGR grey weights on RGB data, like the original)."""
    mean = np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    table = ((np.arange(256) - mean) * factor + mean).clip(0, 255).astype(np.uint8)
    return table[img]


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Multiply every value by ``factor`` (float32 arithmetic, clipped, truncated)."""
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def _wrap_to_uint8(values: np.ndarray) -> np.ndarray:
    # float -> uint8 cast as on x86 (truncate, keep the low byte), made explicit
    return (np.trunc(values).astype(np.int64) & 0xFF).astype(np.uint8)


def sharpness(img: np.ndarray, factor: float, clip: bool = False) -> np.ndarray:
    """Blend the interior with a 3x3 smoothed copy; uint8 wrap-around as the original unless ``clip``."""
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    degenerate = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    smooth = degenerate.astype(np.float32)[1:-1, 1:-1, :]
    out[1:-1, 1:-1, :] = smooth + factor * (out[1:-1, 1:-1, :] - smooth)
    if clip:
        return np.clip(out, 0, 255).astype(np.uint8)
    return _wrap_to_uint8(out)


def shear_x(img: np.ndarray, factor: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Horizontal shear ``x' = x + factor * y``."""
    return _warp(img, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(img: np.ndarray, factor: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Vertical shear ``y' = y + factor * x``."""
    return _warp(img, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(img: np.ndarray, offset: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Shift the content left by ``offset`` pixels (right for a negative offset)."""
    return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(img: np.ndarray, offset: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Shift the content up by ``offset`` pixels (down for a negative offset)."""
    return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top ``bits`` bits of every value."""
    mask = np.uint8((255 << (8 - bits)) & 0xFF)  # the low byte, as the original's uint8 cast on old numpy
    return np.bitwise_and(img, mask)


OP_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Rotate": rotate,
    "Solarize": solarize,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Posterize": posterize,
    "ShearY": shear_y,
}


def level_to_args(name: str, level: float) -> tuple[Any, ...]:
    """Arguments of op ``name`` at ``level``; shear/translate/rotate draw one sign as the original."""
    ratio = level / MAX_LEVEL
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (ratio * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        value = ratio * 0.3
        if np.random.random() > 0.5:
            value = -value
        return (value, FILL)
    if name in ("TranslateX", "TranslateY"):
        value = ratio * float(TRANSLATE_CONST)
        if np.random.random() > 0.5:
            value = -value
        return (value, FILL)
    if name == "Rotate":
        value = ratio * 30
        if np.random.random() < 0.5:
            value = -value
        return (value, FILL)
    if name == "Solarize":
        return (int(ratio * 256),)
    if name == "Posterize":
        return (int(ratio * 4),)
    raise ValueError(f"unknown RandAugment op {name!r}")


class RandomAugment:
    """Apply ``N`` ops drawn from ``augs``, each skipped with probability 0.5; returns HWC ``uint8``."""

    def __init__(
        self,
        N: int = 2,
        M: float = 7,
        isPIL: bool = False,
        augs: Sequence[str] | None = None,
        clip_sharpness: bool = False,
        fix_autocontrast: bool = False,
    ) -> None:
        self.N = N
        self.M = M
        self.isPIL = isPIL
        self.augs = list(augs) if augs else list(ALL_OPS)
        unknown = [name for name in self.augs if name not in OP_FUNCS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops: {unknown}")
        self.clip_sharpness = clip_sharpness
        self.fix_autocontrast = fix_autocontrast

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self.N}, M={self.M}, augs={self.augs}, "
            f"clip_sharpness={self.clip_sharpness}, fix_autocontrast={self.fix_autocontrast})"
        )

    def get_random_ops(self) -> list[str]:
        """Draw the ``N`` op names (numpy global RNG, with replacement)."""
        return [str(name) for name in np.random.choice(self.augs, self.N)]

    def apply(self, name: str, img: np.ndarray, *args: Any) -> np.ndarray:
        """Run op ``name`` with explicit arguments, honouring the constructor's fix flags."""
        if name == "Sharpness":
            return sharpness(img, *args, clip=self.clip_sharpness)
        if name == "AutoContrast":
            return auto_contrast(img, *args, fix_offset=self.fix_autocontrast)
        return OP_FUNCS[name](img, *args)

    def __call__(self, img: Image.Image | np.ndarray) -> np.ndarray:
        if self.isPIL or isinstance(img, Image.Image):
            img = np.array(img)
        if img.ndim != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an HWC uint8 image, got shape {img.shape} and dtype {img.dtype}")
        # OpenCV needs contiguous memory (e.g. after a numpy flip).
        img = np.ascontiguousarray(img)
        for name in self.get_random_ops():
            if np.random.random() > APPLY_PROB:
                continue
            img = self.apply(name, img, *level_to_args(name, self.M))
        return img
