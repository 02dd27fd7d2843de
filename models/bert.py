"""One BERT implementation for every SIMLA model, with the original's state-dict keys.

Layouts: ``med`` (pretraining, retrieval, VQA, VE; cross-attention only in ``multimodal`` mode) and
``xbert`` (NLVR; token types, layers ``>= fusion_layer`` always cross-attend).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from models.attention import AttentionCapture, attention, merge_heads, split_heads
from models.lean_autograd import LeanDropout, gelu_linear, has_module_hooks, vocabulary_projection

SELF_ATTENTION_MASK_VALUE = -10000.0
KeyValue = tuple[torch.Tensor, torch.Tensor]
MULTIMODAL_MODES = ("multimodal", "multi_modal")


def load_bert_config(path_or_dict: str | dict, **overrides: Any) -> BertConfig:
    """Read a BERT JSON config (or dict) and apply field overrides."""
    if isinstance(path_or_dict, dict):
        data = dict(path_or_dict)
    else:
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f"BERT config file not found: {path_or_dict}")
        data = BertConfig.from_json_file(path_or_dict).to_dict()
    data.update(overrides)
    return BertConfig(**data)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CrossKeyValues:
    """Cross-attention keys and values ``(B, H, S, D)`` of encoder states, per cross-attending layer.

    Computed once and shared by fusion passes over the same states (exact); ``rows`` (from :meth:`select`)
    picks/reorders batch rows lazily, when a layer reads its keys.
    """

    layers: dict[int, KeyValue]
    rows: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> CrossKeyValues:
        """Keys and values of ``states[index]`` (a selection, repetition or reordering of the batch rows)."""
        return CrossKeyValues(self.layers, index if self.rows is None else self.rows[index])

    def layer(self, i: int) -> KeyValue | None:
        """Keys and values for layer ``i`` (None if that layer does not cross-attend)."""
        kv = self.layers.get(i)
        if kv is None or self.rows is None:
            return kv
        return kv[0][self.rows], kv[1][self.rows]

    def states_shape(self) -> tuple[int, int]:
        """``(batch, length)`` of the encoder states these keys stand for."""
        key = next(iter(self.layers.values()))[0]
        return (key.shape[0] if self.rows is None else self.rows.shape[0]), key.shape[2]


@dataclass
class LMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    last_hidden_state: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig, token_types: bool) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if token_types:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        else:
            self.token_type_embeddings = None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LeanDropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=True)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, past_key_values_length: int = 0) -> torch.Tensor:
        """``inputs_embeds`` are word vectors (``word_embeddings(input_ids)``)."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        length = inputs_embeds.shape[1]
        position_ids = self.position_ids[:, past_key_values_length: past_key_values_length + length]
        embeddings = inputs_embeds + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(AttentionCapture, nn.Module):
    def __init__(self, config: BertConfig, is_cross_attention: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        if hidden % config.num_attention_heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        kv_width = getattr(config, "encoder_width", hidden) if is_cross_attention else hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.save_attention = False

    def key_value(self, states: torch.Tensor) -> KeyValue:
        """Keys and values ``(B, H, S, D)`` of ``states``: what a query pass attends to."""
        heads = self.num_attention_heads
        return split_heads(self.key(states), heads), split_heads(self.value(states), heads)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor | None = None, output_attentions: bool = False,
                encoder_kv: KeyValue | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = split_heads(self.query(hidden_states), self.num_attention_heads)
        if encoder_kv is None:
            encoder_kv = self.key_value(hidden_states if encoder_hidden_states is None else encoder_hidden_states)
        k, v = encoder_kv
        drop = self.dropout_prob if self.training else 0.0
        context, probs = attention(q, k, v, attention_mask, dropout_p=drop, need_probs=output_attentions,
                                   capture=self.capture if self.save_attention else None)
        return merge_heads(context), probs


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LeanDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor | None = None, output_attentions: bool = False,
                encoder_kv: KeyValue | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.self(hidden_states, attention_mask, encoder_hidden_states, output_attentions,
                                   encoder_kv)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("gelu", "relu"):
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (expected 'gelu' or 'relu')")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU() if config.hidden_act == "gelu" else nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LeanDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.add_and_norm(self.dense(hidden_states), input_tensor)

    def add_and_norm(self, projected: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The part after ``dense``: dropout, residual sum and layer norm."""
        return self.LayerNorm(self.dropout(projected) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, has_cross_attention: bool, always_cross: bool) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.has_cross_attention = has_cross_attention
        # xbert layers run their cross-attention whatever the mode; med layers only in multimodal mode
        self.always_cross = always_cross
        if has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def runs_cross_attention(self, mode: str) -> bool:
        return self.has_cross_attention and (self.always_cross or mode in MULTIMODAL_MODES)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor | None, encoder_attention_mask: torch.Tensor | None,
                mode: str, output_attentions: bool, encoder_kv: KeyValue | None = None,
                query_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``query_rows``: compute the outputs of the first positions only (same values for those rows)."""
        if query_rows is None:
            hidden_states, self_probs = self.attention(hidden_states, attention_mask, None, output_attentions)
        else:
            queries = hidden_states[:, :query_rows]
            if attention_mask is not None and attention_mask.shape[-2] > 1:
                attention_mask = attention_mask[..., :query_rows, :]
            hidden_states, self_probs = self.attention(queries, attention_mask, hidden_states, output_attentions)
        cross_probs = None
        if self.runs_cross_attention(mode):
            if encoder_hidden_states is None and encoder_kv is None:
                raise ValueError("encoder_hidden_states must be given for cross-attention layers "
                                 f"(mode={mode!r})")
            hidden_states, cross_probs = self.crossattention(
                hidden_states, encoder_attention_mask, encoder_hidden_states, output_attentions, encoder_kv)
        return self.feed_forward(hidden_states), self_probs, cross_probs

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``output(intermediate(x), x)``; with GELU via :func:`~models.lean_autograd.gelu_linear`."""
        act = self.intermediate.intermediate_act_fn
        if not isinstance(act, nn.GELU) or has_module_hooks(self.intermediate, act, self.output):
            return self.output(self.intermediate(hidden_states), hidden_states)
        pre_activation = self.intermediate.dense(hidden_states)
        projected = gelu_linear(pre_activation, self.output.dense, act.approximate)
        return self.output.add_and_norm(projected, hidden_states)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, layout: str) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        num_layers = config.num_hidden_layers
        if layout == "med":
            self.fusion_layer = 0
            cross = [bool(getattr(config, "add_cross_attention", False))] * num_layers
        else:
            self.fusion_layer = int(getattr(config, "fusion_layer", num_layers))
            cross = [i >= self.fusion_layer for i in range(num_layers)]
        self.layer = nn.ModuleList(BertLayer(config, cross[i], layout == "xbert") for i in range(num_layers))
        self.gradient_checkpointing = False

    def layer_range(self, mode: str) -> range:
        n = len(self.layer)
        if self.layout == "xbert":
            if mode == "text":
                return range(0, self.fusion_layer)
            if mode == "fusion":
                return range(self.fusion_layer, n)
        return range(n)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None,
                encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor] | None,
                mode: str, output_attentions: bool | Collection[int],
                encoder_kv: CrossKeyValues | None = None, output_rows: int | None = None) -> EncoderOutput:
        self_attns: list[torch.Tensor] = []
        cross_attns: list[torch.Tensor] = []
        is_list = isinstance(encoder_hidden_states, (list, tuple))
        layers = self.layer_range(mode)
        for i in layers:
            layer = self.layer[i]
            want = output_attentions is True or (not isinstance(output_attentions, bool) and i in output_attentions)
            states, states_mask = encoder_hidden_states, encoder_attention_mask
            if is_list:
                j = (i - self.fusion_layer) % len(encoder_hidden_states)
                states, states_mask = encoder_hidden_states[j], encoder_attention_mask[j]
            kv = encoder_kv.layer(i) if encoder_kv is not None else None
            rows = output_rows if i == layers[-1] else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not want:
                hidden_states, self_p, cross_p = checkpoint(
                    layer, hidden_states, attention_mask, states, states_mask, mode, False, kv, rows,
                    use_reentrant=False)
            else:
                hidden_states, self_p, cross_p = layer(
                    hidden_states, attention_mask, states, states_mask, mode, want, kv, rows)
            if want:
                self_attns.append(self_p)
                if cross_p is not None:
                    cross_attns.append(cross_p)
        return EncoderOutput(
            last_hidden_state=hidden_states,
            attentions=tuple(self_attns) if output_attentions is not False else None,
            cross_attentions=tuple(cross_attns) if output_attentions is not False else None,
        )


def init_bert_weights(module: nn.Module, std: float) -> None:
    """The BERT initialisation rule: N(0, std) for Linear/Embedding weights, zero biases, LN 1/0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def extended_self_mask(mask: torch.Tensor, is_decoder: bool) -> torch.Tensor:
    """``(B, L)`` 0/1 mask -> additive ``(B, 1, 1, L)`` (or causal ``(B, 1, L, L)``) with -10000."""
    if mask.dim() == 3:
        ext = mask[:, None, :, :]
    elif is_decoder:
        length = mask.shape[1]
        causal = torch.tril(torch.ones(length, length, device=mask.device, dtype=mask.dtype))
        ext = causal[None, None, :, :] * mask[:, None, None, :]
    else:
        ext = mask[:, None, None, :]
    return (1.0 - ext.float()) * SELF_ATTENTION_MASK_VALUE


def extended_cross_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` 0/1 mask -> additive ``(B, 1, 1, S)`` with the most negative float32."""
    ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return (1.0 - ext.float()) * torch.finfo(torch.float32).min


class BertModel(nn.Module):
    """BERT encoder (no pooler) in the ``med`` or ``xbert`` layout."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False, layout: str = "med") -> None:
        super().__init__()
        if layout not in ("med", "xbert"):
            raise ValueError(f"layout must be 'med' or 'xbert', got {layout!r}")
        if add_pooling_layer:
            raise ValueError("SIMLA models never use the BERT pooler (add_pooling_layer must be False)")
        self.config = config
        self.layout = layout
        self.embeddings = BertEmbeddings(config, token_types=layout == "xbert")
        self.encoder = BertEncoder(config, layout)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.gradient_checkpointing = enable

    def default_mode(self) -> str:
        return "multimodal" if self.layout == "med" else "multi_modal"

    def cross_key_values(self, encoder_hidden_states: torch.Tensor, mode: str | None = None) -> CrossKeyValues:
        """Project ``encoder_hidden_states`` once for every layer that cross-attends in ``mode``."""
        mode = mode or self.default_mode()
        return CrossKeyValues({
            i: self.encoder.layer[i].crossattention.self.key_value(encoder_hidden_states)
            for i in self.encoder.layer_range(mode) if self.encoder.layer[i].runs_cross_attention(mode)
        })

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, encoder_embeds: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
                encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
                token_type_ids: torch.Tensor | None = None, output_attentions: bool | Collection[int] = False,
                is_decoder: bool = False, mode: str | None = None, return_dict: bool = True,
                encoder_kv: CrossKeyValues | None = None, output_rows: int | None = None) -> EncoderOutput:
        """``encoder_kv`` (from :meth:`cross_key_values`) replaces the cross-attention projections;
        ``output_rows``: return (and compute in the last layer) only the first positions."""
        if mode is None:
            mode = self.default_mode()
        if encoder_embeds is not None:
            embedding_output = encoder_embeds
        elif input_ids is not None or inputs_embeds is not None:
            embedding_output = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                               token_type_ids=token_type_ids)
        else:
            raise ValueError("one of input_ids, inputs_embeds or encoder_embeds is required")
        batch, length = embedding_output.shape[:2]
        device = embedding_output.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, device=device)
        self_mask = extended_self_mask(attention_mask, is_decoder)
        cross_mask: torch.Tensor | list[torch.Tensor] | None = None
        if encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, (list, tuple)):
                if encoder_attention_mask is None:
                    encoder_attention_mask = [torch.ones(s.shape[:2], device=device) for s in encoder_hidden_states]
                cross_mask = [extended_cross_mask(m) for m in encoder_attention_mask]
            else:
                if encoder_attention_mask is None:
                    encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
                cross_mask = extended_cross_mask(encoder_attention_mask)
        elif encoder_kv is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_kv.states_shape(), device=device)
            cross_mask = extended_cross_mask(encoder_attention_mask)
        return self.encoder(embedding_output, self_mask, encoder_hidden_states, cross_mask, mode, output_attentions,
                            encoder_kv, output_rows)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # one tensor under both ``predictions.bias`` and ``predictions.decoder.bias``, as the original
        self.decoder.bias = self.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return vocabulary_projection(self.transform(hidden_states), self.decoder.weight, self.decoder.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


def soft_label_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor, dim: int) -> torch.Tensor:
    """``-sum_v log_softmax(logits, dim) * soft_labels`` -> ``(B, L)``; the original uses ``dim=1``."""
    return -torch.sum(F.log_softmax(logits, dim=dim) * soft_labels, dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` holds, without boolean indexing (static shapes); 0 for an empty mask."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


class _BertWithHead(nn.Module):
    """A BERT (``bert.*``) plus the tied masked-LM head (``cls.*``)."""

    def __init__(self, config: BertConfig, layout: str = "med", distill_softmax_dim: int = 1) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False, layout=layout)
        self.cls = BertOnlyMLMHead(config)
        self.distill_softmax_dim = distill_softmax_dim
        self.cls.apply(lambda m: init_bert_weights(m, config.initializer_range))
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.bert.set_grad_checkpointing(enable)


class BertForMaskedLM(_BertWithHead):
    """Masked-LM BERT with the original's soft-label (momentum) distillation."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                soft_labels: torch.Tensor | None = None, alpha: float = 0.0, return_logits: bool = False,
                output_attentions: bool = False, is_decoder: bool = False, mode: str = "multimodal",
                encoder_kv: CrossKeyValues | None = None, nan_without_labels: bool = False) -> LMOutput | torch.Tensor:
        """Masked-LM loss on ``labels`` (-100: none), distilled to ``soft_labels`` (B, L, V) or (M, V).

        With no labelled position the loss is zero (NaN with ``nan_without_labels``), still connected to every
        parameter."""
        out = self.bert(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                        encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, output_attentions=output_attentions,
                        is_decoder=is_decoder, mode=mode, encoder_kv=encoder_kv)
        logits = self.cls(out.last_hidden_state)
        if return_logits:
            return logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
            if soft_labels is not None:
                selected = labels != -100
                if soft_labels.dim() == 3:
                    distill = masked_mean(soft_label_cross_entropy(logits, soft_labels, self.distill_softmax_dim),
                                          selected)
                else:
                    log_probs = F.log_softmax(logits, dim=self.distill_softmax_dim)[selected]
                    distill = -torch.sum(log_probs * soft_labels, dim=-1).mean()
                loss = (1 - alpha) * loss + alpha * distill
            if not nan_without_labels:
                # chosen on the device: no host synchronisation; the other branch gets a zero gradient
                first = logits.reshape(-1)[0]
                zero = first - first
                loss = torch.where((labels != -100).any(), loss, zero)
        return LMOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state,
                        attentions=out.attentions, cross_attentions=out.cross_attentions)


class BertLMHeadModel(_BertWithHead):
    """Causal LM BERT (the VQA answer decoder); the loss is the per-sequence summed token NLL."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = False, reduction: str = "mean", soft_labels: torch.Tensor | None = None,
                alpha: float = 0.0, output_attentions: bool = False, is_decoder: bool = True,
                mode: str = "multimodal") -> LMOutput | torch.Tensor:
        out = self.bert(input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, output_attentions=output_attentions,
                        is_decoder=is_decoder, mode=mode)
        logits = self.cls(out.last_hidden_state)
        if return_logits:
            return logits[:, :-1, :].contiguous()
        loss = None
        if labels is not None:
            shifted = logits[:, :-1, :].contiguous()
            targets = labels[:, 1:].contiguous()
            per_token = F.cross_entropy(shifted.view(-1, shifted.shape[-1]), targets.view(-1), reduction="none")
            per_token = per_token.view(shifted.shape[0], -1)
            loss = per_token.sum(1)
            if soft_labels is not None:
                distill = soft_label_cross_entropy(shifted, soft_labels, self.distill_softmax_dim)
                distill = (distill * (targets != -100)).sum(1)
                loss = (1 - alpha) * loss + alpha * distill
            if reduction == "mean":
                loss = loss.mean()
        return LMOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state,
                        attentions=out.attentions, cross_attentions=out.cross_attentions)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DROPPED_PREFIXES = ("pooler.", "cls.seq_relationship.")


