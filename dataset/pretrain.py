"""Pretraining dataset: image-caption pairs with the ViT view, the d-VAE view and the patch mask."""

from __future__ import annotations

import bisect
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
from dataset.shards import (
    ShardSample,
    ShardSampleError,
    ShardSet,
    expand_shard_source,
    is_shard_source,
    sample_caption,
    sample_image,
)
from dataset.text import pre_caption
from dataset.transforms import PretrainViews


def read_pretrain_entries(path: str) -> list[dict]:
    """The entries of one pretraining JSON file, each checked to hold an image path and a caption."""
    entries = []
    for _, index, entry in annotations_by_file([path], ("image", "caption")):
        require_text(entry, "image", path, index)
        caption = entry["caption"]
        if not (isinstance(caption, str) or isinstance(caption, list) and all(isinstance(c, str) for c in caption)):
            raise AnnotationError(f"{path}: entry {index} field 'caption' must be a string or a list of strings, "
                                  f"got {caption!r}")
        entries.append(entry)
    return entries


class PretrainDataset(Dataset):
    """``(image, caption, image_for_tokenization, masked_positions)``; unreadable: ``None`` (warned)."""

    def __init__(self, ann_file: str | Sequence[str], views: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 mask_generator: Callable[[], np.ndarray], max_words: int = 30,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, shard_caption_key: str | None = None,
                 shard_index_cache: bool = True) -> None:
        self.ann: list[dict] = []
        # one block per train_file entry: a range of ``self.ann`` (a JSON file) or a shard set
        self._blocks: list[range | ShardSet] = []
        self._starts: list[int] = []
        total = 0
        for entry in as_file_list(ann_file, "train_file"):
            if is_shard_source(entry):
                block: range | ShardSet = ShardSet(expand_shard_source(entry), cache=shard_index_cache)
            else:
                first = len(self.ann)
                self.ann.extend(read_pretrain_entries(entry))
                block = range(first, len(self.ann))
            self._blocks.append(block)
            self._starts.append(total)
            total += len(block)
        self._length = total
        self.views = views
        self.mask_generator = mask_generator
        self.max_words = max_words
        self.shard_caption_key = shard_caption_key
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=True)
        self.collate_fn = SafeCollate()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"sample {index} of {self._length}")
        part = bisect.bisect_right(self._starts, index) - 1
        block, offset = self._blocks[part], index - self._starts[part]
        if isinstance(block, ShardSet):
            return self._shard_sample(block.read(offset))
        entry = self.ann[block[offset]]
        caption = self._pick_caption(entry["caption"])
        image = self.read_image(entry["image"], index)
        if image is None:
            return None
        image, image_for_tokenization = self.views(image)
        return image, caption, image_for_tokenization, self.mask_generator()

    def _pick_caption(self, caption: str | list[str]) -> str:
        if isinstance(caption, list):
            caption = random.choice(caption) if caption else ""
        return pre_caption(caption, self.max_words)

    def _shard_sample(self, sample: ShardSample):
        try:
            name, data = sample_image(sample)
            caption = sample_caption(sample, self.shard_caption_key)
        except ShardSampleError as exc:
            return self.read_image.skip(str(exc), sample.where)
        # the same draws in the same order as a JSON entry: caption choice, image views, mask
        caption = self._pick_caption(caption)
        image = self.read_image.decode(data, f"{sample.shard}:{name}", sample.where)
        if image is None:
            return None
        image, image_for_tokenization = self.views(image)
        return image, caption, image_for_tokenization, self.mask_generator()


def create_pretrain_dataset(config: Mapping[str, Any]) -> PretrainDataset:
    config = with_defaults(config, "pretrain")
    return PretrainDataset(config["train_file"], PretrainViews(config), masking_generator_from_config(config),
                           max_words=int(config["max_words"]),
                           max_image_pixels=max_pixels_from_config(config),
                           shard_caption_key=config["shard_caption_key"],
                           shard_index_cache=bool(config["shard_index_cache"]))
