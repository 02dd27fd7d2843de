"""Tests for utils.py and engine/: metric logging, distributed utilities, CLI parsing and checkpoint I/O
(engine.checkpoint)."""

from __future__ import annotations

import argparse
import base64
import builtins
import datetime
import io
import json
import lzma
import os
import sys
import types
import typing
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.distributed as dist

import engine.checkpoint as checkpoints
import utils
from engine import distributed, metrics


@pytest.fixture(autouse=True)
def _restore_print():
    """init_distributed_mode replaces builtins.print; put the original back after each test."""
    original = builtins.print
    yield
    builtins.print = original


# ---------------------------------------------------------------------------------------------------
# SmoothedValue / MetricLogger
# ---------------------------------------------------------------------------------------------------


def test_smoothed_value_statistics():
    meter = metrics.SmoothedValue()
    for value in (0.1, 0.2, 0.3, 0.4):
        meter.update(value)
    # torch median of a float32 tensor: the lower of the two middle values, in float32
    assert meter.median == pytest.approx(0.20000000298, abs=1e-11)
    assert meter.median == torch.tensor(0.2, dtype=torch.float32).item()
    assert meter.avg == torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float32).mean().item()
    assert meter.global_avg == pytest.approx(0.25)
    assert meter.max == 0.4
    assert meter.value == 0.4
    assert str(meter) == "0.2000 (0.2500)"


def test_smoothed_value_window_and_weights():
    meter = metrics.SmoothedValue(window_size=2, fmt="{value:.1f}|{max:.1f}|{avg:.2f}|{global_avg:.3f}")
    meter.update(1.0, n=3)
    meter.update(2.0)
    meter.update(4.0)
    assert list(meter.deque) == [2.0, 4.0]
    assert meter.count == 5
    assert meter.total == pytest.approx(9.0)
    assert str(meter) == "4.0|4.0|3.00|1.800"
    ints = metrics.SmoothedValue()
    for value in (3, 1, 2, 4):
        ints.update(value)
    assert ints.median == 2 and isinstance(ints.median, int)


def test_smoothed_value_empty_does_not_crash():
    meter = metrics.SmoothedValue()
    assert np.isnan(meter.median) and np.isnan(meter.global_avg)


def _pretrain_logger(clock):
    logger = metrics.MetricLogger(delimiter="  ", clock=clock)
    logger.add_meter("lr", metrics.SmoothedValue(window_size=50, fmt="{value:.6f}"))
    for name in ("loss_mlm", "loss_ita", "loss_itm", "loss_mim", "loss_pseudo"):
        logger.add_meter(name, metrics.SmoothedValue(window_size=50, fmt="{value:.4f}"))
    return logger


def test_log_every_matches_original_format(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines: list[str] = []
    logger = _pretrain_logger(clock=lambda: 100.0)
    logger._print_fn = lines.append
    for i in logger.log_every(range(120), 50, "Train Epoch: [0]"):
        logger.update(
            lr=1e-5, loss_mlm=float(i + 1), loss_ita=2.0, loss_itm=torch.tensor(0.5), loss_mim=3.0,
            loss_pseudo=0.25,
        )
    assert len(lines) == 5  # items 0, 50, 100, 119 and the total line
    assert lines[1] == (
        "Train Epoch: [0]  [ 50/120]  eta: 0:00:00  lr: 0.000010  loss_mlm: 51.0000  loss_ita: 2.0000  "
        "loss_itm: 0.5000  loss_mim: 3.0000  loss_pseudo: 0.2500  time: 0.0000  data: 0.0000"
    )
    assert lines[0].startswith("Train Epoch: [0]  [  0/120]  eta: 0:00:00  lr: 0.000010  loss_mlm: 1.0000")
    assert lines[3].startswith("Train Epoch: [0]  [119/120]")
    assert lines[4] == "Train Epoch: [0] Total time: 0:00:00 (0.0000 s / it)"
    assert logger.global_avg() == (
        "lr: 0.0000  loss_mlm: 60.5000  loss_ita: 2.0000  loss_itm: 0.5000  loss_mim: 3.0000  "
        "loss_pseudo: 0.2500"
    )
    assert logger.loss_mlm.global_avg == 60.5


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_every_timings_eta_and_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 1024 * 1024 + 10)
    clock = _FakeClock()

    def slow_items():
        for item in range(10):
            clock.now += 0.5  # data loading
            yield item

    class Sized:
        def __len__(self):
            return 10

        def __iter__(self):
            return slow_items()

    lines: list[str] = []
    logger = metrics.MetricLogger(delimiter="  ", clock=clock, print_fn=lines.append)
    for _ in logger.log_every(Sized(), 5, "Evaluation:"):
        clock.now += 1.5  # loop body
        logger.update(acc=1)
    assert lines[0] == (
        "Evaluation:  [ 0/10]  eta: 0:00:20  acc: 1.0000 (1.0000)  time: 2.0000  data: 0.5000  max mem: 3"
    )
    assert lines[1].startswith("Evaluation:  [ 5/10]  eta: 0:00:10  acc: 1.0000")
    assert lines[2].startswith("Evaluation:  [ 9/10]  eta: 0:00:02")
    assert lines[3] == "Evaluation: Total time: 0:00:20 (2.0000 s / it)"


