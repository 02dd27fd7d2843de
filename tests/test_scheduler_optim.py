"""Tests for the optimizer and LR-scheduler factories (grouping, LR trajectories, checkpoint format)."""

from __future__ import annotations

import io
import logging
import math

import pytest
import timm.optim
import timm.scheduler
import torch
from torch import nn

from optim import OPTIMIZER_NAMES, create_optimizer, param_groups_weight_decay
from scheduler import (
    CosineLRScheduler,
    PlateauLRScheduler,
    StepLRScheduler,
    TanhLRScheduler,
    create_scheduler,
    epoch_end_step,
    epoch_start_step,
    warmup_step,
)

# ---------------------------------------------------------------------------------------------
# The optimizer and schedular sections of the shipped configs
# ---------------------------------------------------------------------------------------------


def _sections(lr: float, epochs: int, min_lr: float, warmup_epochs: int) -> tuple[dict, dict]:
    optimizer = {"opt": "adamW", "lr": lr, "weight_decay": 0.02}
    schedular = {
        "sched": "cosine",
        "lr": lr,
        "epochs": epochs,
        "min_lr": min_lr,
        "decay_rate": 1,
        "warmup_lr": 1e-5,
        "warmup_epochs": warmup_epochs,
        "cooldown_epochs": 0,
    }
    return optimizer, schedular


PRETRAIN = _sections(1e-4, 30, 1e-5, 20)
VQA = _sections(2e-5, 8, 1e-6, 4)
RETRIEVAL_COCO = _sections(1e-5, 5, 1e-6, 1)
VE = _sections(2e-5, 5, 1e-6, 1)
NLVR_PRETRAIN = _sections(2e-5, 1, 1e-5, 1)


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


def _lrs(optimizer: torch.optim.Optimizer) -> float:
    """The LR shared by every param group (asserts they agree)."""
    values = {group["lr"] for group in optimizer.param_groups}
    assert len(values) == 1, values
    return values.pop()


def simulate(
    config: tuple[dict, dict],
    iters_per_epoch: int,
    num_epochs: int,
    pattern: str,
    later_iters: int = 1,
) -> list[list[float]]:
    """Replay the training loops' scheduler calls; return the LR used at each iteration of each epoch.

    ``pattern`` is ``"start"`` (Pretrain/VQA/Pretrain_NLVR) or ``"end"`` (Retrieval/NLVR/VE...).
    Epochs after the first are only sampled for ``later_iters`` iterations (their LR is constant).
    """
    opt_cfg, sched_cfg = config
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    scheduler, _ = create_scheduler(sched_cfg, optimizer)
    warmup_epochs = sched_cfg["warmup_epochs"]
    trajectory = []
    for epoch in range(num_epochs):
        if pattern == "start":
            epoch_start_step(scheduler, epoch, warmup_epochs)
        n_iters = iters_per_epoch if epoch == 0 else later_iters
        epoch_lrs = []
        for i in range(n_iters):
            epoch_lrs.append(_lrs(optimizer))  # LR used by optimizer.step() of iteration i
            warmup_step(scheduler, epoch, i, warmup_epochs)
        trajectory.append(epoch_lrs)
        if pattern == "end":
            epoch_end_step(scheduler, epoch, warmup_epochs)
    return trajectory


def _approx(value: float, rel: float = 1e-4):
    return pytest.approx(value, rel=rel, abs=0.0)


# ---------------------------------------------------------------------------------------------
# LR trajectories produced by the original training loops
# ---------------------------------------------------------------------------------------------


def test_pretrain_long_epoch0_and_cosine_epochs():
    traj = simulate(PRETRAIN, iters_per_epoch=2200, num_epochs=30, pattern="start")
    epoch0 = traj[0]
    assert all(lr == 1e-5 for lr in epoch0[:101])
    for k in range(1, 20):
        # after iteration 100*k the LR rises by 4.5e-6 per unit
        block = epoch0[100 * k + 1 : 100 * k + 101]
        assert all(lr == _approx(1e-5 + 4.5e-6 * k, 1e-9) for lr in block)
    assert epoch0[1901] == _approx(9.55e-5, 1e-9)
    assert all(lr == _approx(1e-4, 1e-12) for lr in epoch0[2001:])
    assert traj[1][0] == _approx(9.9753e-5)
    assert traj[2][0] == _approx(9.9017e-5)
    assert traj[15][0] == _approx(5.5e-5)
    assert traj[29][0] == _approx(1.0247e-5)


