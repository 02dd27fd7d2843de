"""SIMLA image-text retrieval model: ITA with image-id aware targets and queues, ITM with hard negatives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import with_defaults
from models.bert import BertModel, CrossKeyValues, build_bert, load_bert_config, pretrained_source
from models.simla.alignment import ita_loss, itm_loss, sample_negatives
from models.simla.checkpoint_keys import PRETRAINING_ONLY_KEYS, FilteredState, strip_bert_prefix, without_bert
from models.simla.momentum import MomentumMixin
from models.simla.pretrain import mask_tokens
from models.vit import DEIT_BASE_URL, load_deit_weights, vit_from_config

PAD_ID, CLS_ID, MASK_ID = 0, 101, 103
NO_IMAGE_ID = -100  # queue columns without an image id (the original fills idx_queue with it)


class SIMLARetrieval(MomentumMixin, nn.Module):
    """Retrieval model; ``forward(image, text, alpha, idx)`` returns ``(loss_ita, loss_itm)``."""

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None, temp: float = 0.07, init_deit: bool = True,
                 idx_queue: bool = True) -> None:
        super().__init__()
        if config is None:
            raise ValueError("SIMLA retrieval model needs a config")
        config = with_defaults(config, "retrieval")
        self.tokenizer = tokenizer
        self.mlm_probability = float(config["mlm_probability"])
        embed_dim = int(config["embed_dim"])
        vision_width = int(config["vision_width"])
        self.enqueue_idx = bool(config["enqueue_idx"])

        self.visual_encoder = vit_from_config(config)
        if init_deit and not config["from_scratch"]:
            load_deit_weights(self.visual_encoder, config["deit_weights"] or DEIT_BASE_URL)

        bert_config = load_bert_config(config["bert_config"])
        self.text_encoder = build_bert(BertModel, bert_config, pretrained_source(config, text_encoder))
        text_width = bert_config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config["temp"])
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m = vit_from_config(config)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(bert_config, add_pooling_layer=False)
        self.text_proj_m = nn.Linear(text_width, embed_dim)

        self.init_momentum([
            [self.visual_encoder, self.visual_encoder_m],
            [self.vision_proj, self.vision_proj_m],
            [self.text_encoder, self.text_encoder_m],
            [self.text_proj, self.text_proj_m],
        ], config["momentum"])
        self.init_queues(embed_dim, config["queue_size"], with_idx=idx_queue)
        if not idx_queue and self.enqueue_idx:
            raise ValueError("enqueue_idx: true needs the idx_queue buffer")

        if config["freeze_visual_encoder"]:
            for param in self.visual_encoder.parameters():
                param.requires_grad = False
        if config["grad_checkpointing"]:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_embeds (B, N+1, D), image_feat (B, E))``: ViT output and its normalised projection."""
        image_embeds = self.visual_encoder(image)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_embeds (B, L, D), text_feat (B, E))``; ``cls_only``: the last layer computes [CLS] only."""
        text_embeds = self.text_encoder(input_ids, attention_mask=attention_mask, mode="text",
                                        output_rows=1 if cls_only else None).last_hidden_state
        return text_embeds, F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor | None = None, image_atts: torch.Tensor | None = None,
                   image_kv: CrossKeyValues | None = None, cls_only: bool = False) -> torch.Tensor:
        """Match / no-match logits ``(B, 2)`` of text ``b`` with image ``b``."""
        if image_atts is None and image_embeds is not None:
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        output = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts, mode="multimodal", encoder_kv=image_kv,
                                   output_rows=1 if cls_only else None)
        return self.itm_head(output.last_hidden_state[:, 0, :])

    def image_key_values(self, image_embeds: torch.Tensor) -> CrossKeyValues:
        """The fusion layers' keys and values of ViT states, for :meth:`itm_logits` (``image_kv``)."""
        return self.text_encoder.cross_key_values(image_embeds, mode="multimodal")

    def mask(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-LM ids and labels (present in the original model, not used by its losses)."""
        tokenizer = self.tokenizer
        return mask_tokens(input_ids, self.text_encoder.config.vocab_size, self.mlm_probability,
                           int(getattr(tokenizer, "pad_token_id", PAD_ID)),
                           int(getattr(tokenizer, "cls_token_id", CLS_ID)),
                           int(getattr(tokenizer, "mask_token_id", MASK_ID)))

    def sample_itm_negatives(self, weights_t2i: torch.Tensor, weights_i2t: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of a hard negative image for each text, then of a hard negative text for each image."""
        for name, weights in (("image", weights_t2i), ("text", weights_i2t)):
            empty = (weights.sum(dim=1) <= 0).nonzero().flatten()
            if empty.numel():
                raise ValueError(f"no negative {name} to sample for batch row(s) {empty.tolist()}: every "
                                 "sample of the batch belongs to the same image id (a batch needs captions "
                                 "of at least two images)")
        return sample_negatives(weights_t2i), sample_negatives(weights_i2t)

    def queued_image_ids(self) -> torch.Tensor:
        """Image ids of the queue columns ``(1, Q)`` (all ``NO_IMAGE_ID`` without an ``idx_queue``)."""
        queue = getattr(self, "idx_queue", None)
        if queue is None:
            return torch.full((1, self.queue_size), NO_IMAGE_ID, dtype=torch.long, device=self.image_queue.device)
        return queue.clone().detach()

    def forward(self, image: torch.Tensor, text: Any, alpha: float = 0.0, idx: torch.Tensor | None = None,
                return_intermediates: bool = False):
        """Returns ``(loss_ita, loss_itm)``; ``idx`` (B,) is the integer image id of each pair."""
        if idx is None:
            raise ValueError("the retrieval model needs the image id of every pair (idx)")
        ids, text_mask = text.input_ids, text.attention_mask
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        image_embeds, image_feat = self.image_features(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        _, text_feat = self.text_features(ids, text_mask)

        idx = idx.view(-1, 1).to(torch.long)
        idx_all = torch.cat([idx.t(), self.queued_image_ids()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)

        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            text_out_m = self.text_encoder_m(ids, attention_mask=text_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_out_m.last_hidden_state[:, 0, :]), dim=-1)
        ita = ita_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, sim_targets)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx if self.enqueue_idx else None)

        output_pos = self.text_encoder(ids, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts, mode="multimodal")

        def fuse_negatives(neg_image_idx: torch.Tensor, neg_text_idx: torch.Tensor) -> torch.Tensor:
            return self.text_encoder(
                torch.cat([ids, ids[neg_text_idx]], dim=0),
                attention_mask=torch.cat([text_mask, text_mask[neg_text_idx]], dim=0),
                encoder_hidden_states=torch.cat([image_embeds[neg_image_idx], image_embeds], dim=0),
                encoder_attention_mask=torch.cat([image_atts, image_atts], dim=0),
                mode="multimodal").last_hidden_state[:, 0, :]

        itm = itm_loss(self, output_pos.last_hidden_state[:, 0, :], ita, fuse_negatives, torch.eq(idx, idx.t()))
        if not return_intermediates:
            return ita.loss, itm.loss
        inter = dict(image_feat=image_feat, text_feat=text_feat, image_feat_m=image_feat_m, text_feat_m=text_feat_m,
                     sim_targets=sim_targets, sim_i2t=ita.sim_i2t, sim_t2i=ita.sim_t2i,
                     sim_i2t_targets=ita.sim_i2t_targets, sim_t2i_targets=ita.sim_t2i_targets,
                     itm_logits=itm.logits, itm_labels=itm.labels, itm_negative_image_index=itm.neg_image_idx,
                     itm_negative_text_index=itm.neg_text_idx, itm_negative_text_ids=ids[itm.neg_text_idx])
        return ita.loss, itm.loss, inter


SIMLA = SIMLARetrieval


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SIMLARetrieval, own: bool = False) -> FilteredState:
    """A pretraining or retrieval checkpoint for the retrieval model, ``bert.`` dropped from its keys."""
    del own
    state = strip_bert_prefix(state_dict)
    renamed = {without_bert(key): key for key in state_dict if "bert." in key}
    source = "a pretraining or retrieval checkpoint"
    if hasattr(model, "idx_queue"):
        return FilteredState(state, source, missing=("idx_queue",), unexpected=PRETRAINING_ONLY_KEYS,
                             renamed=renamed)
    keys = model.state_dict()
    return FilteredState({k: v for k, v in state.items() if k in keys}, source, strict=True, renamed=renamed,
                         dropped=[k for k in state if k not in keys])


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLARetrieval:
    del vocab_size  # the retrieval model has no vocabulary-sized head
    return SIMLARetrieval(config=dict(config, from_scratch=True))