def test_log_every_uses_print_and_patched_time(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(metrics.time, "time", lambda: 5.0)
    logger = metrics.MetricLogger(delimiter="  ")
    assert list(logger.log_every([1, 2], 50, "Generate VQA test result:")) == [1, 2]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Generate VQA test result:  [0/2]  eta: 0:00:00    time: 0.0000  data: 0.0000",
        "Generate VQA test result:  [1/2]  eta: 0:00:00    time: 0.0000  data: 0.0000",
        "Generate VQA test result: Total time: 0:00:00 (0.0000 s / it)",
    ]


def test_metric_logger_str_and_type_check():
    logger = metrics.MetricLogger(delimiter="  ")
    logger.update(loss=torch.tensor(2.0), acc=np.float32(0.5))
    assert str(logger) == "loss: 2.0000 (2.0000)  acc: 0.5000 (0.5000)"
    with pytest.raises(TypeError, match="loss"):
        logger.update(loss="high")
    with pytest.raises(AttributeError):
        _ = logger.missing_meter


def test_format_time():
    assert metrics.format_time(0) == "0:00:00"
    assert metrics.format_time(3725.9) == "1:02:05"


# ---------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("True", True), ("YES", True), ("1", True), ("false", False), ("False", False),
     ("no", False), ("0", False), (" No ", False), (True, True), (False, False)],
)
def test_str2bool_values(text, expected):
    assert utils.str2bool(text) is expected


def test_str2bool_rejects_garbage_with_argparse_error(capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="invalid boolean value 'maybe'"):
        utils.str2bool("maybe")
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", type=utils.str2bool, default=False)
    assert parser.parse_args(["--resume", "False"]).resume is False
    assert parser.parse_args(["--resume", "true"]).resume is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "perhaps"])
    assert "invalid boolean value 'perhaps'" in capsys.readouterr().err


def test_seed_everything_is_reproducible():
    assert utils.seed_everything(7) == 7
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    utils.seed_everything(7)
    second = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_append_log(tmp_path):
    metrics.append_log(tmp_path, {"train_lr": "0.000", "epoch": 0})
    metrics.append_log(str(tmp_path), {"test_r_mean": 12.5, "epoch": 1})
    metrics.append_log(tmp_path, "best epoch: 1")
    assert (tmp_path / "log.txt").read_text() == (
        '{"train_lr": "0.000", "epoch": 0}\n{"test_r_mean": 12.5, "epoch": 1}\nbest epoch: 1'
    )


# ---------------------------------------------------------------------------------------------------
# Distributed utilities
# ---------------------------------------------------------------------------------------------------

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
             "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _forbid(*_args, **_kwargs):
    raise AssertionError("must not be called")


def test_init_distributed_mode_without_env(clean_env, capsys):
    clean_env.setattr(dist, "init_process_group", _forbid)
    clean_env.setattr(dist, "barrier", _forbid)
    clean_env.setattr(torch.cuda, "set_device", _forbid)
    args = argparse.Namespace(device="cuda", dist_url="env://", world_size=1, distributed=True)
    distributed.init_distributed_mode(args)
    assert args.distributed is False
    assert capsys.readouterr().out == "Not using distributed mode\n"
    print("still printed", force=True)
    assert capsys.readouterr().out == "still printed\n"


def _record_init(calls):
    def fake_init(**kwargs):
        calls.append(kwargs)

    return fake_init


def test_init_distributed_mode_torchrun_env_cpu(clean_env, capsys):
    calls: list[dict] = []
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setattr(dist, "init_process_group", _record_init(calls))
    clean_env.setattr(torch.cuda, "set_device", _forbid)
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    distributed.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (1, 2, 1, True)
    assert args.dist_backend == "gloo"
    assert calls == [{"backend": "gloo", "init_method": "env://", "world_size": 2, "rank": 1,
                      "timeout": datetime.timedelta(seconds=1800)}]
    assert capsys.readouterr().out == "| distributed init (rank 1): env://\n"
    print("hidden on rank 1")
    assert capsys.readouterr().out == ""
    print("forced", force=True)
    assert capsys.readouterr().out == "forced\n"


