"""NLVR2 dataset: a statement about two images and whether it is true."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from configs.schema import with_defaults
from dataset.annotations import (
    AnnotationError,
    annotations_by_file,
    as_file_list,
    join_image_path,
    require_text,
)
from dataset.collate import SafeCollate
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, max_pixels_from_config
from dataset.text import pre_caption
from dataset.transforms import build_transforms

NLVR_LABELS = {"True": 1, "False": 0}


class NlvrDataset(Dataset):
    """``(image0, image1, sentence, label)``; unreadable: ``None`` if ``skip_unreadable``, else raise."""

    def __init__(self, ann_file: str | Sequence[str], transform: Callable[[Any], torch.Tensor], image_root: str,
                 max_words: int = 30, config_key: str = "train_file",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, skip_unreadable: bool | None = None) -> None:
        self.ann: list[dict] = []
        self.labels: list[int] = []
        for path, index, entry in annotations_by_file(as_file_list(ann_file, config_key),
                                                      required=("images", "sentence", "label")):
            images = entry["images"]
            if not (isinstance(images, (list, tuple)) and len(images) == 2 and all(isinstance(p, str) for p in images)):
                raise AnnotationError(f"{path}: entry {index} field 'images' must be a list of two image paths, "
                                      f"got {images!r}")
            require_text(entry, "sentence", path, index)
            label = entry["label"]
            # only the two NLVR2 spellings: a typo must not silently become a negative
            if label not in NLVR_LABELS:
                raise AnnotationError(f"{path}: entry {index} field 'label' must be \"True\" or \"False\", "
                                      f"got {label!r}")
            self.ann.append(entry)
            self.labels.append(NLVR_LABELS[label])
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        skip = config_key == "train_file" if skip_unreadable is None else skip_unreadable
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=skip)
        self.collate_fn = SafeCollate() if skip else None

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, int] | None:
        entry = self.ann[index]
        image0 = self.read_image(join_image_path(self.image_root, entry["images"][0]), index)
        image1 = self.read_image(join_image_path(self.image_root, entry["images"][1]), index)
        if image0 is None or image1 is None:
            return None
        image0 = self.transform(image0)  # first, as the original (RandAugment draw order)
        image1 = self.transform(image1)
        return image0, image1, pre_caption(entry["sentence"], self.max_words), self.labels[index]


def create_nlvr_datasets(config: Mapping[str, Any]) -> tuple[NlvrDataset, NlvrDataset, NlvrDataset]:
    """``(train, val, test)``: the train split with the training augmentation, the others resized only."""
    config = with_defaults(config, "nlvr")
    transforms = build_transforms(config)
    root = config["image_root"]
    max_words = int(config["max_words"])
    pixels = max_pixels_from_config(config)
    return (
        NlvrDataset(config["train_file"], transforms["train"], root, max_words, "train_file", pixels),
        NlvrDataset(config["val_file"], transforms["test"], root, max_words, "val_file", pixels),
        NlvrDataset(config["test_file"], transforms["test"], root, max_words, "test_file", pixels),
    )
