"""The faster formulations compute what the plain ones compute.

Each test runs an optimised path against the straightforward computation it replaces, on tiny models:
the fused AdamW kernel and its checkpoint format, the written-out attention with dropout, the
vocabulary projection, shared cross-attention keys/values and [CLS]-only last layers, the paired ViT
passes, the momentum ``lerp``, the whole pretraining step in training mode (dropout on, same seed) and
the retrieval re-ranking. Tolerances are those of the parity suite or tighter.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models.simla.pretrain as pretrain_module
from configs import load_config
from engine.cli import base_parser
from engine.retrieval_eval import rerank
from models.attention import attention, use_fused_dropout
from models.bert import BertModel, load_bert_config
from models.lean_autograd import vocabulary_projection
from models.precision import cast_frozen_once
from models.simla.pretrain import SIMLA as PretrainSIMLA
from models.simla.retrieval import SIMLA as RetrievalSIMLA
from models.tokenization import tokenizer_from_tokens
from models.vit import VisionTransformer
from optim import create_optimizer, param_groups_weight_decay
from tests.test_retrieval import _features

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "parity" / "fixtures"
PARITY_TOL = {"atol": 1e-4, "rtol": 1e-4}


# --- optimizer ----------------------------------------------------------------------------------------


class _Net(nn.Module):
    """A vocabulary-like table, a linear layer, a norm and a decayed scalar (both parameter groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(300, 16)
        self.fc = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.norm(self.fc(self.table(ids))) * self.temp).square().mean()


def _optimizers(**opt_args) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Net()
    config = {"opt": "adamW", "lr": 1e-2, "weight_decay": 0.02}
    if opt_args:
        config["opt_args"] = opt_args
    return model, create_optimizer(config, model)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randint(0, 300, (4, 7), generator=generator)).backward()
        optimizer.step()


def _default_kernel(model: nn.Module) -> torch.optim.Optimizer:
    """torch's AdamW with default arguments (the for-loop kernel on CPU) and the factory's groups."""
    return torch.optim.AdamW(param_groups_weight_decay(model, 0.02), lr=1e-2)