def test_init_distributed_mode_cuda_uses_nccl(clean_env):
    calls: list[dict] = []
    devices: list[int] = []
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "set_device", devices.append)
    clean_env.setattr(dist, "init_process_group", _record_init(calls))
    args = argparse.Namespace(device="cuda", dist_url="tcp://127.0.0.1:1234")
    distributed.init_distributed_mode(args)
    assert args.dist_backend == "nccl" and devices == [0]
    assert calls[0]["backend"] == "nccl" and calls[0]["init_method"] == "tcp://127.0.0.1:1234"


def test_init_distributed_mode_slurm(clean_env):
    calls: list[dict] = []
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setattr(dist, "init_process_group", _record_init(calls))
    args = argparse.Namespace(device="cpu", dist_url="tcp://127.0.0.1:1234", world_size=1)
    distributed.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (3, 4, 1)
    assert calls[0]["rank"] == 3 and calls[0]["world_size"] == 4


def test_init_distributed_mode_single_slurm_task_without_rendezvous(clean_env, capsys):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.delenv("MASTER_ADDR", raising=False)
    clean_env.setattr(dist, "init_process_group", _forbid)
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    distributed.init_distributed_mode(args)
    assert args.distributed is False
    assert "Not using distributed mode" in capsys.readouterr().out


def test_collectives_without_process_group(clean_env):
    clean_env.setattr(dist, "barrier", _forbid)
    clean_env.setattr(dist, "all_reduce", _forbid)
    clean_env.setattr(dist, "all_gather", _forbid)
    assert not utils.is_dist_avail_and_initialized()
    assert utils.get_world_size() == 1 and utils.get_rank() == 0 and utils.is_main_process()
    utils.barrier()
    tensor = torch.arange(4.0)
    assert utils.concat_all_gather(tensor) is tensor
    assert utils.all_gather_tensor(tensor) is tensor
    assert utils.all_reduce_sum(tensor) is tensor
    meter = metrics.SmoothedValue()
    meter.update(2.0, n=3)
    meter.synchronize_between_processes()
    assert (meter.count, meter.total) == (3, 6.0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_collectives_with_single_process_gloo_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0
    )
    try:
        assert utils.is_dist_avail_and_initialized() and utils.get_world_size() == 1
        utils.barrier()
        gathered = utils.concat_all_gather(torch.arange(6.0).view(3, 2))
        assert torch.equal(gathered, torch.arange(6.0).view(3, 2))
        assert torch.equal(utils.all_reduce_sum(torch.ones(2)), torch.ones(2))
        logger = metrics.MetricLogger(delimiter="  ")
        logger.meters["acc"].update(0.5, n=4)
        logger.synchronize_between_processes()  # CPU tensors with gloo, no CUDA needed
        assert logger.meters["acc"].count == 4 and logger.meters["acc"].global_avg == 0.5
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def test_save_checkpoint_round_trip(tmp_path):
    path = tmp_path / "sub" / "checkpoint_00.pth"
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 0, "config": {"lr": 1e-4}}
    checkpoints.save_checkpoint(state, path)
    loaded = checkpoints.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["config"] == {"lr": 1e-4} and loaded["epoch"] == 0
    assert os.listdir(path.parent) == ["checkpoint_00.pth"]


def test_save_checkpoint_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_best.pth"
    checkpoints.save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[:20])  # half-written file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint_best.pth"]


def test_load_checkpoint_legacy_format(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2), "epoch": 3}, path, _use_new_zipfile_serialization=False)
    loaded = checkpoints.load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["epoch"] == 3


