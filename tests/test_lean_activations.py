"""The lean autograd operations compute bitwise what the plain PyTorch computation computes.

Each operation of ``models.lean_autograd`` runs against its reference (``F.dropout``, ``torch.matmul``
after dropout, ``F.linear`` after ``F.gelu``) with the same seed: outputs, every gradient and the random
generator state afterwards must be equal with ``torch.equal``, and the tensors kept for backward must take
fewer bytes. The tiny pretraining model of the benchmark runs a training step with the lean operations and
with them switched off (:func:`use_lean_activations`), with the same bitwise requirement.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import benchmarks.pretrain_step as bench
from models.attention import attention, split_heads
from models.bert import BertModel, load_bert_config
from models.lean_autograd import (
    LeanDropout,
    dropout,
    dropout_matmul,
    gelu_linear,
    use_lean_activations,
)
from models.simla.pretrain import SIMLA
from models.vit import VisionTransformer


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _run(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], seed: int = 3):
    """``fn(*inputs)`` from ``seed``, backward of a fixed random cotangent: the output, the gradients of
    the inputs and the generator state right after the forward call."""
    leaves = _leaves(*inputs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = fn(*leaves)
        state = torch.get_rng_state()
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(cotangent)
    return out.detach(), [leaf.grad for leaf in leaves], state


def _assert_bitwise(lean, plain) -> None:
    (out_a, grads_a, state_a), (out_b, grads_b, state_b) = lean, plain
    assert out_a.dtype == out_b.dtype and torch.equal(out_a, out_b)
    assert torch.equal(state_a, state_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


def _saved_bytes(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                 skip: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn(*inputs)`` (storages of the
    inputs themselves and of ``skip``, e.g. parameters, not counted)."""
    leaves = _leaves(*inputs)
    kept: dict[int, int] = {}
    with _counting_saved(kept, (*leaves, *skip)), torch.random.fork_rng():
        out = fn(*leaves)
    del out
    return sum(kept.values())


