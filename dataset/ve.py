"""SNLI-VE dataset: an image (Flickr30k id), a hypothesis and its entailment label."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from dataset.annotations import AnnotationError, as_file_list, join_image_path, load_annotations, open_rgb
from dataset.text import pre_caption
from dataset.transforms import build_transforms

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}


class VeDataset(Dataset):
    """Entries ``{"image": <id without extension>, "sentence": str, "label": str}``; the image file is
    ``image_root/<id>.jpg``. A sample is ``(image, sentence, label)`` with entailment 2, neutral 1,
    contradiction 0."""

    def __init__(self, ann_file: str | Sequence[str], transform: Callable[[Any], torch.Tensor], image_root: str,
                 max_words: int = 30, config_key: str = "train_file") -> None:
        files = as_file_list(ann_file, config_key)
        self.ann = load_annotations(files, required=("image", "sentence", "label"))
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.labels: list[int] = []
        for index, entry in enumerate(self.ann):
            if entry["label"] not in VE_LABELS:
                raise AnnotationError(f"{', '.join(files)}: entry {index} field 'label' must be one of "
                                      f"{sorted(VE_LABELS)}, got {entry['label']!r}")
            self.labels.append(VE_LABELS[entry["label"]])

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        entry = self.ann[index]
        image = self.transform(open_rgb(join_image_path(self.image_root, f"{entry['image']}.jpg")))
        return image, pre_caption(entry["sentence"], self.max_words), self.labels[index]


def create_ve_datasets(config: Mapping[str, Any]) -> tuple[VeDataset, VeDataset, VeDataset]:
    """``(train, val, test)``: the train split with the training augmentation, the others resized only."""
    transforms = build_transforms(config)
    root = config["image_root"]
    max_words = int(config.get("max_words", 30))
    return (
        VeDataset(config["train_file"], transforms["train"], root, max_words, "train_file"),
        VeDataset(config["val_file"], transforms["test"], root, max_words, "val_file"),
        VeDataset(config["test_file"], transforms["test"], root, max_words, "test_file"),
    )
