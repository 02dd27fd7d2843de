"""Image-text retrieval datasets (COCO / Flickr30k format) as the original ``create_dataset("re")``."""

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

Transform = Callable[[Any], torch.Tensor]


def _image_id_key(value: Any, path: str, index: int) -> Any:
    """A hashable key for a JSON ``image_id`` (lists, as JSON arrays, become tuples)."""
    if isinstance(value, list):
        return tuple(_image_id_key(v, path, index) for v in value)
    if isinstance(value, dict):
        raise AnnotationError(f"{path}: entry {index} has an object as 'image_id' ({value!r}); "
                              "expected a number or a string")
    return value


class RetrievalTrainDataset(Dataset):
    """``(image, caption, image index)``; captions of one ``image_id`` share its index (first-seen order)."""

    def __init__(self, ann_file: str | Sequence[str], transform: Transform, image_root: str,
                 max_words: int = 30, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.ann: list[dict] = []
        self.img_ids: dict[Any, int] = {}
        files = as_file_list(ann_file, "train_file")
        for path, index, entry in annotations_by_file(files, required=("image", "caption", "image_id")):
            require_text(entry, "image", path, index)
            if not isinstance(entry["caption"], str):
                raise AnnotationError(f"{path}: entry {index} has a {type(entry['caption']).__name__} "
                                      "'caption'; training entries hold one caption string each")
            key = _image_id_key(entry["image_id"], path, index)
            self.img_ids.setdefault(key, len(self.img_ids))
            self.ann.append(dict(entry, _id_key=key))
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=True)
        self.collate_fn = SafeCollate()

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int] | None:
        entry = self.ann[index]
        image = self.read_image(join_image_path(self.image_root, entry["image"]), index)
        if image is None:
            return None
        return self.transform(image), pre_caption(entry["caption"], self.max_words), self.img_ids[entry["_id_key"]]


class RetrievalEvalDataset(Dataset):
    """``(image, image index)``; ``text``: every caption, ``txt2img[t]``/``img2txt[i]`` map between them."""

    def __init__(self, ann_file: str | Sequence[str], transform: Transform, image_root: str,
                 max_words: int = 30, key: str = "test_file",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.transform = transform
        self.image_root = image_root
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=False)
        self.collate_fn = None
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for path, index, entry in annotations_by_file(as_file_list(ann_file, key), required=("image", "caption")):
            captions = entry["caption"]
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise AnnotationError(f"{path}: entry {index} 'caption' must be a list of strings, got "
                                      f"{captions!r}")
            img_index = len(self.image)
            self.image.append(require_text(entry, "image", path, index))
            self.img2txt[img_index] = []
            for caption in captions:
                self.img2txt[img_index].append(len(self.text))
                self.txt2img[len(self.text)] = img_index
                self.text.append(pre_caption(caption, max_words))

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.read_image(join_image_path(self.image_root, self.image[index]), index)
        return self.transform(image), index


def create_retrieval_datasets(config: Mapping[str, Any]
                              ) -> tuple[RetrievalTrainDataset, RetrievalEvalDataset, RetrievalEvalDataset]:
    config = with_defaults(config, "retrieval")
    transforms = build_transforms(config)
    max_words = int(config["max_words"])
    root = config["image_root"]
    pixels = max_pixels_from_config(config)
    train = RetrievalTrainDataset(config["train_file"], transforms["train"], root, max_words, pixels)
    val = RetrievalEvalDataset(config["val_file"], transforms["test"], root, max_words, "val_file", pixels)
    test = RetrievalEvalDataset(config["test_file"], transforms["test"], root, max_words, "test_file", pixels)
    return train, val, test
