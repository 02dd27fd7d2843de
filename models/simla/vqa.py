"""SIMLA visual question answering: a fused question encoder and a causal answer decoder."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import with_defaults
from models.bert import BertLMHeadModel, BertModel, build_bert, load_bert_config, pretrained_source
from models.simla.checkpoint_keys import PRETRAINING_ONLY_KEYS, FilteredState, without_bert
from models.simla.momentum import FINE_TUNING_MOMENTUM, MomentumMixin
from models.vit import vit_from_config

PAD_ID = 0
DEFAULT_DECODER_DEPTH = 6

PRETRAIN_CHECKPOINT_MISSING: tuple[str, ...] = ()


class SIMLAVQA(MomentumMixin, nn.Module):
    def __init__(self, text_encoder: str | None = None, text_decoder: str | None = None, tokenizer: Any = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            raise ValueError("SIMLA VQA model needs a config")
        config = with_defaults(config, "vqa")
        self.tokenizer = tokenizer
        self.pad_token_id = int(getattr(tokenizer, "pad_token_id", PAD_ID) if tokenizer is not None else PAD_ID)
        self.distill = bool(config["distill"])
        self.distill_alpha = bool(config["vqa_distill_alpha"])

        encoder_config = load_bert_config(config["bert_config"])
        self.decoder_depth = int(config["decoder_depth"])
        if self.decoder_depth < 1:
            raise ValueError(f"config key 'decoder_depth' must be at least 1, got {self.decoder_depth}")
        decoder_config = load_bert_config(config["bert_config"], num_hidden_layers=self.decoder_depth)
        distill_dim = int(config["distill_softmax_dim"])

        self.visual_encoder = vit_from_config(config)
        self.text_encoder = build_bert(BertModel, encoder_config, pretrained_source(config, text_encoder))
        self.text_decoder = build_bert(BertLMHeadModel, decoder_config,
                                       pretrained_source(config, text_decoder, "text_decoder"),
                                       distill_softmax_dim=distill_dim)

        if self.distill:
            self.visual_encoder_m = vit_from_config(config)
            self.text_encoder_m = BertModel(encoder_config, add_pooling_layer=False)
            self.text_decoder_m = BertLMHeadModel(decoder_config, distill_softmax_dim=distill_dim)
            self.init_momentum([
                [self.visual_encoder, self.visual_encoder_m],
                [self.text_encoder, self.text_encoder_m],
                [self.text_decoder, self.text_decoder_m],
            ], FINE_TUNING_MOMENTUM)
        if config["grad_checkpointing"]:
            self.visual_encoder.set_grad_checkpointing(True)
            self.text_encoder.set_grad_checkpointing(True)
            self.text_decoder.set_grad_checkpointing(True)

    def _encode_question(self, visual_encoder: nn.Module, text_encoder: nn.Module, image: torch.Tensor,
                         question: Any) -> torch.Tensor:
        image_embeds = visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        return text_encoder(question.input_ids, attention_mask=question.attention_mask,
                            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                            mode="multimodal").last_hidden_state

    def forward(self, image: torch.Tensor, question: Any, answer: Any = None, alpha: float = 0.0,
                k: Sequence[int] | int | None = None, weights: torch.Tensor | None = None, train: bool = True):
        """Training: ``sum(weights * answer NLL) / batch``; else ``(topk_ids, topk_probs)``, ``(B, k)``."""
        if answer is None:
            raise ValueError("the VQA model needs the answer tokens (training answers or the answer list)")
        if not train:
            if k is None or isinstance(k, Sequence):
                raise ValueError(f"evaluation needs k (the k_test number of ranked answers), got {k!r}")
            states = self._encode_question(self.visual_encoder, self.text_encoder, image, question)
            return self.rank_answer(states, question.attention_mask, answer.input_ids, answer.attention_mask,
                                    int(k))

        batch = image.shape[0]
        counts = self._answer_counts(k, batch, answer.input_ids.shape[0]).to(image.device)
        if weights is None or weights.shape != (answer.input_ids.shape[0],):
            shape = None if weights is None else tuple(weights.shape)
            raise ValueError(f"weights must hold one value per answer ({answer.input_ids.shape[0]}), got {shape}")
        targets = answer.input_ids.masked_fill(answer.input_ids == self.pad_token_id, -100)

        states = self._encode_question(self.visual_encoder, self.text_encoder, image, question)
        states_rep = states.repeat_interleave(counts, dim=0)
        atts_rep = question.attention_mask.repeat_interleave(counts, dim=0)

        soft_labels = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                if self.distill_alpha:
                    states_m = self._encode_question(self.visual_encoder_m, self.text_encoder_m, image, question)
                    logits_m = self.text_decoder_m(answer.input_ids, attention_mask=answer.attention_mask,
                                                   encoder_hidden_states=states_m.repeat_interleave(counts, dim=0),
                                                   encoder_attention_mask=atts_rep, return_logits=True)
                    soft_labels = F.softmax(logits_m, dim=-1)
        output = self.text_decoder(answer.input_ids, attention_mask=answer.attention_mask,
                                   encoder_hidden_states=states_rep, encoder_attention_mask=atts_rep,
                                   labels=targets, soft_labels=soft_labels,
                                   alpha=alpha if soft_labels is not None else 0.0, reduction="none")
        return (weights * output.loss).sum() / batch

    @staticmethod
    def _answer_counts(k: Any, batch: int, num_answers: int) -> torch.Tensor:
        if k is None or isinstance(k, int):
            raise ValueError(f"training needs k, the number of answers of each question, got {k!r}")
        counts = torch.as_tensor(list(k), dtype=torch.long)
        if counts.numel() != batch or int(counts.sum()) != num_answers or bool((counts < 1).any()):
            raise ValueError(f"answer counts k={list(k)} do not fit {batch} questions and {num_answers} answers")
        return counts

    @torch.no_grad()
    def rank_answer(self, question_states: torch.Tensor, question_atts: torch.Tensor, answer_ids: torch.Tensor,
                    answer_atts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-score the ``k`` best first tokens by answer likelihood (first token twice, as the original)."""
        num_questions = question_states.shape[0]
        num_answers = answer_ids.shape[0]
        if not 1 <= k <= num_answers:
            raise ValueError(f"k_test is {k} but the answer list has {num_answers} answers "
                             f"(k_test must be between 1 and the number of answers)")
        start_ids = answer_ids[0, 0].repeat(num_questions, 1)  # the [CLS] every answer starts with
        start_logits = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_atts).logits[:, 0, :]
        first_token_probs = F.softmax(start_logits, dim=1).index_select(1, answer_ids[:, 1])
        topk_probs, topk_ids = first_token_probs.topk(k, dim=1)

        flat_ids = topk_ids.reshape(-1)
        input_ids = answer_ids.index_select(0, flat_ids)
        input_atts = answer_atts.index_select(0, flat_ids)
        targets = input_ids.masked_fill(input_ids == self.pad_token_id, -100)
        output = self.text_decoder(input_ids, attention_mask=input_atts,
                                   encoder_hidden_states=question_states.repeat_interleave(k, dim=0),
                                   encoder_attention_mask=question_atts.repeat_interleave(k, dim=0),
                                   labels=targets, reduction="none")
        scores = (topk_probs.reshape(-1).log() - output.loss).view(num_questions, k)
        probs, order = F.softmax(scores, dim=-1).topk(k, dim=1)
        return torch.gather(topk_ids, 1, order), probs