def test_adamw_is_fused_by_default_and_matches_the_for_loop_kernel():
    fused_model, fused = _optimizers()
    plain_model, plain = _optimizers(fused=False)
    assert type(fused) is torch.optim.AdamW and all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):  # the same gradients for both: only the update kernels differ
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for p_fused, p_plain in zip(fused_model.parameters(), plain_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[p_fused][key], plain.state[p_plain][key], atol=1e-7, rtol=1e-5)


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fused_adamw_checkpoints_have_the_default_format_and_resume_both_ways():
    fused_model, fused = _optimizers()
    plain_model = _optimizers()[0]
    plain = _default_kernel(plain_model)
    _train(fused_model, fused, 3)
    _train(plain_model, plain, 3)
    saved, reference = fused.state_dict(), plain.state_dict()
    assert saved["param_groups"] == reference["param_groups"]  # fused: None, like the default kernel
    assert saved["state"].keys() == reference["state"].keys()
    for key, entry in saved["state"].items():
        assert entry.keys() == reference["state"][key].keys()
        for name, value in entry.items():
            other = reference["state"][key][name]
            assert (value.dtype, value.device, value.shape) == (other.dtype, other.device, other.shape)
    assert all(g["fused"] for g in fused.param_groups), "state_dict() must not change the live optimizer"

    # a checkpoint of the default kernel (every original one) loads into the fused optimizer, which stays fused
    resumed_model, resumed = _optimizers()
    resumed_model.load_state_dict(plain_model.state_dict())
    resumed.load_state_dict(_round_trip(reference))
    assert all(g["fused"] for g in resumed.param_groups)
    # and ours loads into a plain torch AdamW
    other_model = _Net()
    other_model.load_state_dict(fused_model.state_dict())
    other = _default_kernel(other_model)
    other.load_state_dict(_round_trip(saved))
    _train(resumed_model, resumed, 5, seed=2)
    _train(plain_model, plain, 5, seed=2)
    _train(other_model, other, 5, seed=2)
    _train(fused_model, fused, 5, seed=2)
    for a, b, c, d in zip(resumed_model.parameters(), plain_model.parameters(), other_model.parameters(),
                          fused_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(c, d, atol=1e-6, rtol=1e-6)


# --- building blocks ----------------------------------------------------------------------------------


def test_written_out_attention_draws_the_same_dropout_as_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(3, 1, 1, 9)
    mask[1, ..., -4:] = -10000.0
    grad = torch.randn(3, 4, 9, 16)
    torch.manual_seed(5)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    after_reference = torch.rand(4)
    ref_grads = torch.autograd.grad(reference, (q, k, v), grad)
    torch.manual_seed(5)
    ours, probs = attention(q, k, v, mask, dropout_p=0.3)
    after_ours = torch.rand(4)
    our_grads = torch.autograd.grad(ours, (q, k, v), grad)
    assert probs is None
    assert torch.equal(after_reference, after_ours)  # same number of draws
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_dropout_sends_attention_dropout_to_sdpa(monkeypatch):
    assert base_parser("x", "c.yaml", "out", training=True).parse_args(["--fused_dropout"]).fused_dropout
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    try:
        attention(q, k, v, dropout_p=0.2)
        assert calls == []  # default: the written-out softmax dropout
        use_fused_dropout(True)
        torch.manual_seed(3)
        fused, _ = attention(q, k, v, dropout_p=0.2)
        assert calls == [0.2]
        attention(q, k, v, dropout_p=0.2, need_probs=True)  # probabilities read: still written out
        assert calls == [0.2]
    finally:
        use_fused_dropout(False)
    torch.manual_seed(3)
    torch.testing.assert_close(fused, sdpa(q, k, v, dropout_p=0.2))


@pytest.mark.parametrize("rows", [3, 40])
def test_vocabulary_projection_is_a_linear_layer_with_a_fresh_weight_gradient(rows):
    torch.manual_seed(0)
    weight = torch.randn(500, 32, requires_grad=True)
    bias = torch.randn(500, requires_grad=True)
    hidden = torch.randn(rows, 32, requires_grad=True)
    grad = torch.randn(rows, 500)
    ours = vocabulary_projection(hidden.view(1, rows, 32), weight, bias).view(rows, 500)
    reference = F.linear(hidden, weight, bias)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(ours, (hidden, weight, bias), grad)
    want = torch.autograd.grad(reference, (hidden, weight, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[1]._base is None and got[1].is_contiguous()  # not a transposed view of another buffer
    with torch.no_grad():
        torch.testing.assert_close(vocabulary_projection(hidden, weight, bias), reference, atol=1e-5, rtol=1e-5)


def _fusion_bert() -> BertModel:
    config = load_bert_config(str(REPO / "configs" / "demo_bert.json"))
    torch.manual_seed(0)
    return BertModel(config)


def test_shared_cross_attention_keys_and_cls_only_output():
    bert = _fusion_bert().eval()
    width = bert.config.hidden_size
    torch.manual_seed(1)
    states = torch.randn(3, 7, getattr(bert.config, "encoder_width", width))
    ids = torch.randint(104, 500, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[2, 4:] = 0
    rows = torch.tensor([2, 0, 0, 1, 2])
    with torch.no_grad():
        reference = bert(ids, attention_mask=mask, encoder_hidden_states=states[rows]).last_hidden_state
        shared = bert(ids, attention_mask=mask, encoder_kv=bert.cross_key_values(states).select(rows))
        first = bert(ids, attention_mask=mask, encoder_kv=bert.cross_key_values(states).select(rows), output_rows=1)
    torch.testing.assert_close(shared.last_hidden_state, reference, atol=1e-5, rtol=1e-5)
    assert first.last_hidden_state.shape == (5, 1, width)
    torch.testing.assert_close(first.last_hidden_state[:, 0], reference[:, 0], atol=1e-5, rtol=1e-5)

    # training: the projection is shared by several passes, the gradients sum as for separate projections
    bert.train()
    for module in bert.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0

    def grads(share: bool) -> dict[str, torch.Tensor]:
        bert.zero_grad(set_to_none=True)
        kv = bert.cross_key_values(states) if share else None
        first_pass = bert(ids[:3], encoder_hidden_states=None if share else states, encoder_kv=kv)
        second = bert(ids, attention_mask=mask, encoder_hidden_states=None if share else states[rows],
                      encoder_kv=kv.select(rows) if share else None)
        (first_pass.last_hidden_state.square().sum() + second.last_hidden_state[:, 0].sum()).backward()
        return {n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None}

    plain, shared_grads = grads(False), grads(True)
    assert plain.keys() == shared_grads.keys()
    for name in plain:
        torch.testing.assert_close(shared_grads[name], plain[name], atol=1e-5, rtol=1e-4)


def test_paired_vit_passes_equal_two_passes():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4).train()
    image = torch.randn(3, 3, 32, 32)
    masked = torch.zeros(3, 4, dtype=torch.bool)
    masked[0, 1] = masked[2, 0] = masked[2, 3] = True
    assert not vit.draws_random_numbers()
    plain, with_mask = vit.forward_plain_and_masked(image, masked)
    torch.testing.assert_close(plain, vit(image), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_mask, vit(image, masked), atol=1e-6, rtol=1e-5)
    (plain.sum() + with_mask.square().sum()).backward()
    paired = {n: p.grad.clone() for n, p in vit.named_parameters()}
    vit.zero_grad(set_to_none=True)
    (vit(image).sum() + vit(image, masked).square().sum()).backward()
    for name, param in vit.named_parameters():
        torch.testing.assert_close(paired[name], param.grad, atol=1e-5, rtol=1e-4)
    vit.blocks[0].attn.attn_drop = 0.1
    assert vit.draws_random_numbers() and not vit.eval().draws_random_numbers()


# --- the pretraining step -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_fixture() -> dict:
    return torch.load(FIXTURES / "pretrain.pt", weights_only=True)


def _pretrain_model(fixture: dict, optimised: bool) -> PretrainSIMLA:
    tokenizer = tokenizer_from_tokens(fixture["vocab_tokens"])
    config = dict(fixture["config"], bert_config=fixture["bert_config"], from_scratch=True)
    model = PretrainSIMLA(tokenizer=tokenizer, config=config)
    model.load_state_dict(fixture["state_dict"])
    model.share_word_lookup = model.share_image_kv = model.pair_vit_passes = optimised
    return model.train()


def _pretrain_step(model: PretrainSIMLA, fixture: dict, seed: int) -> tuple[list[torch.Tensor], dict]:
    inputs = fixture["inputs"]
    text = type("Text", (), {"input_ids": inputs["text_input_ids"], "attention_mask": inputs["text_attention_mask"]})
    torch.manual_seed(seed)  # dropout, ITM negatives and the MLM masking all draw from it
    losses = model(inputs["image"], text, masked_visual_token_pos=inputs["masked_visual_token_pos"],
                   masked_visual_tok_labels=inputs["masked_visual_tok_labels"], alpha=inputs["alpha"])
    sum(losses).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [loss.detach() for loss in losses], grads


def test_pretraining_step_in_training_mode_equals_the_plain_computation(pretrain_fixture):
    """Dropout on, same seed: the shared lookup, shared image keys and paired ViT passes give the same
    losses, gradients, momentum weights and queues, so they also consume the same random numbers."""
    plain_model = _pretrain_model(pretrain_fixture, optimised=False)
    fast_model = _pretrain_model(pretrain_fixture, optimised=True)
    plain_losses, plain_grads = _pretrain_step(plain_model, pretrain_fixture, seed=11)
    after_plain = torch.rand(3)
    fast_losses, fast_grads = _pretrain_step(fast_model, pretrain_fixture, seed=11)
    after_fast = torch.rand(3)
    assert torch.equal(after_plain, after_fast)
    for a, b in zip(fast_losses, plain_losses):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) == 483
    for name in plain_grads:
        assert fast_grads[name].layout == torch.strided
        torch.testing.assert_close(fast_grads[name], plain_grads[name], **PARITY_TOL)
    fast_state, plain_state = fast_model.state_dict(), plain_model.state_dict()
    for key in plain_state:
        torch.testing.assert_close(fast_state[key], plain_state[key], atol=1e-6, rtol=1e-5)


def test_momentum_lerp_is_the_ema_formula(pretrain_fixture):
    model = _pretrain_model(pretrain_fixture, optimised=True)
    with torch.no_grad():
        for param in model.visual_encoder_m.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    before = {n: p.detach().double().clone() for n, p in model.visual_encoder_m.named_parameters()}
    online = dict(model.visual_encoder.named_parameters())
    model._momentum_update()
    for name, param in model.visual_encoder_m.named_parameters():
        exact = before[name] * model.momentum + online[name].detach().double() * (1 - model.momentum)
        torch.testing.assert_close(param.detach().double(), exact, atol=1e-6, rtol=0)


class _Casts(TorchDispatchMode):
    """Counts ``_to_copy`` calls per source tensor (autocast's casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.sources.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))


def test_frozen_momentum_weights_are_cast_once_per_step_under_autocast(pretrain_fixture, monkeypatch):
    """bf16 autocast: each momentum Linear weight is cast once per step instead of once per pass, the losses,
    gradients and updated weights are bitwise those of casting at every use, and the float32 parameters are
    back after the step."""
    results = []
    for cast_once in (True, False):
        if not cast_once:
            monkeypatch.setattr(pretrain_module, "cast_frozen_once", lambda modules, device: contextlib.nullcontext())
        model = _pretrain_model(pretrain_fixture, optimised=True)
        frozen = {p.data_ptr(): n for n, p in model.named_parameters() if "_m." in n and not p.requires_grad}
        counter = _Casts()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            losses, grads = _pretrain_step(model, pretrain_fixture, seed=11)
        casts = Counter(frozen[ptr] for ptr in counter.sources if ptr in frozen)
        results.append((losses, grads, model.state_dict(), casts))
        assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    (losses, grads, state, casts), (plain_losses, plain_grads, plain_state, plain_casts) = results
    layer = "text_encoder_m.bert.encoder.layer.0.attention.self.query.weight"
    assert casts[layer] == 1 and plain_casts[layer] > 1  # the text, MLM and MIM passes
    assert max(casts.values()) == 1 and sum(casts.values()) < sum(plain_casts.values())
    for a, b in zip(losses, plain_losses):
        assert torch.equal(a, b)
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    assert all(torch.equal(state[k], plain_state[k]) for k in state)


def test_cast_frozen_once_restores_the_weights_when_the_block_fails():
    layer = nn.Linear(4, 4).requires_grad_(False)
    weight = layer.weight
    with pytest.raises(RuntimeError, match="inside"), torch.autocast("cpu", dtype=torch.bfloat16):
        with cast_frozen_once([layer], "cpu"):
            assert layer.weight.dtype == torch.bfloat16
            raise RuntimeError("inside")
    assert layer.weight is weight
    with cast_frozen_once([layer], "cpu"):  # no autocast: nothing swapped
        assert layer.weight is weight


# --- retrieval ----------------------------------------------------------------------------------------


class _StatesOnly:
    """The retrieval model without ``image_key_values``: re-ranking then feeds ViT states per pair."""

    def __init__(self, model: RetrievalSIMLA) -> None:
        self.model = model

    def itm_logits(self, *args, **kwargs) -> torch.Tensor:
        return self.model.itm_logits(*args, **kwargs)


def test_rerank_with_projected_image_keys_equals_per_pair_states():
    config = load_config(str(REPO / "configs" / "Retrieval_demo.yaml"), task="retrieval")
    config.update(bert_config=str(REPO / "configs" / "demo_bert.json"))
    torch.manual_seed(0)
    model = RetrievalSIMLA(config=config).eval()
    features = _features(model, num_images=7, num_texts=20, seed=3)
    image_feats = features.image_feats
    reference = rerank(_StatesOnly(model), features, 4, batch_size=16)
    per_image = sum(k.numel() + v.numel() for k, v in model.image_key_values(image_feats[:1]).layers.values()) * 4
    for budget in (1 << 30, 2 * per_image):  # all images in one chunk, or chunks of two images
        ours = rerank(model, features, 4, batch_size=16, kv_budget=budget)
        np.testing.assert_allclose(ours.score_i2t, reference.score_i2t, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(ours.score_t2i, reference.score_t2i, atol=1e-5, rtol=1e-5)
        assert ours.num_pairs == reference.num_pairs


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([os.path.abspath(__file__), "-q"]))