def _counting_saved(kept: dict[int, int], excluded: Iterable[torch.Tensor]):
    """Hooks that record in ``kept`` the size of each distinct storage autograd saves for backward,
    except the storages of ``excluded`` (inputs, parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in excluded}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


# --- dropout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_is_f_dropout(p, transposed):
    x = torch.randn(6, 17, 40)
    if transposed:
        x = x.transpose(0, 1)  # same strides for the noise tensor, so the same draws

    def lean(t):
        return dropout(t.exp(), p)

    def plain(t):
        return F.dropout(t.exp(), p)

    _assert_bitwise(_run(lean, [x]), _run(plain, [x]))


def test_lean_dropout_module_is_nn_dropout():
    module, reference = LeanDropout(0.2), nn.Dropout(0.2)
    assert module.p == 0.2 and module.state_dict() == {} and isinstance(module, nn.Dropout)
    x = torch.randn(4, 9, 12)
    _assert_bitwise(_run(lambda t: module(t * 2), [x]), _run(lambda t: reference(t * 2), [x]))
    module.eval()
    assert torch.equal(module(x), x)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        a = LeanDropout(0.3).train()(x)
        torch.manual_seed(0)
        b = F.dropout(x, 0.3)
    assert torch.equal(a, b)


def test_dropout_keeps_a_one_byte_mask():
    x = torch.randn(8, 32, 64)
    elements = x.numel()
    assert _saved_bytes(lambda t: F.dropout(t.clone(), 0.1), [x]) == 4 * elements
    assert _saved_bytes(lambda t: dropout(t.clone(), 0.1), [x]) == elements


# --- dropout(probs) @ value -----------------------------------------------------------------------------


def _attention_inputs(batch: int = 3, heads: int = 4, queries: int = 9, keys: int = 11, dim: int = 8):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, heads, queries, keys, generator=generator)
    states = torch.randn(batch, keys, heads * dim, generator=generator)  # split into heads: not contiguous
    return scores, states


@pytest.mark.parametrize("layout", ["heads_view", "contiguous", "three_d"])
@pytest.mark.parametrize("size", ["small", "larger"])
def test_dropout_matmul_is_matmul_of_f_dropout(layout, size):
    scores, states = _attention_inputs() if size == "small" else _attention_inputs(2, 4, 65, 70, 32)
    heads = scores.shape[1]

    def value_of(s: torch.Tensor) -> torch.Tensor:
        value = split_heads(s.clone(), heads)
        if layout == "contiguous":
            value = value.contiguous()
        if layout == "three_d":
            value = value.reshape(-1, *value.shape[2:])
        return value

    def probs_of(sc: torch.Tensor) -> torch.Tensor:
        probs = sc.softmax(-1)
        return probs.reshape(-1, *probs.shape[2:]) if layout == "three_d" else probs

    def lean(sc, s):
        return dropout_matmul(probs_of(sc), value_of(s), 0.2)

    def plain(sc, s):
        return torch.matmul(F.dropout(probs_of(sc), 0.2), value_of(s))

    _assert_bitwise(_run(lean, [scores, states]), _run(plain, [scores, states]))


def test_dropout_matmul_with_a_value_that_needs_no_gradient():
    scores, states = _attention_inputs()
    value = split_heads(states, scores.shape[1])

    def lean(sc):
        return dropout_matmul(sc.softmax(-1), value, 0.3)

    def plain(sc):
        return torch.matmul(F.dropout(sc.softmax(-1), 0.3), value)

    _assert_bitwise(_run(lean, [scores]), _run(plain, [scores]))


def test_dropout_matmul_keeps_probabilities_mask_and_values_only():
    scores, states = _attention_inputs(batch=2, heads=4, queries=40, keys=50, dim=8)
    heads = scores.shape[1]

    def lean(sc, s):
        return dropout_matmul(sc.softmax(-1), split_heads(s.clone(), heads), 0.1)

    def plain(sc, s):
        return torch.matmul(F.dropout(sc.softmax(-1), 0.1), split_heads(s.clone(), heads))

    probs_elements, value_bytes = scores.numel(), 4 * states.numel()
    # plain: probabilities (softmax), float noise, dropped probabilities, folded values
    assert _saved_bytes(plain, [scores, states]) == 4 * probs_elements * 3 + value_bytes
    # lean: the same probabilities, a one-byte mask, the values
    assert _saved_bytes(lean, [scores, states]) == 4 * probs_elements + probs_elements + value_bytes


def test_attention_probabilities_and_their_gradient_are_unchanged():
    """The Grad-CAM path: ``need_probs`` returns the softmax output and a hook on it sees its gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., -2:] = -10000.0

    def step(enabled: bool):
        leaves = _leaves(q, k, v)
        seen: list[torch.Tensor] = []
        with use_lean_activations(enabled), torch.random.fork_rng():
            torch.manual_seed(4)
            context, probs = attention(*leaves, mask, dropout_p=0.25, need_probs=True)
        probs.register_hook(seen.append)
        (context.square().sum() + probs.sum()).backward()
        return context, probs, seen[0], [leaf.grad for leaf in leaves]

    lean, plain = step(True), step(False)
    for a, b in zip(lean[:3], plain[:3]):
        assert torch.equal(a, b)
    for a, b in zip(lean[3], plain[3]):
        assert torch.equal(a, b)


# --- linear(gelu(h)) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 13, 48), (4, 150, 48), (21, 48), (1, 1, 48)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_linear_is_linear_of_gelu(shape, approximate):
    torch.manual_seed(0)
    hidden = torch.randn(*shape)
    layer = nn.Linear(48, 20)

    def step(fn: Callable[[torch.Tensor, nn.Linear], torch.Tensor]):
        linear = copy.deepcopy(layer)
        out, (grad_hidden,), state = _run(lambda h: fn(h.clone(), linear), [hidden])
        return out, [grad_hidden, linear.weight.grad, linear.bias.grad], state

    lean = step(lambda h, linear: gelu_linear(h, linear, approximate))
    plain = step(lambda h, linear: linear(F.gelu(h, approximate=approximate)))
    _assert_bitwise(lean, plain)


