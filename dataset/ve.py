"""SNLI-VE dataset: an image (Flickr30k id), a hypothesis and its entailment label."""

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

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}


class VeDataset(Dataset):
    """``(image, sentence, label)``, image ``image_root/<id>.jpg``; unreadable: ``None`` or raise."""

    def __init__(self, ann_file: str | Sequence[str], transform: Callable[[Any], torch.Tensor], image_root: str,
                 max_words: int = 30, config_key: str = "train_file",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, skip_unreadable: bool | None = None) -> None:
        self.ann: list[dict] = []
        self.labels: list[int] = []
        for path, index, entry in annotations_by_file(as_file_list(ann_file, config_key),
                                                      required=("image", "sentence", "label")):
            if isinstance(entry["image"], bool) or not isinstance(entry["image"], (str, int)):
                raise AnnotationError(f"{path}: entry {index} field 'image' must be an image id (a string or an "
                                      f"integer), got {entry['image']!r}")
            require_text(entry, "sentence", path, index)
            if entry["label"] not in VE_LABELS:
                raise AnnotationError(f"{path}: entry {index} field 'label' must be one of {sorted(VE_LABELS)}, "
                                      f"got {entry['label']!r}")
            self.ann.append(entry)
            self.labels.append(VE_LABELS[entry["label"]])
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        skip = config_key == "train_file" if skip_unreadable is None else skip_unreadable
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=skip)
        self.collate_fn = SafeCollate() if skip else None

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int] | None:
        entry = self.ann[index]
        image = self.read_image(join_image_path(self.image_root, f"{entry['image']}.jpg"), index)
        if image is None:
            return None
        return self.transform(image), pre_caption(entry["sentence"], self.max_words), self.labels[index]


def create_ve_datasets(config: Mapping[str, Any]) -> tuple[VeDataset, VeDataset, VeDataset]:
    """``(train, val, test)``: the train split with the training augmentation, the others resized only."""
    config = with_defaults(config, "ve")
    transforms = build_transforms(config)
    root = config["image_root"]
    max_words = int(config["max_words"])
    pixels = max_pixels_from_config(config)
    return (
        VeDataset(config["train_file"], transforms["train"], root, max_words, "train_file", pixels),
        VeDataset(config["val_file"], transforms["test"], root, max_words, "val_file", pixels),
        VeDataset(config["test_file"], transforms["test"], root, max_words, "test_file", pixels),
    )
