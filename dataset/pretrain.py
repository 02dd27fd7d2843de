"""Pretraining dataset: image-caption pairs with the ViT view, the d-VAE view and the patch mask."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.annotations import as_file_list, load_annotations, open_rgb
from dataset.masking import masking_generator_from_config
from dataset.text import pre_caption
from dataset.transforms import PretrainViews


class PretrainDataset(Dataset):
    """Entries ``{"image": path, "caption": str | [str, ...]}`` from one or more JSON files.

    A sample is ``(image, caption, image_for_tokenization, masked_positions)``; an image that cannot
    be read yields ``None`` (with a warning naming the file) for the safe collate to replace and count.
    """

    def __init__(self, ann_file: str | Sequence[str], views: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 mask_generator: Callable[[], np.ndarray], max_words: int = 30) -> None:
        self.ann = load_annotations(as_file_list(ann_file, "train_file"), required=("image", "caption"))
        self.views = views
        self.mask_generator = mask_generator
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int):
        entry = self.ann[index]
        caption = entry["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption) if caption else ""
        caption = pre_caption(caption, self.max_words)
        try:
            image = open_rgb(entry["image"])
            image, image_for_tokenization = self.views(image)
            masked = self.mask_generator()
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and counted
            warnings.warn(f"skipping sample {index}: cannot read image {entry['image']!r} "
                          f"({exc.__class__.__name__}: {exc})", stacklevel=2)
            return None
        return image, caption, image_for_tokenization, masked


def create_pretrain_dataset(config: Mapping[str, Any]) -> PretrainDataset:
    return PretrainDataset(config["train_file"], PretrainViews(config), masking_generator_from_config(config),
                           max_words=int(config.get("max_words", 30)))
