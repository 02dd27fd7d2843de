"""SIMLA for NLVR2: a statement is judged true or false of a pair of images.

The text encoder is the ``xbert`` layout of :mod:`models.bert` with ``fusion_layer`` 0 and 18 layers
(the original SIMLA code): every layer cross-attends, alternating between image 0 (even layers) and
image 1 (odd layers), and from layer 6 on, each pair of layers (6,7), (8,9), ..., (16,17) shares its
cross-attention key and value projections, so both layers of a pair read their image through the
same keys and values. The depth and the first shared layer are config keys (``nlvr_num_layers`` 18,
``nlvr_split_layer`` 6) so smaller models can use the same layout.

Config keys read: ``image_res``, ``bert_config``, ``distill``; optional ``vit_mask_token`` (True),
``vision_width``/``vision_depth``/``vision_heads``/``patch_size`` (ViT-B/16), ``from_scratch``
(False: layers 0-11 of ``--text_encoder`` initialise the BERT), ``nlvr_num_layers`` (18),
``nlvr_split_layer`` (6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bert import BertModel, load_bert_config, load_pretrained_bert, pretrained_source
from models.simla.momentum import MomentumMixin
from models.vit import vit_from_config

NLVR_NUM_LAYERS = 18
NLVR_SPLIT_LAYER = 6
MOMENTUM = 0.995  # the original hard-codes the EMA rate of the fine-tuning models

#: ``NLVR.py`` starting from a ``Pretrain_NLVR.py`` checkpoint (glob patterns over state_dict keys):
#: model entries it may lack (the classifiers, and the momentum models, which ``copy_params`` fills
#: from the online ones) and its entries the NLVR model has no place for (the text-assignment head,
#: the contrastive projections and temperature).
PRETRAIN_NLVR_CHECKPOINT_MISSING: tuple[str, ...] = ("cls_head.*", "cls_head_m.*", "visual_encoder_m.*",
                                                     "text_encoder_m.*")
PRETRAIN_NLVR_CHECKPOINT_UNEXPECTED: tuple[str, ...] = ("ta_head.*", "vision_proj.*", "text_proj.*", "temp")


def nlvr_layout(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_layers, split_layer)`` of the NLVR text encoder, checked for consistency.

    Layers ``[split_layer, num_layers)`` come in cross-attention-sharing pairs, so their count must be
    even; the original uses 18 and 6.
    """
    num_layers = int(config.get("nlvr_num_layers", NLVR_NUM_LAYERS))
    split = int(config.get("nlvr_split_layer", NLVR_SPLIT_LAYER))
    if num_layers < 1 or not 0 <= split <= num_layers:
        raise ValueError(f"config: nlvr_num_layers={num_layers} and nlvr_split_layer={split} must satisfy "
                         "0 <= nlvr_split_layer <= nlvr_num_layers and nlvr_num_layers >= 1")
    if (num_layers - split) % 2:
        raise ValueError(f"config: nlvr_num_layers - nlvr_split_layer = {num_layers} - {split} must be even "
                         "(the layers from nlvr_split_layer on share cross-attention in pairs)")
    return num_layers, split


def share_cross_attention(encoder: nn.Module, split_layer: int = NLVR_SPLIT_LAYER) -> None:
    """Make layers ``(n, n+1)`` for ``n = split_layer, split_layer+2, ...`` share one cross-attention
    key and one value projection (weights and biases).

    As in the original, layer ``n`` takes over layer ``n+1``'s tensors: the state_dict keeps both
    names (one tensor), while ``named_parameters()`` lists each shared tensor once, under layer ``n``.
    Queries and output projections stay separate.
    """
    layers = encoder.layer
    if (len(layers) - split_layer) % 2:
        raise ValueError(f"cannot pair layers {split_layer}..{len(layers) - 1} for shared cross-attention: "
                         "their number is odd")
    for n in range(split_layer, len(layers), 2):
        first, second = layers[n], layers[n + 1]
        if not (getattr(first, "has_cross_attention", False) and getattr(second, "has_cross_attention", False)):
            raise ValueError(f"layers {n} and {n + 1} must both have cross-attention to share it")
        for name in ("key", "value"):
            target = getattr(first.crossattention.self, name)
            source = getattr(second.crossattention.self, name)
            target.weight = source.weight
            target.bias = source.bias