def resolve_pretrained_file(name_or_path: str) -> str:
    """Find the weights of a Hugging Face BERT given as a local folder, a file or a hub name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isdir(name_or_path):
        for name in WEIGHT_FILES:
            candidate = os.path.join(name_or_path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in BERT folder {name_or_path}")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in WEIGHT_FILES:
        try:
            return hf_hub_download(name_or_path, name)
        except Exception as exc:  # noqa: BLE001 - try the next file name, report all failures below
            errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
    raise FileNotFoundError(f"could not load BERT weights {name_or_path!r} (not a local folder, and the hub "
                            "download failed: " + "; ".join(errors) + "). Give --text_encoder a local folder "
                            f"holding {' or '.join(WEIGHT_FILES)}, or set 'from_scratch: true' in the config for "
                            "random weights (--text_encoder may then be a vocab.txt)")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _normalise_hf_key(key: str) -> str:
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return key[len("bert."):] if key.startswith("bert.") else key


def load_pretrained_bert(model: BertModel | _BertWithHead, name_or_path: str, verbose: bool = True):
    """Initialise ``model`` from a Hugging Face BERT checkpoint; returns ``(missing, unexpected)`` keys."""
    raw = read_state_dict(resolve_pretrained_file(name_or_path))
    has_head = isinstance(model, _BertWithHead)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        base = _normalise_hf_key(key)
        if base.startswith(_DROPPED_PREFIXES):
            unexpected.append(key)
            continue
        name = base if base.startswith("cls.") else (f"bert.{base}" if has_head else base)
        if name in target and target[name].shape == value.shape:
            mapped[name] = value
        else:
            unexpected.append(key)
    ignore = ("position_ids", "predictions.decoder.bias", "predictions.decoder.weight")
    missing = [k for k in target if k not in mapped and not k.endswith(ignore)]
    model.load_state_dict(mapped, strict=False)
    if has_head:
        model.tie_weights()
    if verbose and (missing or unexpected):
        print(f"BERT weights from {name_or_path}: {len(mapped)} loaded, {len(missing)} newly initialised, "
              f"{len(unexpected)} unused")
    return missing, unexpected


def pretrained_source(config: Any, name: str | None, what: str = "text_encoder") -> str | None:
    """The Hugging Face BERT to initialise from: None with ``from_scratch``, else ``name`` (required)."""
    if config["from_scratch"]:
        return None
    if not name:
        raise ValueError(f"{what} (a Hugging Face BERT name or folder) is required unless from_scratch is true")
    return name


def build_bert(cls: type, config: BertConfig, pretrained: str | None = None, **kwargs: Any):
    """Construct ``cls`` (BertModel, BertForMaskedLM or BertLMHeadModel), optionally from pretrained."""
    model = cls(config, **kwargs)
    if pretrained:
        load_pretrained_bert(model, pretrained)
    return model
