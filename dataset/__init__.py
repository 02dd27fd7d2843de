"""Datasets, transforms, collates and loaders for every task (``create_dataset`` as the original)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dataset.collate import SafeCollate, collate_safe, vqa_collate_fn
from dataset.loaders import create_loader, create_sampler
from dataset.masking import MaskingGenerator, masking_generator_from_config
from dataset.text import pre_caption, pre_question
from dataset.transforms import PretrainViews, build_transforms

__all__ = [
    "MaskingGenerator", "PretrainViews", "SafeCollate", "build_transforms", "collate_safe", "create_dataset",
    "create_loader", "create_sampler", "masking_generator_from_config", "pre_caption", "pre_question",
    "vqa_collate_fn",
]


def create_dataset(name: str, config: Mapping[str, Any]):
    """Build the datasets of one task from its config, as the original ``create_dataset``."""
    if name == "pretrain":
        from dataset.pretrain import PretrainDataset

        return PretrainDataset(config["train_file"], PretrainViews(config), masking_generator_from_config(config),
                               max_words=int(config.get("max_words", 30)))
    raise ValueError(f"unknown dataset {name!r}")