SIMLA = SIMLAVQA


_ENCODER_LAYER = re.compile(r"^(text_encoder(?:_m)?)\.bert\.encoder\.layer\.(\d+)\.(.+)$")


def is_pretrain_layout(keys: Iterable[str]) -> bool:
    """Whether a state_dict has the pretraining model's text layout (``text_encoder.bert.*``, no decoder)."""
    keys = list(keys)
    return (any(k.startswith("text_encoder.bert.") for k in keys)
            and not any(k.startswith(("text_decoder.", "text_decoder_m.")) for k in keys))


def pretrain_key_sources(keys: Iterable[str], decoder_depth: int = DEFAULT_DECODER_DEPTH) -> dict[str, str]:
    """The renamed keys of a pretraining checkpoint loaded into the VQA model, ``{target: source}``."""
    keys = list(keys)
    depth_by_prefix: dict[str, int] = {}
    for key in keys:
        match = _ENCODER_LAYER.match(key)
        if match:
            prefix, index = match.group(1), int(match.group(2))
            depth_by_prefix[prefix] = max(depth_by_prefix.get(prefix, 0), index + 1)
    for prefix, depth in depth_by_prefix.items():
        if decoder_depth > depth:
            raise ValueError(f"decoder_depth is {decoder_depth} but the checkpoint's {prefix} has only {depth} "
                             "layers to initialise the answer decoder from")
    sources: dict[str, str] = {}
    for key in keys:
        if not key.startswith(("text_encoder.", "text_encoder_m.")):
            continue
        prefix, rest = key.split(".", 1)
        decoder = prefix.replace("text_encoder", "text_decoder")
        if rest.startswith("bert."):
            sources[without_bert(key)] = key
        match = _ENCODER_LAYER.match(key)
        if match:
            first = depth_by_prefix[prefix] - decoder_depth
            index = int(match.group(2))
            if index >= first:
                sources[f"{decoder}.bert.encoder.layer.{index - first}.{match.group(3)}"] = key
        else:
            sources[f"{decoder}.{rest}"] = key
    return sources


def map_pretrain_checkpoint(state_dict: Mapping[str, torch.Tensor],
                            decoder_depth: int = DEFAULT_DECODER_DEPTH) -> dict[str, torch.Tensor]:
    """A pretraining-layout state_dict renamed for the VQA model; other layouts are returned unchanged."""
    if not is_pretrain_layout(state_dict):
        return dict(state_dict)
    sources = pretrain_key_sources(state_dict, decoder_depth)
    mapped = {k: v for k, v in state_dict.items() if not k.startswith(("text_encoder.", "text_encoder_m."))}
    for target, source in sources.items():
        mapped[target] = state_dict[source]
    return mapped


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SIMLAVQA, own: bool = False) -> FilteredState:
    """``own``: a VQA checkpoint as it is; otherwise a pretraining checkpoint renamed onto the model."""
    if own:
        return FilteredState(dict(state_dict), "a VQA.py checkpoint")
    return FilteredState(map_pretrain_checkpoint(state_dict, model.decoder_depth),
                         "a pretraining (or VQA.py) checkpoint", missing=PRETRAIN_CHECKPOINT_MISSING,
                         unexpected=PRETRAINING_ONLY_KEYS)


def build_for_manifest(config: Mapping[str, Any], vocab_size: int) -> SIMLAVQA:
    tokenizer = SimpleNamespace(vocab_size=vocab_size, pad_token_id=PAD_ID)
    return SIMLAVQA(tokenizer=tokenizer, config=dict(config, from_scratch=True))
