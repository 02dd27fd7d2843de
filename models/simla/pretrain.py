"""SIMLA pretraining model: ITA, ITM, MLM, cross-modal MIM and keyword pseudo-label supervision."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import with_defaults
from models.bert import BertForMaskedLM, build_bert, load_bert_config, masked_mean, pretrained_source
from models.dvae import DALLE_VOCAB_SIZE
from models.lean_autograd import vocabulary_projection
from models.precision import cast_frozen_once
from models.simla.alignment import ita_loss, itm_loss, sample_negatives
from models.simla.checkpoint_keys import FilteredState
from models.simla.momentum import MomentumMixin
from models.vit import DEIT_BASE_URL, load_deit_weights, vit_from_config

PAD_ID, CLS_ID, MASK_ID = 0, 101, 103


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, mlm_probability: float, pad_token_id: int = PAD_ID,
                cls_token_id: int = CLS_ID, mask_token_id: int = MASK_ID,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking as the original: the same CPU generator draws in the same order (seeded runs reproduce),
    combined on the ids' device so the host never waits for it."""
    shape, device = input_ids.shape, input_ids.device
    draws = [torch.bernoulli(torch.full(shape, p), generator=generator).bool() for p in (mlm_probability, 0.8, 0.5)]
    draws.append(torch.randint(vocab_size, shape, dtype=torch.long, generator=generator))
    masked, replaced, randomised, random_words = (draw.to(device, non_blocking=True) for draw in draws)
    masked = masked & (input_ids != pad_token_id) & (input_ids != cls_token_id)
    replaced = replaced & masked
    randomised = randomised & masked & ~replaced
    ids = torch.where(replaced, mask_token_id, torch.where(randomised, random_words, input_ids))
    return ids, torch.where(masked, input_ids, -100)


def keyword_votes(cls_attention: torch.Tensor, keys_per_head: int) -> torch.Tensor:
    """Per position, how many heads rank it among their ``keys_per_head`` most attended (B, L) integers."""
    batch, _, length = cls_attention.shape
    keys = cls_attention.reshape(-1, length).topk(min(keys_per_head, length), dim=-1).indices.view(batch, -1)
    counts = torch.zeros(batch, length, dtype=keys.dtype, device=keys.device)
    return counts.scatter_add_(1, keys, torch.ones_like(keys))


