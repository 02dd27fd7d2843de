"""One training forward of every task model with momentum encoders moves each momentum parameter to
``m * before + (1 - m) * online`` and writes the momentum features of the batch into the queues at the
queue pointer. Expectations are computed here from copies taken before the forward; the momentum
parameters are first moved away from the online ones so that a skipped update cannot go unnoticed."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.parity_checks.support import fixture_config, fixture_tokenizer

FIXTURES = Path(__file__).resolve().parent / "data" / "parity" / "fixtures"
FINE_TUNING_MOMENTUM = 0.995  # the EMA rate the original hard-codes in its VQA, NLVR2 and SNLI-VE models


@dataclass
class Case:
    model: torch.nn.Module
    momentum: float
    forward: Callable[[], object]
    # momentum features ``(image_feat_m, text_feat_m)`` of the batch, from the current momentum weights
    queued_features: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    batch_size: int = 0
    idx: torch.Tensor | None = None


def _load(name: str, module: str, **extra) -> tuple[dict, object, torch.nn.Module]:
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    tokenizer = fixture_tokenizer(fx)
    simla = importlib.import_module(f"models.simla.{module}").SIMLA
    model = simla(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True, **extra))
    model.load_state_dict(fx["state_dict"], strict=True)
    return fx, tokenizer, model.eval()  # no dropout: the queued features can be recomputed


def _projected(proj: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    return F.normalize(proj(states[:, 0, :]), dim=-1)


def pretrain_case() -> Case:
    fx, tokenizer, model = _load("pretrain", "pretrain")
    inputs = fx["inputs"]
    text = tokenizer(list(inputs["captions"]), padding="longest", truncation=True, max_length=25,
                     return_tensors="pt")

    def forward():
        return model(inputs["image"], text, masked_visual_token_pos=inputs["masked_visual_token_pos"],
                     masked_visual_tok_labels=inputs["masked_visual_tok_labels"], alpha=inputs["alpha"])

    def features():
        image_states = model.visual_encoder_m(inputs["image"])
        text_states = model.text_encoder_m.bert(text.input_ids, attention_mask=text.attention_mask,
                                                mode="text").last_hidden_state
        return _projected(model.vision_proj_m, image_states), _projected(model.text_proj_m, text_states)

    return Case(model, fx["config"]["momentum"], forward, features, batch_size=len(inputs["captions"]))


def retrieval_case() -> Case:
    fx, tokenizer, model = _load("retrieval_train_shared_idx", "retrieval", enqueue_idx=True)
    inputs = fx["inputs"]
    text = tokenizer(list(inputs["captions"]), padding="longest", max_length=30, return_tensors="pt")

    def forward():
        return model(inputs["image"], text, alpha=inputs["alpha"], idx=inputs["idx"])

    def features():
        image_states = model.visual_encoder_m(inputs["image"])
        text_states = model.text_encoder_m(text.input_ids, attention_mask=text.attention_mask,
                                           mode="text").last_hidden_state
        return _projected(model.vision_proj_m, image_states), _projected(model.text_proj_m, text_states)

    return Case(model, fx["config"]["momentum"], forward, features, batch_size=len(inputs["captions"]),
                idx=inputs["idx"])


def vqa_case() -> Case:
    fx, tokenizer, model = _load("vqa", "vqa")
    inputs = fx["inputs"]
    question = tokenizer(list(inputs["questions"]), padding="longest", truncation=True, max_length=25,
                         return_tensors="pt")
    answer = tokenizer(list(inputs["answers"]), padding="longest", return_tensors="pt")

    def forward():
        return model(inputs["image"], question, answer, train=True, alpha=inputs["alpha"],
                     k=list(inputs["answers_per_question"]), weights=inputs["answer_weights"])

    return Case(model, FINE_TUNING_MOMENTUM, forward)


def nlvr_case() -> Case:
    fx, tokenizer, model = _load("nlvr", "nlvr")
    inputs = fx["inputs"]
    text = tokenizer(list(inputs["sentences"]), padding="longest", return_tensors="pt")
    images = torch.cat([inputs["image0"], inputs["image1"]])
    return Case(model, FINE_TUNING_MOMENTUM,
                lambda: model(images, text, targets=inputs["targets"], train=True, alpha=inputs["alpha"]))


def ve_case() -> Case:
    fx, tokenizer, model = _load("ve", "ve")
    inputs = fx["inputs"]
    text = tokenizer(list(inputs["sentences"]), padding="longest", return_tensors="pt")
    return Case(model, FINE_TUNING_MOMENTUM,
                lambda: model(inputs["image"], text, targets=inputs["targets"], train=True, alpha=inputs["alpha"]))


CASES = {"pretrain": pretrain_case, "retrieval": retrieval_case, "vqa": vqa_case, "nlvr": nlvr_case,
         "ve": ve_case}


def momentum_twins(model: torch.nn.Module) -> dict[str, str]:
    """``{momentum parameter name: online parameter name}``: ``X_m.rest`` is the twin of ``X.rest``."""
    twins = {}
    for name, _ in model.named_parameters():
        head, _, rest = name.partition(".")
        if head.endswith("_m"):
            twins[name] = f"{head[:-2]}.{rest}"
    return twins


@pytest.mark.parametrize("task", list(CASES))
def test_training_forward_updates_momentum_weights_and_queues(task):
    case = CASES[task]()
    model = case.model
    params = dict(model.named_parameters())
    twins = momentum_twins(model)
    assert twins
    for name, online in twins.items():
        assert online in params and params[online].shape == params[name].shape, name
        assert not params[name].requires_grad and params[online].requires_grad, name
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in twins:
            params[name].add_(0.1 * torch.randn(params[name].shape, generator=generator))
    before = {name: params[name].detach().clone() for name in twins}
    online = {name: params[twin].detach().clone() for name, twin in twins.items()}
    queues = {name: buffer.clone() for name, buffer in model.named_buffers() if "queue" in name}
    if case.queued_features is None:
        assert not queues
    else:
        queue_size = model.image_queue.shape[1]
        start = queue_size - case.batch_size  # the last columns, so that the pointer wraps round to 0
        assert 0 < start and queue_size % case.batch_size == 0
        model.queue_ptr.fill_(start)

    case.forward()

    m = case.momentum
    for name, twin in twins.items():
        expected = m * before[name].double() + (1 - m) * online[name].double()
        torch.testing.assert_close(params[name].detach().double(), expected, rtol=0, atol=1e-6,
                                   msg=lambda text, name=name: f"{name}: {text}")
        assert torch.equal(params[twin].detach(), online[name]), twin  # the forward leaves these alone
    if case.queued_features is None:
        return
    with torch.no_grad():
        image_feat_m, text_feat_m = case.queued_features()
    assert int(model.queue_ptr) == 0
    for queue, feat in (("image_queue", image_feat_m), ("text_queue", text_feat_m)):
        torch.testing.assert_close(getattr(model, queue)[:, start:], feat.t(), rtol=0, atol=1e-5)
        assert torch.equal(getattr(model, queue)[:, :start], queues[queue][:, :start])
    if case.idx is not None:
        assert model.idx_queue[0, start:].tolist() == case.idx.tolist()
        assert torch.equal(model.idx_queue[:, :start], queues["idx_queue"][:, :start])


def test_nlvr_pretraining_model_has_no_momentum_encoders_or_queues():
    _, _, model = _load("pretrain_nlvr", "pretrain_nlvr")
    assert not momentum_twins(model)
    assert not any("queue" in name for name, _ in model.named_buffers())