def test_pretrain_short_epoch0_never_reaches_peak():
    traj = simulate(PRETRAIN, iters_per_epoch=250, num_epochs=30, pattern="start")
    epoch0 = traj[0]
    assert epoch0[:101] == [1e-5] * 101
    assert all(lr == _approx(1.45e-5, 1e-9) for lr in epoch0[101:201])
    assert all(lr == _approx(1.9e-5, 1e-9) for lr in epoch0[201:250])
    assert traj[1][0] == _approx(9.97535e-5, 1e-5)
    assert traj[2][0] == _approx(9.90166e-5, 1e-5)
    assert traj[29][0] == _approx(1.02465e-5, 1e-5)
    # closed form for every epoch >= 1
    for e in range(1, 30):
        expected = 1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * e / 30))
        assert traj[e][0] == _approx(expected, 1e-12)


def test_vqa_trajectory():
    traj = simulate(VQA, iters_per_epoch=600, num_epochs=8, pattern="start")
    epoch0 = traj[0]
    assert epoch0[:101] == [1e-5] * 101
    for k in range(1, 4):
        assert all(lr == _approx(1e-5 + 2.5e-6 * k, 1e-9) for lr in epoch0[100 * k + 1 : 100 * k + 101])
    assert all(lr == _approx(2e-5, 1e-12) for lr in epoch0[401:])
    expected = [1.9277e-5, 1.7218e-5, 1.4135e-5, 1.05e-5, 6.8645e-6, 3.7825e-6, 1.7231e-6]
    assert [traj[e][0] for e in range(1, 8)] == [_approx(v) for v in expected]


def test_retrieval_coco_trajectory_end_of_epoch_pattern():
    traj = simulate(RETRIEVAL_COCO, iters_per_epoch=300, num_epochs=5, pattern="end")
    assert traj[0] == [1e-5] * 300  # warmup_lr == lr: flat epoch 0
    expected = [9.1406e-6, 6.8906e-6, 4.1094e-6, 1.8594e-6]
    assert [traj[e][0] for e in range(1, 5)] == [_approx(v) for v in expected]


def test_ve_trajectory():
    traj = simulate(VE, iters_per_epoch=250, num_epochs=5, pattern="end")
    assert traj[0][:101] == [1e-5] * 101
    assert all(lr == _approx(2e-5, 1e-12) for lr in traj[0][101:])
    expected = [1.81857e-5, 1.34357e-5, 7.56434e-6, 2.81434e-6]
    assert [traj[e][0] for e in range(1, 5)] == [_approx(v, 1e-5) for v in expected]


def test_nlvr_pretrain_single_epoch(caplog):
    with caplog.at_level(logging.WARNING):
        traj = simulate(NLVR_PRETRAIN, iters_per_epoch=300, num_epochs=1, pattern="start")
    assert any("no effect" in rec.getMessage() for rec in caplog.records)
    assert traj[0][:101] == [1e-5] * 101
    assert all(lr == _approx(2e-5, 1e-12) for lr in traj[0][101:])


def test_start_and_end_patterns_agree():
    start = simulate(VE, iters_per_epoch=150, num_epochs=5, pattern="start")
    end = simulate(VE, iters_per_epoch=150, num_epochs=5, pattern="end")
    assert start == end


def test_construction_sets_warmup_lr_and_initial_lr():
    opt_cfg, sched_cfg = PRETRAIN
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    scheduler, num_epochs = create_scheduler(sched_cfg, optimizer)
    assert isinstance(scheduler, CosineLRScheduler)
    assert isinstance(scheduler, timm.scheduler.CosineLRScheduler)
    assert num_epochs == 30
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-5]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1e-4, 1e-4]
    # the section's own ``lr`` is ignored: the peak is the optimizer LR
    sched_cfg = dict(sched_cfg, lr=123.0)
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    scheduler, _ = create_scheduler(sched_cfg, optimizer)
    scheduler.step(20)
    assert _lrs(optimizer) == 1e-4


def test_cooldown_added_to_epoch_count():
    opt_cfg, sched_cfg = VQA
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    _, num_epochs = create_scheduler(dict(sched_cfg, cooldown_epochs=3), optimizer)
    assert num_epochs == 11


# ---------------------------------------------------------------------------------------------
# Scheduler state dict (original checkpoint format)
# ---------------------------------------------------------------------------------------------

