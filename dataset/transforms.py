"""Image pipelines of the pretraining and fine-tuning datasets (images are read by :mod:`dataset.images`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from configs.schema import patch_grid
from dataset.randaugment import PIPELINE_OPS, RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LOGIT_LAPLACE_EPS = 0.1  # dall_e's logit-Laplace epsilon: d-VAE inputs live in [eps, 1 - eps]

PRETRAIN_CROP_SCALE = (0.2, 1.0)
FINETUNE_CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Map ``[0, 1]`` pixels to ``[eps, 1 - eps]`` for the d-VAE encoder (``x * 0.8 + 0.1``)."""
    if not torch.is_floating_point(x):
        raise ValueError(f"map_pixels expects a floating point tensor, got {x.dtype}")
    return (1 - 2 * eps) * x + eps


def build_randaugment(config: Mapping[str, Any]) -> RandomAugment:
    """RandAugment of all training pipelines (N=2, M=7, the ten pipeline ops) with the config's options."""
    return RandomAugment(
        N=2,
        M=7,
        isPIL=True,
        augs=list(PIPELINE_OPS),
        clip_sharpness=bool(config["randaugment_clip_sharpness"]),
        fix_autocontrast=bool(config["randaugment_fix_autocontrast"]),
    )


def _normalize() -> T.Normalize:
    return T.Normalize(CLIP_MEAN, CLIP_STD)


def dvae_resolution(config: Mapping[str, Any]) -> int:
    """Side of the d-VAE input, whose code grid (downsampled by 8) matches the ViT patch grid."""
    return patch_grid(config) * 8


def build_transforms(config: Mapping[str, Any]) -> dict[str, Callable[[Image.Image], torch.Tensor]]:
    """The original ``create_dataset`` pipelines (``pretrain``, ``train``, ``test``, ...)."""
    res = int(config["image_res"])
    bicubic = InterpolationMode.BICUBIC
    return {
        "pretrain": T.Compose(
            [
                T.RandomResizedCrop(res, scale=PRETRAIN_CROP_SCALE, interpolation=bicubic),
                T.RandomHorizontalFlip(),
                build_randaugment(config),
                T.ToTensor(),
                _normalize(),
            ]
        ),
        "visual_tokenizer": T.Compose(
            [
                T.RandomResizedCrop(dvae_resolution(config), scale=PRETRAIN_CROP_SCALE, interpolation=bicubic),
                T.RandomHorizontalFlip(),
                build_randaugment(config),
                T.ToTensor(),
                map_pixels,
            ]
        ),
        "train": T.Compose(
            [
                T.RandomResizedCrop(res, scale=FINETUNE_CROP_SCALE, interpolation=bicubic),
                T.RandomHorizontalFlip(),
                build_randaugment(config),
                T.ToTensor(),
                _normalize(),
            ]
        ),
        "test": T.Compose(
            [
                T.Resize((res, res), interpolation=bicubic),
                T.ToTensor(),
                _normalize(),
            ]
        ),
        "grounding_train": T.Compose(
            [
                T.Resize((res, res), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                build_randaugment(config),
                T.ToTensor(),
                _normalize(),
            ]
        ),
    }


class PretrainViews:
    """The two pretraining views of one image; ``mim_aligned_views`` shares one crop, flip and RandAugment."""

    def __init__(
        self,
        config: Mapping[str, Any],
        transforms: Mapping[str, Callable[[Image.Image], torch.Tensor]] | None = None,
    ) -> None:
        self.aligned = bool(config["mim_aligned_views"])
        self.image_res = int(config["image_res"])
        self.tokenizer_size = dvae_resolution(config)
        built = transforms if transforms is not None else build_transforms(config)
        self.image_transform = built["pretrain"]
        self.tokenizer_transform = built["visual_tokenizer"]
        self.randaugment = build_randaugment(config)
        self.to_image_tensor = T.Compose([T.ToTensor(), _normalize()])
        self.to_tokenizer_tensor = T.Compose([T.ToTensor(), map_pixels])

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.aligned:
            image_for_tokenization = self.tokenizer_transform(img)  # first, for RNG parity with the original
            image = self.image_transform(img)
            return image, image_for_tokenization
        return self._aligned_views(img)

    def _aligned_views(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.image_res
        top, left, height, width = T.RandomResizedCrop.get_params(img, PRETRAIN_CROP_SCALE, CROP_RATIO)
        crop = TF.resized_crop(img, top, left, height, width, [res, res], InterpolationMode.BICUBIC)
        if torch.rand(1) < 0.5:
            crop = TF.hflip(crop)
        augmented = np.ascontiguousarray(self.randaugment(crop))
        size = self.tokenizer_size
        small = Image.fromarray(augmented).resize((size, size), Image.Resampling.BICUBIC)
        return self.to_image_tensor(augmented), self.to_tokenizer_tensor(small)
