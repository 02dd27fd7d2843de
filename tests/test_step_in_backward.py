"""Updates applied during backward (optim.in_backward): the same parameters and optimizer state as
``backward(); optimizer.step()``, bit for bit, with fewer gradients alive at once."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks.pretrain_step import PRESETS, make_batch
from engine.loop import EpochSettings, train_one_epoch
from models.simla.pretrain import SIMLA
from optim import create_optimizer
from optim.in_backward import StepInBackward


class TiedNet(nn.Module):
    """A table used twice (lookup and output projection), decayed and undecayed groups, an unused part."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16))
        self.unused = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(self.table(ids))
        logits = hidden @ self.table.weight.t()
        return nn.functional.cross_entropy(logits.view(-1, 50), ids.view(-1))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], in_backward: bool,
           bucket_mb: float = 16.0) -> list[float]:
    stepper = StepInBackward(optimizer, bucket_mb=bucket_mb) if in_backward else None
    losses = []
    for step, ids in enumerate(batches):
        for group in optimizer.param_groups:  # a schedule changing the LR between steps
            group["lr"] = 1e-2 / (step + 1)
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids)
        if stepper is None:
            loss.backward()
            optimizer.step()
        else:
            with stepper.active():
                loss.backward()
            assert all(p.grad is None for p in model.parameters())
        losses.append(float(loss.detach()))
    if stepper is not None:
        stepper.remove()
    return losses


def _assert_same_state(a: nn.Module, b: nn.Module, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for key, entry in state_a["state"].items():
        for field, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b["state"][key][field])), (key, field)


OPTIMIZERS = {
    "adamw_fused": {"opt": "adamW", "lr": 1e-2, "weight_decay": 0.02},
    "adamw_loop": {"opt": "adamW", "lr": 1e-2, "weight_decay": 0.02, "opt_args": {"fused": False, "foreach": False}},
    "adam": {"opt": "adam", "lr": 1e-2, "weight_decay": 0.01},
    "sgd_momentum": {"opt": "momentum", "lr": 1e-2, "weight_decay": 1e-4, "momentum": 0.9},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bucket_mb", [0.0, 16.0])
def test_same_updates_as_a_step_after_backward(name, bucket_mb):
    torch.manual_seed(0)
    reference = TiedNet()
    model = copy.deepcopy(reference)
    opt_ref = create_optimizer(OPTIMIZERS[name], reference)
    opt = create_optimizer(OPTIMIZERS[name], model)
    batches = [torch.randint(0, 50, (4, 7)) for _ in range(4)]
    assert _train(reference, opt_ref, batches, False) == _train(model, opt, batches, True, bucket_mb)
    _assert_same_state(reference, model, opt_ref, opt)
    # the unused parameters were never touched, as with optimizer.step()
    assert all(id(p) not in {id(q) for q in opt.state} for p in model.unused.parameters())


def test_gradients_are_freed_while_backward_runs():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stepper = StepInBackward(optimizer, bucket_mb=0.0)
    params = list(model.parameters())
    most_alive = 0

    def count(_: torch.Tensor) -> None:
        nonlocal most_alive
        most_alive = max(most_alive, sum(p.grad is not None for p in params))

    handles = [p.register_post_accumulate_grad_hook(count) for p in params]
    with stepper.active():
        model(torch.randn(5, 64)).square().sum().backward()
    assert most_alive <= 2  # the parameter being applied (and at most one more hook ordering)
    assert all(p.grad is None for p in params)
    assert all(optimizer.state[p]["step"] == 1 for p in params)
    for handle in handles:
        handle.remove()


def test_hooks_do_nothing_outside_active_and_after_remove():
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = StepInBackward(optimizer)
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).sum().backward()
    assert model.weight.grad is not None and torch.equal(model.weight, before)
    stepper.remove()
    optimizer.zero_grad(set_to_none=True)
    model(torch.ones(2, 4)).sum().backward()
    assert model.weight.grad is not None and torch.equal(model.weight, before)


def test_unsupported_optimizer_is_refused():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="Adagrad"):
        StepInBackward(torch.optim.Adagrad(model.parameters()))


def _pretrain_model() -> tuple[SIMLA, tuple]:
    preset = dict(PRESETS["tiny"])
    tokenizer = SimpleNamespace(vocab_size=preset["vocab_size"], cls_token_id=101, pad_token_id=0, mask_token_id=103)
    torch.manual_seed(0)
    model = SIMLA(tokenizer=tokenizer, config=preset).train()
    batches = [make_batch(preset, 4, torch.device("cpu"), torch.Generator().manual_seed(seed)) for seed in range(3)]
    return model, batches


def _epoch(model: SIMLA, batches: list, in_backward: bool, scaler=None) -> dict:
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02}, model)

    def step(batch, i, n):
        image, text, codes, masked = batch
        losses = model(image, text, visual_token_ids=codes, masked_visual_token_pos=masked,
                       masked_visual_tok_labels=codes[masked], alpha=0.4)
        return dict(zip(("mlm", "ita", "itm", "mim", "psl"), losses))

    settings = EpochSettings(loss_names=("mlm", "ita", "itm", "mim", "psl"), print_freq=100,
                             step_in_backward=in_backward)
    torch.manual_seed(1)
    stats = train_one_epoch(model, batches, optimizer, None, 1, torch.device("cpu"), step, settings, scaler=scaler)
    return {"stats": stats, "optimizer": optimizer.state_dict()}


def test_pretraining_epoch_is_bitwise_the_same():
    reference, batches = _pretrain_model()
    model = copy.deepcopy(reference)
    expected = _epoch(reference, batches, in_backward=False)
    got = _epoch(model, batches, in_backward=True)
    assert got["stats"] == expected["stats"]
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # no hook is left on the parameters after the epoch
    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_fp16_loss_scaling_is_refused():
    model, batches = _pretrain_model()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="--amp fp16"):
        _epoch(model, batches, in_backward=True, scaler=scaler)