class SIMLAPretrain(MomentumMixin, nn.Module):
    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None, temp: float = 0.07) -> None:
        super().__init__()
        if config is None:
            raise ValueError("SIMLA pretraining model needs a config")
        if tokenizer is None:
            raise ValueError("SIMLA pretraining model needs the tokenizer (its vocabulary sizes the keyword heads)")
        config = with_defaults(config, "pretrain")
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self.cls_token_id = int(getattr(tokenizer, "cls_token_id", CLS_ID))
        self.pad_token_id = int(getattr(tokenizer, "pad_token_id", PAD_ID))
        self.mask_token_id = int(getattr(tokenizer, "mask_token_id", MASK_ID))
        self.mlm_probability = float(config["mlm_probability"])
        self.mlm_empty_mask_nan = bool(config["mlm_empty_mask_nan"])
        self._empty_mlm_steps: torch.Tensor | None = None
        embed_dim = int(config["embed_dim"])
        vision_width = int(config["vision_width"])

        self.visual_encoder = vit_from_config(config, mask_token=True)
        if not config["from_scratch"]:
            load_deit_weights(self.visual_encoder, config["deit_weights"] or DEIT_BASE_URL)

        bert_config = load_bert_config(config["bert_config"])
        distill_dim = int(config["distill_softmax_dim"])
        self.text_encoder = build_bert(BertForMaskedLM, bert_config, pretrained_source(config, text_encoder),
                                       distill_softmax_dim=distill_dim)
        text_width = bert_config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config["temp"])
        self.itm_head = nn.Linear(text_width, 2)
        self.mim_head = nn.Linear(self.visual_encoder.embed_dim, DALLE_VOCAB_SIZE)
        self.mim_head_m = nn.Linear(self.visual_encoder.embed_dim, DALLE_VOCAB_SIZE)

        self.visual_encoder_m = vit_from_config(config, mask_token=True)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertForMaskedLM(bert_config, distill_softmax_dim=distill_dim)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.concept_head = nn.Linear(embed_dim, self.vocab_size)
        self.concept_head_m = nn.Linear(embed_dim, self.vocab_size)

        self.init_momentum([
            [self.visual_encoder, self.visual_encoder_m],
            [self.vision_proj, self.vision_proj_m],
            [self.text_encoder, self.text_encoder_m],
            [self.text_proj, self.text_proj_m],
            [self.mim_head, self.mim_head_m],
            [self.concept_head, self.concept_head_m],
        ], config["momentum"])
        self.init_queues(embed_dim, config["queue_size"])

        psl_layer = config["psl_layer"]
        self.psl_layer = bert_config.num_hidden_layers - 1 if psl_layer is None else int(psl_layer)
        self.psl_keys_per_head = int(config["psl_keys_per_head"])
        self.psl_num_keywords = int(config["psl_num_keywords"])
        if config["grad_checkpointing"]:
            self.set_grad_checkpointing(True)
        # Exact reformulations of the step (attributes so a test can compare with the plain code).
        self.share_word_lookup = True
        self.share_image_kv = True
        self.pair_vit_passes = True
        # MLM/MIM heads on every position, averaged under the masks: no boolean indexing, so nothing waits for
        # the device; None: only off the CPU, where the extra head positions cost less than the waits
        self.static_shapes: bool | None = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def _count_empty_mlm(self, selected: torch.Tensor) -> None:
        empty = (~selected.any()).long()
        self._empty_mlm_steps = empty if self._empty_mlm_steps is None else self._empty_mlm_steps + empty

    def epoch_counters(self) -> dict[str, torch.Tensor]:
        """Counts since the last call: ``mlm_empty_steps``, steps whose batch had no masked token."""
        empty = self._empty_mlm_steps
        self._empty_mlm_steps = None
        return {"mlm_empty_steps": torch.zeros((), dtype=torch.long) if empty is None else empty}

    def mask(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-LM input ids and labels for this step."""
        return mask_tokens(input_ids, self.text_encoder.config.vocab_size, self.mlm_probability,
                           self.pad_token_id, self.cls_token_id, self.mask_token_id)

    def sample_itm_negatives(self, weights_t2i: torch.Tensor, weights_i2t: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of a hard negative image for each text, then of a hard negative text for each image."""
        return sample_negatives(weights_t2i), sample_negatives(weights_i2t)

    # ---------------------------------------------------------------------------------------------

    def forward(self, image: torch.Tensor, text: Any, visual_token_ids: torch.Tensor | None = None,
                masked_visual_token_pos: torch.Tensor | None = None,
                masked_visual_tok_labels: torch.Tensor | None = None, alpha: float = 0.0,
                return_intermediates: bool = False):
        """Returns ``(loss_mlm, loss_ita, loss_itm, loss_mim, loss_pseudolabels)``.

        ``masked_visual_token_pos`` (B, N) bool; ``masked_visual_tok_labels`` its d-VAE codes (row-major), or
        when None, ``visual_token_ids`` the (B, N) codes of every patch.
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            self._momentum_update()
        with cast_frozen_once([momentum for _, momentum in self.model_pairs], image.device.type):
            return self._losses(image, text, visual_token_ids, masked_visual_token_pos, masked_visual_tok_labels,
                                alpha, return_intermediates)

    def _losses(self, image: torch.Tensor, text: Any, visual_token_ids: torch.Tensor | None,
                masked_visual_token_pos: torch.Tensor | None, masked_visual_tok_labels: torch.Tensor | None,
                alpha: float, return_intermediates: bool):
        ids, text_mask = text.input_ids, text.attention_mask
        static = image.device.type != "cpu" if self.static_shapes is None else self.static_shapes
        inter: dict[str, Any] = {}

        # plain and masked ViT passes as one batch when that draws no random numbers
        pair_vit = self.pair_vit_passes and not (self.visual_encoder.draws_random_numbers()
                                                 or self.visual_encoder_m.draws_random_numbers())
        if pair_vit:
            image_embeds, masked_embeds = self.visual_encoder.forward_plain_and_masked(
                image, masked_visual_token_pos)
        else:
            image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        words = self.text_encoder.bert.embeddings.word_embeddings(ids) if self.share_word_lookup else None
        caption = {"input_ids": ids} if words is None else {"inputs_embeds": words}
        text_embeds = self.text_encoder.bert(**caption, attention_mask=text_mask, mode="text").last_hidden_state
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

        # ---- momentum features and ITA targets
        with torch.no_grad():
            if pair_vit:
                image_embeds_m, masked_embeds_m = self.visual_encoder_m.forward_plain_and_masked(
                    image, masked_visual_token_pos)
            else:
                image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            text_out_m = self.text_encoder_m.bert(ids, attention_mask=text_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_out_m.last_hidden_state[:, 0, :]), dim=-1)
        ita = ita_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)
        if return_intermediates:
            inter.update(image_feat=image_feat, text_feat=text_feat, image_feat_m=image_feat_m,
                         text_feat_m=text_feat_m, sim_i2t=ita.sim_i2t, sim_t2i=ita.sim_t2i,
                         sim_i2t_targets=ita.sim_i2t_targets, sim_t2i_targets=ita.sim_t2i_targets)

        # ---- ITM with hard negatives
        # the online fusion passes share one projection of image_embeds (exact, see CrossKeyValues)
        image_kv = self.text_encoder.bert.cross_key_values(image_embeds) if self.share_image_kv else None
        output_pos = self.text_encoder.bert(**caption, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                                            encoder_attention_mask=image_atts, mode="multimodal",
                                            encoder_kv=image_kv)
        batch = image.shape[0]

        def fuse_negatives(neg_image_idx: torch.Tensor, neg_text_idx: torch.Tensor) -> torch.Tensor:
            image_rows = torch.cat([neg_image_idx, torch.arange(batch, device=neg_image_idx.device)])
            if image_kv is None:
                neg_states, neg_kv = image_embeds[image_rows], None
            else:
                neg_states, neg_kv = None, image_kv.select(image_rows)
            if words is None:
                neg_caption = {"input_ids": torch.cat([ids, ids[neg_text_idx]], dim=0)}
            else:
                neg_caption = {"inputs_embeds": torch.cat([words, words[neg_text_idx]], dim=0)}
            return self.text_encoder.bert(
                **neg_caption, attention_mask=torch.cat([text_mask, text_mask[neg_text_idx]], dim=0),
                encoder_hidden_states=neg_states, encoder_attention_mask=torch.cat([image_atts, image_atts], dim=0),
                mode="multimodal", encoder_kv=neg_kv).last_hidden_state[:, 0, :]

        itm = itm_loss(self, output_pos.last_hidden_state[:, 0, :], ita, fuse_negatives)
        if return_intermediates:
            inter.update(itm_logits=itm.logits, itm_labels=itm.labels, itm_negative_text_ids=ids[itm.neg_text_idx],
                         itm_negative_image_index=itm.neg_image_idx, itm_negative_text_index=itm.neg_text_idx)

        # ---- MLM: masked text attending to the image
        mlm_ids, mlm_labels = self.mask(ids)
        selected = mlm_labels != -100
        with torch.no_grad():
            hidden_m = self.text_encoder_m.bert(mlm_ids, attention_mask=text_mask, encoder_hidden_states=image_embeds_m,
                                                encoder_attention_mask=image_atts, mode="multimodal").last_hidden_state
            soft_labels_mlm = F.softmax(self.text_encoder_m.cls(hidden_m if static else hidden_m[selected]), dim=-1)
        loss_mlm = self.text_encoder(mlm_ids, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_atts, labels=mlm_labels,
                                     soft_labels=soft_labels_mlm, alpha=alpha, mode="multimodal",
                                     encoder_kv=image_kv, nan_without_labels=self.mlm_empty_mask_nan).loss
        self._count_empty_mlm(selected)
        if return_intermediates:
            inter.update(mlm_input_ids=mlm_ids, mlm_labels=mlm_labels,
                         mlm_teacher_logits=self.text_encoder_m.cls(hidden_m).detach())

        # ---- MIM: masked image patches (as BERT queries) attending to the caption's embeddings
        masked_pos = masked_visual_token_pos.flatten(1).bool()
        if masked_visual_tok_labels is None and visual_token_ids is None:
            raise ValueError("the MIM loss needs masked_visual_tok_labels or visual_token_ids (none given)")
        with torch.no_grad():
            if not pair_vit:
                masked_embeds_m = self.visual_encoder_m(image, masked_visual_token_pos)
            cross_m = self.text_encoder_m.bert(inputs_embeds=masked_embeds_m, attention_mask=image_atts,
                                               encoder_hidden_states=self.text_encoder.bert.embeddings(**caption),
                                               encoder_attention_mask=text_mask)
            patches_m = cross_m.last_hidden_state[:, 1:]
            soft_labels_mim = F.softmax(self.mim_head_m(patches_m if static else patches_m[masked_pos]), dim=-1)
        if not pair_vit:
            masked_embeds = self.visual_encoder(image, masked_visual_token_pos)
        cross = self.text_encoder.bert(inputs_embeds=masked_embeds, attention_mask=image_atts,
                                       encoder_hidden_states=self.text_encoder.bert.embeddings(**caption),
                                       encoder_attention_mask=text_mask)
        patches = cross.last_hidden_state[:, 1:]
        predicted_visual_tokens = self.mim_head(patches if static else patches[masked_pos])
        mim_distill = -torch.sum(F.log_softmax(predicted_visual_tokens, dim=-1) * soft_labels_mim, dim=-1)
        if static:  # every patch scored: the masked ones' codes on the (B, N) grid, -100 elsewhere
            if masked_visual_tok_labels is None:
                code_grid = torch.where(masked_pos, visual_token_ids.flatten(1), -100)
            else:
                code_grid = torch.full_like(masked_pos, -100, dtype=torch.long).masked_scatter(
                    masked_pos, masked_visual_tok_labels)
            loss_mim_hard = F.cross_entropy(predicted_visual_tokens.flatten(0, 1), code_grid.flatten())
            mim_distill = masked_mean(mim_distill, masked_pos)
        else:
            if masked_visual_tok_labels is None:
                masked_visual_tok_labels = visual_token_ids.flatten(1)[masked_pos]
            loss_mim_hard = F.cross_entropy(predicted_visual_tokens, masked_visual_tok_labels)
            mim_distill = mim_distill.mean()
        loss_mim = (1 - alpha) * loss_mim_hard + alpha * mim_distill
        if return_intermediates:
            inter.update(mim_loss_hard=loss_mim_hard, mim_loss_distill=mim_distill)

        # ---- PSL: keywords from the momentum encoder's [CLS] attention as multi-label targets
        with torch.no_grad():
            salient = self.salient_tokens(ids, text_mask, image_embeds, image_atts)
            hard_targets = torch.zeros(batch, self.vocab_size, device=image.device)
            hard_targets.scatter_(1, salient, 1)
            hard_targets[:, self.cls_token_id] = 0
            soft_targets = torch.sigmoid(self._concept_logits(self.concept_head_m, image_feat_m))
        predictions = self._concept_logits(self.concept_head, image_feat)
        loss_psl_hard = F.binary_cross_entropy_with_logits(predictions, hard_targets)
        loss_psl_soft = F.binary_cross_entropy_with_logits(predictions, soft_targets)
        loss_pseudolabels = (1 - alpha) * loss_psl_hard + alpha * loss_psl_soft
        if return_intermediates:
            inter.update(most_salient_tokens=salient, concept_hard_targets=hard_targets,
                         concept_soft_targets=soft_targets, pseudolabel_predictions=predictions,
                         loss_pseudolabels_hard=loss_psl_hard, loss_pseudolabels_soft=loss_psl_soft)

        losses = (loss_mlm, ita.loss, itm.loss, loss_mim, loss_pseudolabels)
        return (*losses, inter) if return_intermediates else losses

    @staticmethod
    def _concept_logits(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
        """The keyword head: one logit per vocabulary entry for each of a few feature rows."""
        return vocabulary_projection(features, head.weight, head.bias)

    @torch.no_grad()
    def keyword_attention(self, ids: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor,
                          image_atts: torch.Tensor) -> torch.Tensor:
        """The momentum text encoder's [CLS] attention row at ``psl_layer`` (B, heads, L)."""
        out = self.text_encoder_m.bert(ids, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts, mode="multimodal",
                                       output_attentions=[self.psl_layer])
        return out.attentions[0][:, :, 0]

    @torch.no_grad()
    def salient_tokens(self, ids: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor,
                       image_atts: torch.Tensor) -> torch.Tensor:
        """Token ids of the positions the momentum text encoder's [CLS] attends to most (B, keywords)."""
        counts = keyword_votes(self.keyword_attention(ids, text_mask, image_embeds, image_atts),
                               self.psl_keys_per_head)
        positions = counts.topk(min(self.psl_num_keywords, ids.shape[1]), dim=-1).indices
        return torch.gather(ids, 1, positions)


SIMLA = SIMLAPretrain


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SIMLAPretrain, own: bool = False) -> FilteredState:
    """A pretraining checkpoint (to resume, or to start from) loads as it is, every key matching."""
    del model, own
    return FilteredState(dict(state_dict), "a pretraining checkpoint", strict=True)


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLAPretrain:
    """The model as the original builds it for a state-dict manifest (no pretrained weights)."""
    tokenizer = SimpleNamespace(vocab_size=vocab_size, cls_token_id=CLS_ID, pad_token_id=PAD_ID,
                                mask_token_id=MASK_ID)
    return SIMLAPretrain(tokenizer=tokenizer, config=dict(config, from_scratch=True))
