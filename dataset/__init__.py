"""Datasets, transforms, collates and loaders for every task (``create_dataset`` as the original)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dataset.collate import SafeCollate, collate_safe, vqa_collate_fn
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, UnreadableImageError, read_rgb
from dataset.loaders import create_loader, create_sampler
from dataset.masking import MaskingGenerator, masking_generator_from_config
from dataset.text import pre_caption, pre_question
from dataset.transforms import PretrainViews, build_transforms

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "ImageReader", "MaskingGenerator", "PretrainViews", "SafeCollate",
    "UnreadableImageError", "build_transforms", "collate_safe", "create_dataset", "create_loader", "create_sampler",
    "masking_generator_from_config", "pre_caption", "pre_question", "read_rgb", "vqa_collate_fn",
]


# dataset name -> (module, factory); each factory takes the config and returns what the original returns
DATASET_FACTORIES: dict[str, tuple[str, str]] = {
    "pretrain": ("dataset.pretrain", "create_pretrain_dataset"),
    "re": ("dataset.retrieval", "create_retrieval_datasets"),
    "vqa": ("dataset.vqa", "create_vqa_datasets"),
    "nlvr": ("dataset.nlvr", "create_nlvr_datasets"),
    "ve": ("dataset.ve", "create_ve_datasets"),
    "grounding": ("dataset.grounding", "create_grounding_datasets"),
}


def create_dataset(name: str, config: Mapping[str, Any]):
    """Build the datasets of one task from its config, as the original ``create_dataset``."""
    import importlib

    if name not in DATASET_FACTORIES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_FACTORIES)}")
    module_name, factory = DATASET_FACTORIES[name]
    return getattr(importlib.import_module(module_name), factory)(config)