def test_gelu_linear_keeps_the_activation_input_only():
    torch.manual_seed(0)
    hidden = torch.randn(4, 30, 64)
    linear = nn.Linear(64, 16)
    params = list(linear.parameters())
    lean = _saved_bytes(lambda h: gelu_linear(h.clone(), linear), [hidden], params)
    plain = _saved_bytes(lambda h: linear(F.gelu(h.clone())), [hidden], params)
    assert plain == 2 * 4 * hidden.numel() and lean == 4 * hidden.numel()


# --- autocast, checkpointing, compile -----------------------------------------------------------------


def test_bf16_autocast_gives_the_plain_results():
    """Under CPU autocast: the fused product on bf16 probabilities and values, the plain product (with
    autocast's casts) for float32 probabilities, dropout on bf16 and float32, the plain MLP."""
    scores, states = _attention_inputs(queries=9, keys=9)
    heads = scores.shape[1]
    value_proj, mlp = nn.Linear(states.shape[-1], states.shape[-1]), nn.Linear(8, 6)

    def block(sc: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = split_heads(value_proj(s), heads)
            probs = torch.matmul(sc, sc.transpose(-1, -2)).softmax(-1)
            assert probs.dtype == value.dtype == torch.bfloat16
            fused = dropout_matmul(probs, value, 0.2)
            mixed = dropout_matmul(sc.softmax(-1), value, 0.2)
            hidden = dropout(gelu_linear(fused, mlp), 0.1)
        return (fused.float().square().sum() + mixed.float().sum() + hidden.float().sum()).reshape(1)

    def step(enabled: bool):
        with use_lean_activations(enabled):
            out, grads, state = _run(block, [scores, states])
        grads += [p.grad.clone() for p in (*value_proj.parameters(), *mlp.parameters())]
        value_proj.zero_grad(set_to_none=True)
        mlp.zero_grad(set_to_none=True)
        return out, grads, state

    _assert_bitwise(step(True), step(False))


def test_lean_operations_under_non_reentrant_checkpointing():
    scores, states = _attention_inputs()
    heads = scores.shape[1]
    linear = nn.Linear(8, 8)

    def block(sc: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        context = dropout_matmul(sc.softmax(-1), split_heads(s * 1, heads), 0.2)
        return dropout(gelu_linear(context, linear), 0.3)

    def step(checkpointed: bool):
        out, grads, state = _run(
            lambda sc, s: checkpoint(block, sc, s, use_reentrant=False) if checkpointed else block(sc, s),
            [scores, states])
        grads += [p.grad.clone() for p in linear.parameters()]
        linear.zero_grad(set_to_none=True)
        return out, grads, state

    _assert_bitwise(step(True), step(False))


def test_compiled_code_runs_the_plain_operations():
    """Under ``torch.compile`` the plain operations run (the compiler decides what backward keeps): the
    captured graph, run eagerly, draws and computes what the plain eager code does."""
    linear = nn.Linear(8, 8)
    x = torch.randn(2, 8, 8)

    def block(t: torch.Tensor) -> torch.Tensor:
        return dropout(gelu_linear(t, linear), 0.3) + dropout_matmul(t.softmax(-1), t, 0.5)

    compiled = torch.compile(block, backend="eager", fullgraph=True)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]):
        out, grads, state = _run(fn, [x])
        grads += [p.grad.clone() for p in linear.parameters()]
        linear.zero_grad(set_to_none=True)
        return out, grads, state

    compiled_result = step(compiled)
    with use_lean_activations(False):
        plain_result = step(block)
    _assert_bitwise(compiled_result, plain_result)


# --- models ---------------------------------------------------------------------------------------------


