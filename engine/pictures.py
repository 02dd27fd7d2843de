"""Pictures of inference results, drawn with PIL: a contact sheet of ranked images and a Grad-CAM heat map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Side of a contact-sheet thumbnail, the gap around it and the height of its caption band (pixels).
THUMB = 160
GAP = 8
CAPTION_HEIGHT = 28
#: Heat-map pictures of smaller images are enlarged to at least this width.
MIN_WIDTH = 320


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str], title: str = "",
                  thumb: int = THUMB) -> Image.Image:
    """``images`` side by side as thumbnails on a white sheet, captions below and ``title`` above."""
    if len(images) != len(captions):
        raise ValueError("contact_sheet needs one caption per image")
    width = max(1, len(images)) * (thumb + GAP) + GAP
    height = thumb + 2 * CAPTION_HEIGHT + 2 * GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, GAP), title, fill="black")
    top = GAP + CAPTION_HEIGHT
    for n, (image, caption) in enumerate(zip(images, captions)):
        left = GAP + n * (thumb + GAP)
        sheet.paste(image.convert("RGB").resize((thumb, thumb), Image.Resampling.BICUBIC), (left, top))
        draw.text((left, top + thumb + 4), caption, fill="black")
    return sheet


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 colours of a heat map scaled to its own range: blue (low) to red (high)."""
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    red = np.clip(1.5 - np.abs(4 * scaled - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * scaled - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * scaled - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def display_scale(width: int, min_width: int = MIN_WIDTH) -> int:
    """The whole factor that enlarges an image ``width`` pixels wide to at least ``min_width``."""
    return max(1, math.ceil(min_width / max(width, 1)))


def heat_map_picture(image: Image.Image, heat: np.ndarray, caption: str, opacity: float = 0.5) -> Image.Image:
    """``heat`` (``(height, width)``) coloured over ``image``, caption below, enlarged by :func:`display_scale`."""
    base = image.convert("RGB")
    if heat.shape != (base.height, base.width):
        raise ValueError(f"the heat map is {heat.shape}, the image {(base.height, base.width)}")
    overlay = Image.blend(base, Image.fromarray(heat_colours(heat.astype(np.float32))), opacity)
    scale = display_scale(base.width)
    overlay = overlay.resize((scale * base.width, scale * base.height), Image.Resampling.BICUBIC)
    picture = Image.new("RGB", (overlay.width, overlay.height + CAPTION_HEIGHT), "white")
    picture.paste(overlay, (0, 0))
    ImageDraw.Draw(picture).text((4, overlay.height + 4), caption, fill="black")
    return picture
