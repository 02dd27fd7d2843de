"""SIMLA for NLVR2: a statement is judged true or false of a pair of images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from configs.schema import with_defaults
from models.bert import BertModel, load_bert_config, load_pretrained_bert, pretrained_source
from models.simla.checkpoint_keys import FilteredState
from models.simla.classifier import DistilledClassifier

#: ``NLVR.py`` from a ``Pretrain_NLVR.py`` checkpoint: entries it may lack / may not use.
PRETRAIN_NLVR_CHECKPOINT_MISSING: tuple[str, ...] = ("cls_head.*", "cls_head_m.*", "visual_encoder_m.*",
                                                     "text_encoder_m.*")
PRETRAIN_NLVR_CHECKPOINT_UNEXPECTED: tuple[str, ...] = ("ta_head.*", "vision_proj.*", "text_proj.*", "temp")


def nlvr_layout(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_layers, split_layer)`` of the NLVR text encoder; the shared layers' count must be even."""
    num_layers = int(config["nlvr_num_layers"])
    split = int(config["nlvr_split_layer"])
    if num_layers < 1 or not 0 <= split <= num_layers:
        raise ValueError(f"config: nlvr_num_layers={num_layers} and nlvr_split_layer={split} must satisfy "
                         "0 <= nlvr_split_layer <= nlvr_num_layers and nlvr_num_layers >= 1")
    if (num_layers - split) % 2:
        raise ValueError(f"config: nlvr_num_layers - nlvr_split_layer = {num_layers} - {split} must be even "
                         "(the layers from nlvr_split_layer on share cross-attention in pairs)")
    return num_layers, split


def share_cross_attention(encoder: nn.Module, split_layer: int) -> None:
    """Make layers ``(n, n+1)`` from ``split_layer`` on share cross-attention key/value projections."""
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
    """The NLVR BERT; ``pretrained`` initialises the layers it has, the others keep BERT initialisation."""
    num_layers, split = nlvr_layout(config)
    bert_config = load_bert_config(config["bert_config"], num_hidden_layers=num_layers, fusion_layer=0)
    encoder = BertModel(bert_config, add_pooling_layer=False, layout="xbert")
    if pretrained:
        load_pretrained_bert(encoder, pretrained)
    share_cross_attention(encoder.encoder, split)
    return encoder


def two_image_states(image_embeds: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split ``[image0; image1]`` embeddings into the two per-layer state lists (states, masks)."""
    if image_embeds.shape[0] != 2 * batch:
        raise ValueError(f"expected 2 x {batch} images (all first images, then all second images), "
                         f"got {image_embeds.shape[0]}")
    first, second = torch.split(image_embeds, batch)
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return [first, second], [atts[:batch], atts[batch:]]


class SIMLANLVR(DistilledClassifier):
    """NLVR2 classifier; ``image`` ``(2B, 3, H, W)``: the B first images, then the B second ones."""

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            raise ValueError("the NLVR model needs a config")
        config = with_defaults(config, "nlvr")
        self.tokenizer = tokenizer
        # the original copies the momentum models before loading a checkpoint; true: after (checkpoint_filter_fn)
        self.copy_momentum_after_load = bool(config["copy_momentum_after_load"])
        pretrained = pretrained_source(config, text_encoder)
        # the momentum BERT gets its weights from copy_params, so it is not loaded from disk
        self.build_classifier(config, 2, lambda online: build_nlvr_text_encoder(config, pretrained if online else None))

    def classify(self, image: torch.Tensor, text: Any, targets: torch.Tensor | None, momentum: bool) -> torch.Tensor:
        visual_encoder, text_encoder, cls_head = self.encoders(momentum)
        states, masks = two_image_states(visual_encoder(image), targets.shape[0])
        output = text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=states,
                              encoder_attention_mask=masks, mode="multi_modal")
        return cls_head(output.last_hidden_state[:, 0, :])


SIMLA = SIMLANLVR


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SIMLANLVR, own: bool = False) -> FilteredState:
    """A ``Pretrain_NLVR.py`` (or ``NLVR.py``) checkpoint, loaded as it is."""
    del own
    if not model.copy_momentum_after_load:
        model.copy_params()
    return FilteredState(dict(state_dict), "a Pretrain_NLVR.py or NLVR.py checkpoint",
                         missing=PRETRAIN_NLVR_CHECKPOINT_MISSING, unexpected=PRETRAIN_NLVR_CHECKPOINT_UNEXPECTED,
                         after_load=model.copy_params if model.copy_momentum_after_load else None)


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLANLVR:
    del vocab_size  # the BERT config fixes the vocabulary
    return SIMLANLVR(config=dict(config, from_scratch=True))
