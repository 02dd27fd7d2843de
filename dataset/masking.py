"""BEiT-style block masking of the ViT patch grid for masked image modelling."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from configs.schema import patch_grid


class MaskingGenerator:
    """A 0/1 mask (1 = masked) of random blocks; ten failed draws stop it short of ``num_masking_patches``."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(v) for v in input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        low, high = self.log_aspect_ratio
        return (
            f"Generator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"max = {self.num_masking_patches}, {low:.3f} ~ {high:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: int) -> int:
        """Try up to ten times to add one block of at most ``max_mask_patches`` new cells."""
        delta = 0
        for _ in range(10):
            # uniform(a, b) with b < a samples [b, a]; the original relies on it
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new_cells = h * w - int(block.sum())
                if 0 < new_cells <= max_mask_patches:
                    block[...] = 1
                    delta += new_cells
                if delta > 0:
                    break
        return delta

    def __call__(self) -> np.ndarray:
        """Return a new int64 mask of shape ``(height, width)``."""
        mask = np.zeros(self.get_shape(), dtype=np.int64)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            budget = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, budget)
            if delta == 0:
                break
            mask_count += delta
        return mask


def masking_generator_from_config(config: Mapping[str, Any]) -> MaskingGenerator:
    """The pretraining mask generator for ``config``'s patch grid (null ``mask_max_aspect``: ``1 / mask_min_aspect``)."""
    window = patch_grid(config)
    max_aspect = config["mask_max_aspect"]
    return MaskingGenerator(
        (window, window),
        num_masking_patches=int(config["mask_num_patches"]),
        min_num_patches=int(config["mask_min_patches"]),
        max_num_patches=None,
        min_aspect=float(config["mask_min_aspect"]),
        max_aspect=None if max_aspect is None else float(max_aspect),
    )
