"""SIMLA for SNLI-VE: does the image entail, contradict or leave open a hypothesis?

Classes: contradiction 0, neutral 1, entailment 2. The text encoder is the ``med`` BERT with
cross-attention in every layer, built from its config: like the original, the model loads no
pretrained BERT or DeiT weights itself; ``--checkpoint`` supplies them.

Config keys read: ``image_res``, ``bert_config``, ``distill``; optional ``vit_mask_token`` (True),
``vision_width``/``vision_depth``/``vision_heads``/``patch_size`` (ViT-B/16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bert import BertModel, load_bert_config
from models.simla.momentum import MomentumMixin
from models.simla.nlvr import MOMENTUM, distillation_loss
from models.vit import vit_from_config

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}

#: ``VE.py`` training from a pretraining checkpoint: model entries the checkpoint may lack (glob
#: patterns over state_dict keys), the classifier heads the task adds.
PRETRAIN_CHECKPOINT_MISSING: tuple[str, ...] = ("cls_head.*", "cls_head_m.*")


def _classifier(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class SIMLA(MomentumMixin, nn.Module):
    """SNLI-VE classifier: ``forward(image, text, targets, alpha, train)``."""

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            raise ValueError("the VE model needs a config")
        del text_encoder  # accepted for the original's signature; the BERT is built from its config
        self.tokenizer = tokenizer
        self.distill = bool(config["distill"])
        bert_config = load_bert_config(config["bert_config"])

        self.visual_encoder = vit_from_config(config)
        self.text_encoder = BertModel(bert_config, add_pooling_layer=False)
        width = bert_config.hidden_size
        self.cls_head = _classifier(width, len(VE_LABELS))

        if self.distill:
            self.visual_encoder_m = vit_from_config(config)
            self.text_encoder_m = BertModel(bert_config, add_pooling_layer=False)
            self.cls_head_m = _classifier(width, len(VE_LABELS))
            self.init_momentum([
                [self.visual_encoder, self.visual_encoder_m],
                [self.text_encoder, self.text_encoder_m],
                [self.cls_head, self.cls_head_m],
            ], MOMENTUM)

    def copy_params(self) -> None:
        """Online weights into the momentum models (a no-op without distillation)."""
        if self.distill:
            super().copy_params()

    @staticmethod
    def _classify(visual_encoder: nn.Module, text_encoder: BertModel, cls_head: nn.Module, image: torch.Tensor,
                  text: Any) -> torch.Tensor:
        image_embeds = visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        output = text_encoder(text.input_ids, attention_mask=text.attention_mask,
                              encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                              mode="multimodal")
        return cls_head(output.last_hidden_state[:, 0, :])

    def forward(self, image: torch.Tensor, text: Any, targets: torch.Tensor | None = None, alpha: float = 0.0,
                train: bool = True) -> torch.Tensor:
        """The loss when ``train`` (distilled from the momentum model with weight ``alpha`` if the model
        distils), else the ``(B, 3)`` logits."""
        prediction = self._classify(self.visual_encoder, self.text_encoder, self.cls_head, image, text)
        if not train:
            return prediction
        if targets is None:
            raise ValueError("targets are required for training")
        if not self.distill:
            return F.cross_entropy(prediction, targets)
        with torch.no_grad():
            self._momentum_update()
            prediction_m = self._classify(self.visual_encoder_m, self.text_encoder_m, self.cls_head_m, image, text)
        return distillation_loss(prediction, prediction_m, targets, alpha)


def strip_bert_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every key containing ``bert`` loses each ``bert.`` (``text_encoder.bert.X`` -> ``text_encoder.X``),
    as ``VE.py`` does with a pretraining checkpoint; other keys are kept."""
    return {(key.replace("bert.", "") if "bert" in key else key): value for key, value in state_dict.items()}


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLA:
    """The model as the original builds it for a state-dict manifest."""
    del vocab_size  # the BERT config fixes the vocabulary
    return SIMLA(config=dict(config))
