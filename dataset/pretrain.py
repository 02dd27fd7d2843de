"""Pretraining dataset: image-caption pairs with the ViT view, the d-VAE view and the patch mask."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from configs.schema import with_defaults
from dataset.annotations import AnnotationError, annotations_by_file, as_file_list, require_text
from dataset.collate import SafeCollate
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, max_pixels_from_config
from dataset.masking import masking_generator_from_config
from dataset.text import pre_caption
from dataset.transforms import PretrainViews


class PretrainDataset(Dataset):
    """``(image, caption, image_for_tokenization, masked_positions)`` from ``{"image", "caption"}`` entries.
    An unreadable image yields ``None`` for :attr:`collate_fn`; an empty caption (list) gives ``""``."""

    def __init__(self, ann_file: str | Sequence[str], views: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 mask_generator: Callable[[], np.ndarray], max_words: int = 30,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.ann: list[dict] = []
        for path, index, entry in annotations_by_file(as_file_list(ann_file, "train_file"), ("image", "caption")):
            require_text(entry, "image", path, index)
            caption = entry["caption"]
            if not (isinstance(caption, str) or isinstance(caption, list) and all(isinstance(c, str) for c in caption)):
                raise AnnotationError(f"{path}: entry {index} field 'caption' must be a string or a list of strings, "
                                      f"got {caption!r}")
            self.ann.append(entry)
        self.views = views
        self.mask_generator = mask_generator
        self.max_words = max_words
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=True)
        self.collate_fn = SafeCollate()

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int):
        entry = self.ann[index]
        caption = entry["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption) if caption else ""
        caption = pre_caption(caption, self.max_words)
        image = self.read_image(entry["image"], index)
        if image is None:
            return None
        image, image_for_tokenization = self.views(image)
        return image, caption, image_for_tokenization, self.mask_generator()


def create_pretrain_dataset(config: Mapping[str, Any]) -> PretrainDataset:
    config = with_defaults(config, "pretrain")
    return PretrainDataset(config["train_file"], PretrainViews(config), masking_generator_from_config(config),
                           max_words=int(config["max_words"]),
                           max_image_pixels=max_pixels_from_config(config))
