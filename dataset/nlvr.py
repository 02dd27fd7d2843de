"""NLVR2 dataset: a statement about two images and whether it is true."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from dataset.annotations import AnnotationError, as_file_list, join_image_path, load_annotations, open_rgb
from dataset.text import pre_caption
from dataset.transforms import build_transforms

NLVR_LABELS = {"True": 1, "False": 0}


class NlvrDataset(Dataset):
    """Entries ``{"images": [path0, path1], "sentence": str, "label": "True" | "False"}`` from one or more
    JSON files; a sample is ``(image0, image1, sentence, label)`` with label 1 for ``"True"``, 0 for
    ``"False"``."""

    def __init__(self, ann_file: str | Sequence[str], transform: Callable[[Any], torch.Tensor], image_root: str,
                 max_words: int = 30, config_key: str = "train_file") -> None:
        files = as_file_list(ann_file, config_key)
        self.ann = load_annotations(files, required=("images", "sentence", "label"))
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.labels: list[int] = []
        for index, entry in enumerate(self.ann):
            images = entry["images"]
            if not (isinstance(images, (list, tuple)) and len(images) == 2 and all(isinstance(p, str) for p in images)):
                raise AnnotationError(f"{', '.join(files)}: entry {index} field 'images' must be a list of two "
                                      f"image paths, got {images!r}")
            label = entry["label"]
            # the original maps every value other than "True" to 0; a typo (true, 1) would silently
            # become a negative, so only the two NLVR2 spellings are accepted
            if label not in NLVR_LABELS:
                raise AnnotationError(f"{', '.join(files)}: entry {index} field 'label' must be \"True\" or "
                                      f"\"False\", got {label!r}")
            self.labels.append(NLVR_LABELS[label])

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        entry = self.ann[index]
        image0 = self.transform(open_rgb(join_image_path(self.image_root, entry["images"][0])))
        image1 = self.transform(open_rgb(join_image_path(self.image_root, entry["images"][1])))
        return image0, image1, pre_caption(entry["sentence"], self.max_words), self.labels[index]


def create_nlvr_datasets(config: Mapping[str, Any]) -> tuple[NlvrDataset, NlvrDataset, NlvrDataset]:
    """``(train, val, test)``: the train split with the training augmentation, the others resized only."""
    transforms = build_transforms(config)
    root = config["image_root"]
    max_words = int(config.get("max_words", 30))
    return (
        NlvrDataset(config["train_file"], transforms["train"], root, max_words, "train_file"),
        NlvrDataset(config["val_file"], transforms["test"], root, max_words, "val_file"),
        NlvrDataset(config["test_file"], transforms["test"], root, max_words, "test_file"),
    )