ORIGINAL_COSINE_KEYS = [
    "param_group_field",
    "_initial_param_group_field",
    "base_values",
    "metric",
    "noise_range_t",
    "noise_pct",
    "noise_type",
    "noise_std",
    "noise_seed",
    "t_initial",
    "t_mul",
    "lr_min",
    "decay_rate",
    "cycle_limit",
    "warmup_t",
    "warmup_lr_init",
    "warmup_prefix",
    "t_in_epochs",
    "warmup_steps",
]

# What the original code saves under ``lr_scheduler`` for Pretrain.yaml (any epoch: the schedule is
# a pure function of the step argument).
ORIGINAL_PRETRAIN_STATE = {
    "param_group_field": "lr",
    "_initial_param_group_field": "initial_lr",
    "base_values": [0.0001, 0.0001],
    "metric": None,
    "noise_range_t": None,
    "noise_pct": 0.67,
    "noise_type": "normal",
    "noise_std": 1.0,
    "noise_seed": 42,
    "t_initial": 30,
    "t_mul": 1.0,
    "lr_min": 1e-05,
    "decay_rate": 1,
    "cycle_limit": 1,
    "warmup_t": 20,
    "warmup_lr_init": 1e-05,
    "warmup_prefix": True,
    "t_in_epochs": True,
    "warmup_steps": [4.5e-06, 4.5e-06],
}


def test_state_dict_original_format():
    opt_cfg, sched_cfg = PRETRAIN
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    scheduler, _ = create_scheduler(sched_cfg, optimizer)
    for epoch in range(1, 6):
        epoch_start_step(scheduler, epoch, 20)
    state = scheduler.state_dict()
    assert list(state) == ORIGINAL_COSINE_KEYS
    assert state == ORIGINAL_PRETRAIN_STATE


def test_load_original_state_dict_then_step():
    # Fresh scheduler built from a different config (VQA), then resumed from a Pretrain checkpoint.
    opt_cfg, sched_cfg = VQA
    optimizer = create_optimizer(dict(opt_cfg, lr=1e-4), _tiny_model())
    scheduler, _ = create_scheduler(sched_cfg, optimizer)
    scheduler.load_state_dict(dict(ORIGINAL_PRETRAIN_STATE))
    assert scheduler.state_dict() == ORIGINAL_PRETRAIN_STATE
    # resume after saved epoch 5: top of epoch 6 steps to 6 + warmup_epochs
    epoch_start_step(scheduler, 6, 20)
    expected = 1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * 6 / 30))
    assert _lrs(optimizer) == _approx(expected, 1e-12)
    assert _lrs(optimizer) == _approx(9.1406e-5)
    epoch_start_step(scheduler, 29, 20)
    assert _lrs(optimizer) == _approx(1.0247e-5)


