"""SIMLA image-text retrieval model: ITA with image-id aware targets and queues, ITM with hard negatives.

The same model serves ``Retrieval.py``, ``zero_shot_retrieval.py`` and ``Grounding.py``. Besides
``forward`` (the two fine-tuning losses) it exposes the pieces evaluation and Grad-CAM need:
:meth:`SIMLA.image_features`, :meth:`SIMLA.text_features` and :meth:`SIMLA.itm_logits`.

Config keys read: ``image_res``, ``vision_width``, ``embed_dim``, ``temp``, ``queue_size``,
``momentum``, ``bert_config``, ``mlm_probability``; optional ``vit_mask_token`` (True, as the
original's default; every shipped YAML sets false), ``freeze_visual_encoder`` (False),
``from_scratch`` (False: DeiT and BERT weights are loaded), ``deit_weights``, ``grad_checkpointing``
(False), ``vision_depth``/``vision_heads``/``patch_size`` (ViT-B/16), ``enqueue_idx`` (False).

``enqueue_idx``: the original SIMLA code registers an ``idx_queue`` of image ids but never writes to
it, so queued features are never positives, not even for other captions of the same image. With
``enqueue_idx: true`` the ids of each step are written next to the queued features (ALBEF's
behaviour), making those queue columns positives too.

Checkpoints: :data:`CHECKPOINT_RULES` declares, per script, how a checkpoint's ``model`` state_dict is
mapped onto this model (position-embedding interpolation, the ``bert.`` renames of pretraining
checkpoints, dropping of unknown entries, strictness); :func:`load_retrieval_checkpoint` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bert import BertModel, CrossKeyValues, build_bert, load_bert_config, pretrained_source
from models.simla.momentum import MomentumMixin
from models.simla.pretrain import mask_tokens, sample_negatives
from models.vit import DEIT_BASE_URL, interpolate_pos_embed, load_deit_weights, vit_from_config

PAD_ID, CLS_ID, MASK_ID = 0, 101, 103
# id of the queue columns that hold no image id (the original fills idx_queue with it)
NO_IMAGE_ID = -100


class SIMLA(MomentumMixin, nn.Module):
    """Retrieval model; ``forward(image, text, alpha, idx)`` returns ``(loss_ita, loss_itm)``.

    ``idx_queue=False`` builds it without the ``idx_queue`` buffer, as ``zero_shot_retrieval.py``
    uses it (the original deletes that buffer after construction).
    """

    def __init__(self, text_encoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None, temp: float = 0.07, init_deit: bool = True,
                 idx_queue: bool = True) -> None:
        super().__init__()
        if config is None:
            raise ValueError("SIMLA retrieval model needs a config")
        self.tokenizer = tokenizer
        self.mlm_probability = float(config["mlm_probability"])
        embed_dim = int(config["embed_dim"])
        vision_width = int(config["vision_width"])
        from_scratch = bool(config.get("from_scratch", False))
        self.enqueue_idx = bool(config.get("enqueue_idx", False))

        self.visual_encoder = vit_from_config(config)
        if init_deit and not from_scratch:
            load_deit_weights(self.visual_encoder, config.get("deit_weights") or DEIT_BASE_URL)

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

        if config.get("freeze_visual_encoder", False):
            for param in self.visual_encoder.parameters():
                param.requires_grad = False
        if config.get("grad_checkpointing", False):
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    # --- pieces shared with evaluation and Grad-CAM -------------------------------------------------

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_embeds (B, N+1, D), image_feat (B, E))``: ViT output and its normalised projection."""
        image_embeds = self.visual_encoder(image)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_embeds (B, L, D), text_feat (B, E))`` from the text-only pass; with ``cls_only`` the
        last layer computes (and ``text_embeds`` holds) the [CLS] row alone, which is all ``text_feat``
        reads."""
        text_embeds = self.text_encoder(input_ids, attention_mask=attention_mask, mode="text",
                                        output_rows=1 if cls_only else None).last_hidden_state
        return text_embeds, F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor | None = None, image_atts: torch.Tensor | None = None,
                   image_kv: CrossKeyValues | None = None, cls_only: bool = False) -> torch.Tensor:
        """Match / no-match logits ``(B, 2)`` of text ``b`` with image ``b`` (fusion pass + ITM head).

        The images are given as ViT states ``image_embeds`` or, projected once for many pairs, as
        ``image_kv`` (:meth:`image_key_values`, rows selected per pair). ``cls_only`` computes only the
        [CLS] row in the last fusion layer (same logits; the other rows' attention maps are not made)."""
        if image_atts is None and image_embeds is not None:
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        output = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts, mode="multimodal", encoder_kv=image_kv,
                                   output_rows=1 if cls_only else None)
        return self.itm_head(output.last_hidden_state[:, 0, :])

    def image_key_values(self, image_embeds: torch.Tensor) -> CrossKeyValues:
        """The fusion layers' keys and values of ViT states, for :meth:`itm_logits` (``image_kv``)."""
        return self.text_encoder.cross_key_values(image_embeds, mode="multimodal")

    # --- training -----------------------------------------------------------------------------------

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
        """Returns ``(loss_ita, loss_itm)``; ``text`` carries ``input_ids`` and ``attention_mask`` (B, L),
        ``idx`` (B,) the integer image id of each pair (captions of one image share it)."""
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
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_out_m = self.text_encoder_m(ids, attention_mask=text_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_out_m.last_hidden_state[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx if self.enqueue_idx else None)

        # ITM: the positive pairs, then (text, hard negative image) and (hard negative text, image)
        output_pos = self.text_encoder(ids, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts, mode="multimodal")
        batch = image.shape[0]
        with torch.no_grad():
            weights_i2t = F.softmax(sim_i2t[:, :batch].float(), dim=1)
            weights_t2i = F.softmax(sim_t2i[:, :batch].float(), dim=1)
            same_image = torch.eq(idx, idx.t())
            weights_i2t.masked_fill_(same_image, 0)
            weights_t2i.masked_fill_(same_image, 0)
        neg_image_idx, neg_text_idx = self.sample_itm_negatives(weights_t2i, weights_i2t)
        image_embeds_neg = image_embeds[neg_image_idx]
        text_ids_neg, text_mask_neg = ids[neg_text_idx], text_mask[neg_text_idx]
        output_neg = self.text_encoder(
            torch.cat([ids, text_ids_neg], dim=0), attention_mask=torch.cat([text_mask, text_mask_neg], dim=0),
            encoder_hidden_states=torch.cat([image_embeds_neg, image_embeds], dim=0),
            encoder_attention_mask=torch.cat([image_atts, image_atts], dim=0), mode="multimodal")
        vl_embeddings = torch.cat([output_pos.last_hidden_state[:, 0, :], output_neg.last_hidden_state[:, 0, :]])
        vl_output = self.itm_head(vl_embeddings)
        itm_labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
                               ).to(image.device)
        loss_itm = F.cross_entropy(vl_output, itm_labels)

        if not return_intermediates:
            return loss_ita, loss_itm
        inter = dict(image_feat=image_feat, text_feat=text_feat, image_feat_m=image_feat_m, text_feat_m=text_feat_m,
                     sim_targets=sim_targets, sim_i2t=sim_i2t, sim_t2i=sim_t2i, sim_i2t_targets=sim_i2t_targets,
                     sim_t2i_targets=sim_t2i_targets, itm_logits=vl_output, itm_labels=itm_labels,
                     itm_negative_image_index=neg_image_idx, itm_negative_text_index=neg_text_idx,
                     itm_negative_text_ids=text_ids_neg)
        return loss_ita, loss_itm, inter