def test_state_dict_keys_are_unchanged():
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2)
    mlp_keys = {k for k in vit.state_dict() if k.startswith("blocks.0.mlp.")}
    assert mlp_keys == {f"blocks.0.mlp.{n}.{p}" for n in ("fc1", "fc2") for p in ("weight", "bias")}
    assert vit.blocks[0].attn.proj_drop.p == 0.0 and vit.pos_drop.p == 0.0
    config = load_bert_config(bench.PRESETS["tiny"]["bert_config"], vocab_size=60)
    layer_keys = {k for k in BertModel(config).state_dict()
                  if k.startswith(("encoder.layer.0.intermediate.", "encoder.layer.0.output."))}
    assert layer_keys == {f"encoder.layer.0.{name}.{kind}" for kind in ("weight", "bias")
                          for name in ("intermediate.dense", "output.dense", "output.LayerNorm")}


def test_hooks_on_the_replaced_modules_still_run():
    """A hook on a module whose work the lean MLP would do without calling it keeps the plain path."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2).train()
    bert = BertModel(load_bert_config(bench.PRESETS["tiny"]["bert_config"], vocab_size=60)).train()
    image, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 60, (2, 7))
    seen: list[str] = []

    def outputs():
        with torch.random.fork_rng():
            torch.manual_seed(2)
            return vit(image), bert(ids, mode="text").last_hidden_state

    before = outputs()
    intermediate = bert.encoder.layer[0].intermediate
    handles = [vit.blocks[1].mlp.act.register_forward_hook(lambda *_: seen.append("act")),
               intermediate.register_forward_hook(lambda *_: seen.append("intermediate"))]
    hooked = outputs()
    for handle in handles:
        handle.remove()
    assert seen == ["act", "intermediate"]
    assert all(torch.equal(a, b) for a, b in zip(before, hooked))


def _tiny_pretraining_model() -> tuple[SIMLA, tuple]:
    preset = dict(bench.PRESETS["tiny"])
    tokenizer = type("Tokenizer", (), {"vocab_size": preset["vocab_size"], "cls_token_id": 101,
                                       "pad_token_id": 0, "mask_token_id": 103})()
    python_state = random.getstate()
    try:
        random.seed(0)  # the patch masking generator draws from Python's random
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = SIMLA(tokenizer=tokenizer, config=dict(preset, grad_checkpointing=False)).train()
        batch = bench.make_batch(preset, preset["batch_size"], torch.device("cpu"),
                                 torch.Generator().manual_seed(0))
    finally:
        random.setstate(python_state)
    return model, batch


def _pretraining_step(model: SIMLA, batch: tuple, enabled: bool):
    image, text, codes, masked = batch
    kept: dict[int, int] = {}
    with use_lean_activations(enabled), torch.random.fork_rng():
        torch.manual_seed(11)  # dropout, ITM negatives and MLM masking
        with _counting_saved(kept, model.parameters()):
            losses = model(image, text, visual_token_ids=codes, masked_visual_token_pos=masked,
                           masked_visual_tok_labels=codes[masked], alpha=0.4)
        state = torch.get_rng_state()
        saved = sum(kept.values())
        sum(losses).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([loss.detach() for loss in losses]), grads, state, saved


def test_pretraining_step_is_bitwise_the_plain_one_and_keeps_less():
    model, batch = _tiny_pretraining_model()
    plain_model = copy.deepcopy(model)
    lean_losses, lean_grads, lean_state, lean_saved = _pretraining_step(model, batch, enabled=True)
    plain_losses, plain_grads, plain_state, plain_saved = _pretraining_step(plain_model, batch, enabled=False)
    assert torch.equal(lean_losses, plain_losses) and torch.equal(lean_state, plain_state)
    assert lean_grads.keys() == plain_grads.keys() and len(lean_grads) > 400
    unequal = [name for name in plain_grads if not torch.equal(lean_grads[name], plain_grads[name])]
    assert unequal == []
    assert lean_saved < 0.9 * plain_saved
