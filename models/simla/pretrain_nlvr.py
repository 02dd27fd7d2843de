"""Text-assignment pretraining of the two-image NLVR model (``Pretrain_NLVR.py``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import with_defaults
from models.bert import pretrained_source
from models.simla.checkpoint_keys import PRETRAINING_ONLY_KEYS, FilteredState, without_bert
from models.simla.nlvr import build_nlvr_text_encoder, nlvr_layout
from models.vit import vit_from_config

PAIRING_TEMPERATURE = 0.07  # a constant in the original, not the ``temp`` parameter

PRETRAIN_CHECKPOINT_MISSING: tuple[str, ...] = ("ta_head.*",
                                                "text_encoder.embeddings.token_type_embeddings.*")


def pair_images(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw every caption's image pair and class from the (B, B) weights: three ``(B,)`` tensors."""
    batch = weights.shape[0]
    if batch < 3:
        # every row has batch - 1 non-zero weights and class 2 needs two distinct other images
        raise ValueError(f"NLVR text-assignment pretraining needs at least 3 images per batch and "
                         f"process, got {batch}")
    cpu_weights = weights.detach().float().cpu()
    slot0: list[int] = []
    slot1: list[int] = []
    labels: list[int] = []
    for b in range(batch):
        if torch.rand(1) > 1 / 3:
            other = int(torch.multinomial(cpu_weights[b], 1).item())
            if torch.rand(1) > 0.5:
                slot0.append(b)
                slot1.append(other)
                labels.append(0)
            else:
                slot0.append(other)
                slot1.append(b)
                labels.append(1)
        else:
            first, second = torch.multinomial(cpu_weights[b], 2).tolist()
            slot0.append(first)
            slot1.append(second)
            labels.append(2)
    return tuple(torch.tensor(values, dtype=torch.long, device=weights.device)  # type: ignore[return-value]
                 for values in (slot0, slot1, labels))


class SIMLANLVRPretrain(nn.Module):
    """NLVR text-assignment pretraining model: ``forward(image, text)`` returns the loss."""

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            raise ValueError("the NLVR pretraining model needs a config")
        config = with_defaults(config, "nlvr_pretrain")
        self.tokenizer = tokenizer
        pretrained = pretrained_source(config, text_encoder)
        vision_width = int(config["vision_width"])
        embed_dim = int(config["embed_dim"])

        self.layout = nlvr_layout(config)  # (num_layers, split_layer) of the text encoder
        self.visual_encoder = vit_from_config(config)
        self.text_encoder = build_nlvr_text_encoder(config, pretrained)
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * 0.07)
        self.ta_head = nn.Linear(text_width, 3)

    def pairing_weights(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``softmax(f f^T / 0.07)`` of the normalised projected [CLS] features, zero diagonal."""
        with torch.no_grad():
            feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
            weights = F.softmax(feat @ feat.t() / PAIRING_TEMPERATURE, dim=1)
            weights.fill_diagonal_(0)
        return weights

    def sample_pairs(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair_images(weights)

    def forward(self, image: torch.Tensor, text: Any, return_intermediates: bool = False):
        """Cross-entropy of the 3-way head; ``return_intermediates`` also returns logits, labels, indices."""
        image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        weights = self.pairing_weights(image_embeds)
        slot0, slot1, labels = self.sample_pairs(weights)
        output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                   encoder_hidden_states=[image_embeds[slot0], image_embeds[slot1]],
                                   encoder_attention_mask=[image_atts, image_atts], mode="multi_modal")
        logits = self.ta_head(output.last_hidden_state[:, 0, :])
        loss = F.cross_entropy(logits, labels)
        if return_intermediates:
            return loss, {"logits": logits, "labels": labels, "pair_image_index_0": slot0,
                          "pair_image_index_1": slot1, "sampling_weights": weights}
        return loss


SIMLA = SIMLANLVRPretrain


_TEXT_LAYER = re.compile(r"^(?P<prefix>.*?encoder\.layer\.)(?P<index>\d+)(?P<rest>\..*)$")


def pretrain_to_nlvr_state_dict(state_dict: Mapping[str, torch.Tensor], num_layers: int = 18,
                                split_layer: int = 6) -> dict[str, torch.Tensor]:
    """Map a pretraining checkpoint onto the two-image model, as ``Pretrain_NLVR.py`` does."""
    mapped: dict[str, torch.Tensor] = {}
    source_depth = 0
    for key, value in state_dict.items():
        new_key = without_bert(key)
        if new_key == key:
            mapped[key] = value
            continue
        match = _TEXT_LAYER.match(new_key) if "layer" in new_key else None
        if match is None:
            mapped[new_key] = value
            continue
        index = int(match["index"])
        if new_key.startswith("text_encoder."):
            source_depth = max(source_depth, index + 1)
        if index < split_layer:
            mapped[new_key] = value
        else:
            first = 2 * (index - split_layer) + split_layer
            for target in (first, first + 1):
                mapped[f"{match['prefix']}{target}{match['rest']}"] = value
    if source_depth and 2 * source_depth - split_layer != num_layers:
        raise ValueError(
            f"the checkpoint's text encoder has {source_depth} layers; duplicating layers {split_layer}.. "
            f"gives {2 * source_depth - split_layer}, but the model has {num_layers} "
            f"(set nlvr_num_layers: {2 * source_depth - split_layer} or a matching nlvr_split_layer)")
    return mapped


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SIMLANLVRPretrain, own: bool = False) -> FilteredState:
    """``own``: a checkpoint of this model; otherwise a pretraining checkpoint with layer duplication."""
    if own:
        return FilteredState(dict(state_dict), "a Pretrain_NLVR.py checkpoint", strict=True)
    return FilteredState(pretrain_to_nlvr_state_dict(state_dict, *model.layout), "a pretraining checkpoint",
                         missing=PRETRAIN_CHECKPOINT_MISSING, unexpected=PRETRAINING_ONLY_KEYS)


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLANLVRPretrain:
    del vocab_size  # the BERT config fixes the vocabulary
    return SIMLANLVRPretrain(config=dict(config, from_scratch=True))