# --- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRules:
    """How one script maps a checkpoint's ``model`` state_dict onto the retrieval model.

    In order: the ViT position embeddings named in ``pos_embeds`` are resized to the model's grid;
    with ``strip_bert`` every key containing ``bert.`` loses each ``bert.`` (a pretraining checkpoint
    holds ``text_encoder.bert.X``, this model ``text_encoder.X``); with ``drop_unknown`` entries the
    model has no key for are discarded; then the state is loaded with ``strict``.
    """

    script: str
    strip_bert: bool = True
    drop_unknown: bool = False
    strict: bool = False
    pos_embeds: tuple[str, ...] = field(default=("visual_encoder", "visual_encoder_m"))


#: The one declared mapping per script, as the original scripts load checkpoints.
CHECKPOINT_RULES: dict[str, CheckpointRules] = {
    # pretraining checkpoints: idx_queue stays missing; MLM heads, mim/concept heads, mask tokens are
    # unexpected (not loaded); a Retrieval.py checkpoint has no 'bert.' key and loads as it is
    "Retrieval.py": CheckpointRules("Retrieval.py"),
    "Grounding.py": CheckpointRules("Grounding.py"),
    # the model has no idx_queue; whatever the model lacks is dropped and the rest must fit exactly
    "zero_shot_retrieval.py": CheckpointRules("zero_shot_retrieval.py", drop_unknown=True, strict=True),
}