def build_nlvr_text_encoder(config: Mapping[str, Any], pretrained: str | None = None) -> BertModel:
    """The NLVR BERT: ``xbert`` layout, every layer cross-attending, shared key/value pairs.

    ``pretrained`` (a Hugging Face BERT name or folder) initialises the layers it has (0-11 for
    BERT-base); the others keep the BERT initialisation.
    """
    num_layers, split = nlvr_layout(config)
    bert_config = load_bert_config(config["bert_config"], num_hidden_layers=num_layers, fusion_layer=0)
    encoder = BertModel(bert_config, add_pooling_layer=False, layout="xbert")
    if pretrained:
        load_pretrained_bert(encoder, pretrained)
    share_cross_attention(encoder.encoder, split)
    return encoder


def _classifier(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def two_image_states(image_embeds: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split ``[image0; image1]`` embeddings into the two per-layer state lists (states, masks)."""
    if image_embeds.shape[0] != 2 * batch:
        raise ValueError(f"expected 2 x {batch} images (all first images, then all second images), "
                         f"got {image_embeds.shape[0]}")
    first, second = torch.split(image_embeds, batch)
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return [first, second], [atts[:batch], atts[batch:]]


class SIMLA(MomentumMixin, nn.Module):
    """NLVR2 classifier: ``forward(image, text, targets, alpha, train)``."""

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            raise ValueError("the NLVR model needs a config")
        self.tokenizer = tokenizer
        self.distill = bool(config["distill"])
        pretrained = pretrained_source(config, text_encoder)

        self.visual_encoder = vit_from_config(config)
        self.text_encoder = build_nlvr_text_encoder(config, pretrained)
        width = self.text_encoder.config.hidden_size
        self.cls_head = _classifier(width, 2)

        if self.distill:
            self.visual_encoder_m = vit_from_config(config)
            # the momentum BERT gets its weights from copy_params, so it is not loaded from disk
            self.text_encoder_m = build_nlvr_text_encoder(config)
            self.cls_head_m = _classifier(width, 2)
            self.init_momentum([
                [self.visual_encoder, self.visual_encoder_m],
                [self.text_encoder, self.text_encoder_m],
                [self.cls_head, self.cls_head_m],
            ], MOMENTUM)

    def copy_params(self) -> None:
        """Online weights into the momentum models (a no-op without distillation)."""
        if self.distill:
            super().copy_params()

    def _classify(self, visual_encoder: nn.Module, text_encoder: BertModel, cls_head: nn.Module,
                  image: torch.Tensor, text: Any, batch: int) -> torch.Tensor:
        states, masks = two_image_states(visual_encoder(image), batch)
        output = text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=states,
                              encoder_attention_mask=masks, mode="multi_modal")
        return cls_head(output.last_hidden_state[:, 0, :])

    def forward(self, image: torch.Tensor, text: Any, targets: torch.Tensor, alpha: float = 0.0,
                train: bool = True) -> torch.Tensor:
        """``image`` is ``(2B, 3, H, W)``: the B first images, then the B second images.

        Returns the loss when ``train`` (with momentum distillation weighted by ``alpha`` if the
        model distils), else the ``(B, 2)`` logits.
        """
        batch = targets.shape[0]
        prediction = self._classify(self.visual_encoder, self.text_encoder, self.cls_head, image, text, batch)
        if not train:
            return prediction
        if not self.distill:
            return F.cross_entropy(prediction, targets)
        with torch.no_grad():
            self._momentum_update()
            prediction_m = self._classify(self.visual_encoder_m, self.text_encoder_m, self.cls_head_m, image,
                                          text, batch)
        return distillation_loss(prediction, prediction_m, targets, alpha)


def distillation_loss(prediction: torch.Tensor, prediction_m: torch.Tensor, targets: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """``(1 - alpha) * CE(prediction, targets) + alpha * CE(prediction, softmax(prediction_m))``."""
    soft = -torch.sum(F.log_softmax(prediction, dim=1) * F.softmax(prediction_m, dim=1), dim=1).mean()
    return (1 - alpha) * F.cross_entropy(prediction, targets) + alpha * soft


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLA:
    """The model as the original builds it for a state-dict manifest (no pretrained weights)."""
    del vocab_size  # the BERT config fixes the vocabulary
    return SIMLA(config=dict(config, from_scratch=True))