def test_state_dict_round_trip_through_torch_save():
    opt_cfg, sched_cfg = VQA
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    scheduler, _ = create_scheduler(sched_cfg, optimizer)
    buffer = io.BytesIO()
    torch.save({"lr_scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["lr_scheduler"]

    optimizer2 = create_optimizer(PRETRAIN[0], _tiny_model())
    scheduler2, _ = create_scheduler(PRETRAIN[1], optimizer2)
    scheduler2.load_state_dict(loaded)
    assert scheduler2.state_dict() == scheduler.state_dict()
    for t in range(0, 12):
        scheduler.step(t)
        scheduler2.step(t)
        assert _lrs(optimizer2) == _lrs(optimizer)
    # the state dict is a snapshot, not a view of the live lists
    snapshot = scheduler.state_dict()
    snapshot["base_values"].append(1.0)
    assert len(scheduler.base_values) == 2


def test_load_timm_1x_state_dict():
    opt_cfg, sched_cfg = PRETRAIN
    ref_opt = create_optimizer(opt_cfg, _tiny_model())
    timm_sched = timm.scheduler.CosineLRScheduler(
        ref_opt,
        t_initial=30,
        lr_min=1e-5,
        cycle_mul=1.0,
        cycle_decay=1,
        cycle_limit=1,
        warmup_t=20,
        warmup_lr_init=1e-5,
        warmup_prefix=True,
        t_in_epochs=True,
        noise_seed=42,
    )
    timm_state = timm_sched.state_dict()
    assert "cycle_mul" in timm_state and "t_mul" not in timm_state

    optimizer = create_optimizer(VE[0], _tiny_model())
    scheduler, _ = create_scheduler(VE[1], optimizer)
    scheduler.load_state_dict(timm_state)
    assert scheduler.state_dict() == ORIGINAL_PRETRAIN_STATE
    for t in (0, 7, 20, 21, 35, 49, 50, 60):
        timm_sched.step(t)
        scheduler.step(t)
        assert _lrs(optimizer) == _approx(_lrs(ref_opt), 1e-12)


def test_other_schedulers_state_keys_and_values():
    def build(extra):
        optimizer = create_optimizer({"opt": "adamw", "lr": 1e-3, "weight_decay": 0.0}, _tiny_model())
        base = {"epochs": 10, "min_lr": 1e-5, "decay_rate": 0.5, "warmup_lr": 1e-4, "warmup_epochs": 2}
        base["cooldown_epochs"] = 0
        sched, n = create_scheduler(dict(base, **extra), optimizer)
        return sched, n, optimizer

    tanh, n, optimizer = build({"sched": "tanh"})
    assert isinstance(tanh, TanhLRScheduler) and n == 10
    assert list(tanh.state_dict())[9:13] == ["lb", "ub", "t_initial", "t_mul"]
    assert (tanh.lb, tanh.ub, tanh.warmup_prefix) == (-6.0, 4.0, False)
    tanh.step(5)
    tr = 5 / 10
    assert _lrs(optimizer) == _approx(
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1 - math.tanh(-6 * (1 - tr) + 4 * tr)), 1e-12
    )

    step, n, optimizer = build({"sched": "step", "decay_epochs": 3})
    assert isinstance(step, StepLRScheduler) and n == 10
    assert list(step.state_dict())[9:] == [
        "decay_t",
        "decay_rate",
        "warmup_t",
        "warmup_lr_init",
        "t_in_epochs",
        "warmup_steps",
    ]
    assert _lrs(optimizer) == 1e-4
    step.step(1)
    assert _lrs(optimizer) == _approx(1e-4 + (1e-3 - 1e-4) / 2, 1e-12)
    step.step(7)  # decay counted from t = 0, not from the end of warm-up
    assert _lrs(optimizer) == _approx(1e-3 * 0.5**2, 1e-12)

    plateau, n, optimizer = build({"sched": "plateau", "patience_epochs": 1, "eval_metric": "loss"})
    assert isinstance(plateau, PlateauLRScheduler) and n == 10
    assert plateau.lr_scheduler.mode == "min"
    assert set(plateau.state_dict()) == {"best", "last_epoch"}


def test_lr_noise_matches_original_draws():
    opt_cfg, sched_cfg = RETRIEVAL_COCO
    optimizer = create_optimizer(opt_cfg, _tiny_model())
    cfg = dict(sched_cfg, lr_noise=[0.6], lr_noise_std=5.0, seed=7)
    scheduler, _ = create_scheduler(cfg, optimizer)
    assert scheduler.noise_range_t == 3.0  # 0.6 * epochs, compared with the raw step argument
    scheduler.step(2)  # t < 3: no noise
    assert _lrs(optimizer) == _approx(1e-6 + 0.5 * 9e-6 * (1 + math.cos(math.pi / 5)), 1e-12)
    scheduler.step(3)
    gen = torch.Generator()
    gen.manual_seed(7 + 3)
    while True:  # normal noise, redrawn until |n| < noise_pct, not scaled by noise_std
        n = torch.randn(1, generator=gen).item()
        if abs(n) < 0.67:
            break
    clean = 1e-6 + 0.5 * 9e-6 * (1 + math.cos(2 * math.pi / 5))
    assert _lrs(optimizer) == _approx(clean + clean * n, 1e-12)


def test_unknown_scheduler():
    optimizer = create_optimizer({"opt": "adamw", "lr": 1e-3, "weight_decay": 0.0}, _tiny_model())
    with pytest.raises(ValueError, match="'linear'.*cosine"):
        create_scheduler(dict(PRETRAIN[1], sched="linear"), optimizer)


# ---------------------------------------------------------------------------------------------
# Optimizer parameter grouping
# ---------------------------------------------------------------------------------------------


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        for p in self.parameters():
            p.requires_grad_(False)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.frozen = _Frozen()
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied
        self.scale = nn.Parameter(torch.ones(2, 2))


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_param_grouping_matches_original():
    model = _Toy()
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    assert type(optimizer) is torch.optim.AdamW
    g0, g1 = optimizer.param_groups
    assert g0["weight_decay"] == 0.0 and g1["weight_decay"] == 0.02
    assert _ids(g0["params"]) == _ids([model.norm.weight, model.norm.bias, model.fc.bias, model.head.bias])
    # a module's own parameters come before its children's in named_parameters()
    assert _ids(g1["params"]) == _ids(
        [model.temp, model.pos_embed, model.scale, model.embed.weight, model.fc.weight]
    )
    all_ids = _ids(g0["params"]) + _ids(g1["params"])
    assert len(all_ids) == len(set(all_ids))  # the tied weight appears once
    assert not set(_ids(model.frozen.parameters())) & set(all_ids)
    for group in optimizer.param_groups:
        assert group["lr"] == 1e-4
        assert group["betas"] == (0.9, 0.999)
        assert group["eps"] == 1e-8
        assert group["amsgrad"] is False


def test_param_groups_function_and_skip_list():
    model = _Toy()
    groups = param_groups_weight_decay(model, 0.05, skip_list=["scale"])
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    assert _ids(groups[0]["params"])[0] == id(model.scale)
    assert id(model.temp) in _ids(groups[1]["params"])


def test_no_weight_decay_only_from_top_level_module():
    class WithSkip(_Toy):
        def no_weight_decay(self):
            return {"pos_embed", "temp"}

    model = WithSkip()
    g0, g1 = create_optimizer({"opt": "adamw", "lr": 1e-4, "weight_decay": 0.02}, model).param_groups
    assert id(model.pos_embed) in _ids(g0["params"]) and id(model.temp) in _ids(g0["params"])

    class Wrapper(nn.Module):  # like DistributedDataParallel: names gain ``module.``
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(WithSkip())
    g0, g1 = create_optimizer({"opt": "adamw", "lr": 1e-4, "weight_decay": 0.02}, wrapped).param_groups
    assert id(wrapped.module.pos_embed) in _ids(g1["params"])
    assert id(wrapped.module.temp) in _ids(g1["params"])


def test_zero_weight_decay_single_group():
    model = _Toy()
    optimizer = create_optimizer({"opt": "adamw", "lr": 1e-4, "weight_decay": 0}, model)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert _ids(optimizer.param_groups[0]["params"]) == _ids(model.parameters())


def test_optional_optimizer_keys():
    cfg = {
        "opt": "AdamW",
        "lr": 3e-4,
        "weight_decay": 0.1,
        "opt_eps": 1e-6,
        "opt_betas": [0.8, 0.95],
        "opt_args": {"amsgrad": True},
    }
    optimizer = create_optimizer(cfg, _tiny_model())
    group = optimizer.param_groups[1]
    assert (group["eps"], group["betas"], group["amsgrad"], group["weight_decay"]) == (
        1e-6,
        (0.8, 0.95),
        True,
        0.1,
    )


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", torch.optim.SGD),
        ("nesterov", torch.optim.SGD),
        ("momentum", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("nadam", timm.optim.NAdamLegacy),
        ("radam", timm.optim.RAdamLegacy),
        ("adamp", timm.optim.AdamP),
        ("sgdp", timm.optim.SGDP),
        ("adadelta", torch.optim.Adadelta),
        ("adafactor", timm.optim.Adafactor),
        ("adahessian", timm.optim.Adahessian),
        ("rmsprop", torch.optim.RMSprop),
        ("rmsproptf", timm.optim.RMSpropTF),
        ("novograd", timm.optim.NvNovoGrad),
        ("nvnovograd", timm.optim.NvNovoGrad),
        ("lookahead_adamw", timm.optim.Lookahead),
    ],
)
def test_other_optimizer_names(name, cls):
    optimizer = create_optimizer(
        {"opt": name, "lr": 1e-3, "weight_decay": 0.01, "momentum": 0.8}, _tiny_model()
    )
    assert isinstance(optimizer, cls)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.01]
    group = optimizer.param_groups[0]
    if name in ("sgd", "nesterov", "momentum"):
        assert group["momentum"] == 0.8
        assert group["nesterov"] is (name != "momentum")
    if name == "rmsprop":
        assert group["alpha"] == 0.9 and group["momentum"] == 0.8
    if name == "lookahead_adamw":
        assert isinstance(optimizer._base_optimizer, torch.optim.AdamW)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match=r"'adamx'.*adamw") as info:
        create_optimizer({"opt": "adamx", "lr": 1e-3, "weight_decay": 0.0}, _tiny_model())
    assert all(name in str(info.value) for name in OPTIMIZER_NAMES)
    with pytest.raises(ValueError, match="lookahead_"):
        create_optimizer({"opt": "slow_adamw", "lr": 1e-3, "weight_decay": 0.0}, _tiny_model())
