"""Base of the NLVR2 and SNLI-VE classifiers: ViT, fusion BERT, head, momentum copies with ``distill``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bert import BertModel
from models.simla.momentum import FINE_TUNING_MOMENTUM, MomentumMixin
from models.vit import vit_from_config


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def distillation_loss(prediction: torch.Tensor, prediction_m: torch.Tensor, targets: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """``(1 - alpha) * CE(prediction, targets) + alpha * CE(prediction, softmax(prediction_m))``."""
    soft = -torch.sum(F.log_softmax(prediction, dim=1) * F.softmax(prediction_m, dim=1), dim=1).mean()
    return (1 - alpha) * F.cross_entropy(prediction, targets) + alpha * soft


class DistilledClassifier(MomentumMixin, nn.Module):
    """``forward(image, text, targets, alpha, train)``: the loss when ``train``, else the logits."""

    def build_classifier(self, config: Mapping[str, Any], num_classes: int,
                         text_encoder: Callable[[bool], BertModel]) -> None:
        """Online encoders and head, then (with ``distill``) their momentum copies."""
        self.distill = bool(config["distill"])
        self.visual_encoder = vit_from_config(config)
        self.text_encoder = text_encoder(True)
        width = self.text_encoder.config.hidden_size
        self.cls_head = classifier_head(width, num_classes)
        if self.distill:
            self.visual_encoder_m = vit_from_config(config)
            self.text_encoder_m = text_encoder(False)
            self.cls_head_m = classifier_head(width, num_classes)
            self.init_momentum([
                [self.visual_encoder, self.visual_encoder_m],
                [self.text_encoder, self.text_encoder_m],
                [self.cls_head, self.cls_head_m],
            ], FINE_TUNING_MOMENTUM)

    def copy_params(self) -> None:
        """Online weights into the momentum models (a no-op without distillation)."""
        if self.distill:
            super().copy_params()

    def classify(self, image: torch.Tensor, text: Any, targets: torch.Tensor | None, momentum: bool
                 ) -> torch.Tensor:
        raise NotImplementedError

    def encoders(self, momentum: bool) -> tuple[nn.Module, BertModel, nn.Module]:
        """``(visual_encoder, text_encoder, cls_head)``, online or momentum."""
        if momentum:
            return self.visual_encoder_m, self.text_encoder_m, self.cls_head_m
        return self.visual_encoder, self.text_encoder, self.cls_head

    def forward(self, image: torch.Tensor, text: Any, targets: torch.Tensor | None = None, alpha: float = 0.0,
                train: bool = True) -> torch.Tensor:
        """The loss when ``train`` (distilled with weight ``alpha`` if the model distils), else the logits."""
        prediction = self.classify(image, text, targets, momentum=False)
        if not train:
            return prediction
        if targets is None:
            raise ValueError("targets are required for training")
        if not self.distill:
            return F.cross_entropy(prediction, targets)
        with torch.no_grad():
            self._momentum_update()
            prediction_m = self.classify(image, text, targets, momentum=True)
        return distillation_loss(prediction, prediction_m, targets, alpha)