def checkpoint_rules(script: str) -> CheckpointRules:
    """The declared rules of ``script`` (a clear error for a script without any)."""
    if script not in CHECKPOINT_RULES:
        raise KeyError(f"no checkpoint rules for {script!r}; known scripts: {sorted(CHECKPOINT_RULES)}")
    return CHECKPOINT_RULES[script]


def rename_checkpoint_keys(state_dict: Mapping[str, torch.Tensor], script: str
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply ``script``'s key renames; returns the renamed state and ``{new key: old key}``."""
    rules = checkpoint_rules(script)
    renamed: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key.replace("bert.", "") if rules.strip_bert and "bert." in key else key
        if new_key in out:
            first = renamed.get(new_key, new_key)
            raise ValueError(f"checkpoint keys {first!r} and {key!r} both map to {new_key!r}")
        if new_key != key:
            renamed[new_key] = key
        out[new_key] = value
    return out, renamed


@dataclass
class CheckpointLoad:
    """What loading a checkpoint did: renamed keys ``{new: old}``, model keys left missing, checkpoint
    keys the model has no place for (``unexpected_keys``, or ``dropped_keys`` where the rules discard
    them before loading)."""

    renamed: dict[str, str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    dropped_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"_IncompatibleKeys(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"


def prepare_checkpoint_state(state_dict: Mapping[str, torch.Tensor], model: nn.Module, script: str
                             ) -> tuple[dict[str, torch.Tensor], CheckpointLoad]:
    """The state to load into ``model`` under ``script``'s rules, and the resulting key report."""
    rules = checkpoint_rules(script)
    state = dict(state_dict)
    for name in rules.pos_embeds:
        key = f"{name}.pos_embed"
        encoder = getattr(model, name, None)
        if key in state and encoder is not None:
            state[key] = interpolate_pos_embed(state[key], encoder)
    state, renamed = rename_checkpoint_keys(state, script)
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    dropped: list[str] = []
    if rules.drop_unknown:
        state = {k: v for k, v in state.items() if k in own}
        dropped, unknown = unknown, []
    missing = [k for k in own if k not in state]
    return state, CheckpointLoad(renamed=renamed, missing_keys=missing, unexpected_keys=unknown,
                                 dropped_keys=dropped)


def load_retrieval_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str,
                              script: str) -> CheckpointLoad:
    """Load a checkpoint's ``model`` state into the retrieval model the way ``script`` does.

    Shape mismatches always fail with the list of offending keys; under a strict rule missing keys
    do too. Prints the original's load message (missing and unexpected keys).
    """
    from engine.checkpoint import PRETRAINING_ONLY_KEYS, CheckpointFit, check_checkpoint_fit, load_model_state

    rules = checkpoint_rules(script)
    state, report = prepare_checkpoint_state(state_dict, model, script)
    if not rules.strict:
        # a pretraining checkpoint lacks the id queue and brings heads this model drops; anything
        # else means the checkpoint belongs to another model
        fit = CheckpointFit(script, "a pretraining or retrieval checkpoint", missing=("idx_queue",),
                            unexpected=PRETRAINING_ONLY_KEYS)
        check_checkpoint_fit(model, state, path, fit)
    load_model_state(model, state, path, strict=rules.strict)
    print(report)
    return report


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLA:
    """The model as the original builds it for a state-dict manifest (no pretrained weights)."""
    del vocab_size  # the retrieval model has no vocabulary-sized head
    return SIMLA(config=dict(config, from_scratch=True))
