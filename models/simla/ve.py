"""SIMLA for SNLI-VE (contradiction 0, neutral 1, entailment 2); weights come from ``--checkpoint``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from configs.schema import with_defaults
from models.bert import BertModel, load_bert_config
from models.simla.checkpoint_keys import PRETRAINING_ONLY_KEYS, FilteredState, strip_bert_prefix
from models.simla.classifier import DistilledClassifier

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}

PRETRAIN_CHECKPOINT_MISSING: tuple[str, ...] = ("cls_head.*", "cls_head_m.*")


class SIMLAVE(DistilledClassifier):
    """SNLI-VE classifier: ``forward(image, text, targets, alpha, train)``; logits ``(B, 3)``."""

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            raise ValueError("the VE model needs a config")
        config = with_defaults(config, "ve")
        del text_encoder  # accepted for the original's signature; the BERT is built from its config
        self.tokenizer = tokenizer
        bert_config = load_bert_config(config["bert_config"])
        self.build_classifier(config, len(VE_LABELS), lambda online: BertModel(bert_config, add_pooling_layer=False))

    def classify(self, image: torch.Tensor, text: Any, targets: torch.Tensor | None, momentum: bool) -> torch.Tensor:
        visual_encoder, text_encoder, cls_head = self.encoders(momentum)
        image_embeds = visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        output = text_encoder(text.input_ids, attention_mask=text.attention_mask,
                              encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                              mode="multimodal")
        return cls_head(output.last_hidden_state[:, 0, :])


SIMLA = SIMLAVE


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SIMLA, own: bool = False) -> FilteredState:
    """``own``: a VE checkpoint as it is; otherwise a pretraining checkpoint with ``bert.`` dropped."""
    del model
    if own:
        return FilteredState(dict(state_dict), "a VE.py checkpoint")
    return FilteredState(strip_bert_prefix(state_dict), "a pretraining (or VE.py) checkpoint",
                         missing=PRETRAIN_CHECKPOINT_MISSING, unexpected=PRETRAINING_ONLY_KEYS)


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLAVE:
    del vocab_size  # the BERT config fixes the vocabulary
    return SIMLAVE(config=dict(config))