def test_load_checkpoint_missing_and_corrupt(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        checkpoints.load_checkpoint(missing)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="truncated.pth"):
        checkpoints.load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pth"):
        checkpoints.load_checkpoint(garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(RuntimeError, match="empty.pth"):
        checkpoints.load_checkpoint(empty)


class _WritesMarker:
    """Unpickling this object would run code that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _WritesMarker(str(marker))}, path)
    with pytest.raises(checkpoints.UnsafeCheckpointError) as info:
        checkpoints.load_checkpoint(path)
    message = str(info.value)
    assert "builtins.exec" in message and "--trust_checkpoint" in message and str(path) in message
    assert info.value.unsafe_globals == ["builtins.exec"]
    assert not marker.exists()
    # the payload is real: full unpickling (trust=True) does run it
    checkpoints.load_checkpoint(path, trust=True)
    assert marker.read_text() == "pwned"


def test_unknown_class_is_refused_with_its_name(tmp_path):
    path = tmp_path / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match="argparse.Namespace"):
        checkpoints.load_checkpoint(path)
    assert checkpoints.load_checkpoint(path, trust=True)["args"].lr == 1e-4


# --- OmegaConf-style checkpoints --------------------------------------------------------------------


def _install_fake_omegaconf(monkeypatch) -> dict[str, type]:
    """Register classes under OmegaConf's import paths so that pickle records those paths."""
    classes: dict[str, type] = {}
    layout = {
        "omegaconf.dictconfig": ["DictConfig"],
        "omegaconf.listconfig": ["ListConfig"],
        "omegaconf.nodes": ["AnyNode"],
        "omegaconf.base": ["Metadata", "ContainerMetadata"],
    }
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    for module_name, names in layout.items():
        module = types.ModuleType(module_name)
        for name in names:
            cls = type(name, (), {"__module__": module_name})
            setattr(module, name, cls)
            classes[name] = cls
        monkeypatch.setitem(sys.modules, module_name, module)
    return classes


def _make(cls: type, **state) -> object:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _fake_dictconfig(classes: dict[str, type], content: dict, parent=None, key=None) -> object:
    """Build an object with the attribute layout of a pickled OmegaConf 2.1 DictConfig."""

    def metadata(kind: str, key, object_type=None):
        fields = {
            "ref_type": typing.Any, "object_type": object_type, "optional": True, "key": key,
            "flags": {}, "flags_root": False,
            "resolver_cache": defaultdict(dict, {"now": {("%Y-%m-%d",): "2022-03-01"}}),
        }
        if kind == "ContainerMetadata":
            fields.update(key_type=typing.Any, element_type=typing.Any)
        return _make(classes[kind], **fields)

    node = _make(classes["DictConfig"], _metadata=metadata("ContainerMetadata", key, dict), _parent=parent)
    node._metadata.flags = {"struct": True}
    children = {}
    for name, value in content.items():
        if isinstance(value, dict):
            children[name] = _fake_dictconfig(classes, value, parent=node, key=name)
        elif isinstance(value, list):
            lst = _make(classes["ListConfig"], _metadata=metadata("ContainerMetadata", name, list),
                        _parent=node, _flags_cache=None)
            lst._content = [
                _make(classes["AnyNode"], _metadata=metadata("Metadata", i), _parent=lst,
                      _flags_cache=None, _val=item)
                for i, item in enumerate(value)
            ]
            children[name] = lst
        else:
            children[name] = _make(classes["AnyNode"], _metadata=metadata("Metadata", name), _parent=node,
                                   _flags_cache=None, _val=value)
    node._content = children
    return node


_PRETRAIN_CONFIG = {
    "train_file": ["data/json/coco_pretrain.json", "data/json/vg_pretrain.json"],
    "bert_config": "configs/shared_bert.json",
    "image_res": 256,
    "temp": 0.07,
    "disable_wandb": True,
    "from_scratch": None,
    "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "epochs": 30, "min_lr": 1e-5},
}


def test_omegaconf_style_checkpoint_loads_as_plain_dict(tmp_path, monkeypatch):
    had_omegaconf = "omegaconf" in sys.modules
    classes = _install_fake_omegaconf(monkeypatch)
    config = _fake_dictconfig(classes, _PRETRAIN_CONFIG)
    path = tmp_path / "checkpoint_00.pth"
    state = {"model": {"temp": torch.tensor(0.07)}, "optimizer": {"state": {}, "param_groups": []},
             "lr_scheduler": {"base_values": [1e-4]}, "config": config, "epoch": 0}
    torch.save(state, path)
    monkeypatch.undo()  # the fake omegaconf modules are gone again

    globals_needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode", "collections.defaultdict"} <= (
        globals_needed
    )
    for trust in (False, True):
        loaded = checkpoints.load_checkpoint(path, trust=trust)
        assert loaded["config"] == _PRETRAIN_CONFIG
        assert type(loaded["config"]) is dict and type(loaded["config"]["train_file"]) is list
        assert type(loaded["config"]["optimizer"]) is dict
        assert loaded["epoch"] == 0 and torch.equal(loaded["model"]["temp"], torch.tensor(0.07))
    assert had_omegaconf or "omegaconf" not in sys.modules  # loading never imports omegaconf


# torch.save({"config": cfg, "epoch": 3}) written with omegaconf 2.1.1 (the original's version), where
# cfg = OmegaConf.create({"train_file": ["a.json"], "lr": 1e-4, "res": 256, "flag": True, "none": None,
# "opt": {"opt": "adamW", "lr": 2e-5}}) in struct mode with a filled resolver cache; xz + base85.
_REAL_OMEGACONF_211_CHECKPOINT = (
    "{Wp48S^xk9=GL@E0stWa8~^|S5YJf5;0f#m5M2N$61-q1=M9UfQZ*A>u6;qdx3e%a7_P;4<v6yXiQ42|nuy5#xFt0J`8Vw=rmY#6"
    "YJK%1f#WaSI>?%l*|UjAh+f+vFr0~Dy%6Gy0dvvX7i>wQTcNmdGz16vF7W7V-T<$%stBMQmxZ3DSrmHNa9RMI9X6Y1%(Y!L5*vI="
    "ZHY^3ir2fni|N^QJ{!srv}kmwqM0i7v#Npx%xp!Q^1r05v<AmF_zhA2p?Z;FLiRr;k!t$Y`^1@V;Z(@z@(ho2mphv9lCaQf0L1SC"
    "A=&ZL#I%o1Tcka`81=@!$1I$1;y+mGOTN#*#w(E7J*#ZA(x3M7v|dG#U}-OX5Jc(QA$xbpd8uRP_~F|2Ex*#l_2_`sQ&=l(D_#S;"
    "XtL=x3~;sxv<9;|1u5yPk7n<@Zn~J*v37sMy;q^!j+U23ur~jz$1c|;vJh$_#a-f<>;h-wg8eC_lfR+oD<EbrQy5@Y!CSqays0Rq"
    "8BmHGI_PK`#Q+`yx}T=%d;;Icim~J7H9BX@gq*+^3iq<L;|~mJa|>E~Aiw|L?&Hwr!C|>^G&aRDGD&nwDW?z6t}n!}I3l&fX>R4`"
    "{Fv!Vvn{(6_ub}u=MG<r0aK?^d@Ryp?ptmB`O)FfjJ2-dOv>16x6D#1Y-Tjw%0bCMS99WN(Eyv03?=VhGWcG{VD-GN`N9lvs*%j^"
    "n@e)RSg7-qZ<m+H2a&~GZ~CBTH{!ITCH80ihs_E84*u>6>WQY1M6ygZufQLx`G8@`)zOLwgf;?fqkY5A5>u8{6q)MTh^f6Ey~)If"
    "xIrDsU8lHTRbjIfG&-gUx7c0X7^)!$(;eyEjlbjG^rzzU91zJ_xV*DmDt%9qK78oZWS$uve!q?)_*#`Y(43g;Bvo#d{r#vh$xOwv"
    "zY+jlHt2F%rYniM<>^7v<60w)LLtzl__6wi2BqD{S@oYvfN@WACTEvxvK-aSkqUIo^r{n>egde9sCN~Oya}I;hlaotULGV*kBSD+"
    "le(UXhl^Fhqky34p=GN43;F*i(^~As1p5)5VBV5(>a<MGGC9p2#(z&#I^BoWz~;q*05c`|1p6@ZfgbnW?08ihN8~Qn9LyZPA2e=P"
    "708tyYA}B(P)W3+#E*6^&>coN2r0B8+LIf@h@@xKo|(lCD_)H5tOv_30REy$raN)OM_7*3aR>!p*mp33b^-$AqGptG1_zAymhfvu"
    "*)qStteQ_&A_bm`mbL4!=Vo12bQgMp6!M{#%feJgFJK=ZJO{Spx2DF{?r;B4oeU>$g5RZ!J79hzl21jQGX(_o+pJkzNq|r{f)L0f"
    "z0tWdPvwin6qT>RD>DPe+nG-AyZB<A>p<^D1t3=d6XgTDQxbXE00FEB?Gpe1Maqt+vBYQl0ssI200dcD"
)


def test_real_omegaconf_pickle_loads_without_omegaconf(tmp_path):
    had_omegaconf = "omegaconf" in sys.modules
    path = tmp_path / "pretrain_checkpoint.pth"
    path.write_bytes(lzma.decompress(base64.b85decode(_REAL_OMEGACONF_211_CHECKPOINT)))
    expected = {"train_file": ["a.json"], "lr": 1e-4, "res": 256, "flag": True, "none": None,
                "opt": {"opt": "adamW", "lr": 2e-5}}
    for trust in (False, True):
        loaded = checkpoints.load_checkpoint(path, trust=trust)
        assert loaded == {"config": expected, "epoch": 3}
        assert json.dumps(loaded["config"])  # plain JSON-serialisable tree
    assert had_omegaconf or "omegaconf" not in sys.modules
