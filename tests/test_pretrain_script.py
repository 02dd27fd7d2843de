"""End-to-end runs of ``Pretrain.py`` on a tiny demo dataset: a single process, two processes under
``torch.distributed.launch --use_env`` and ``torchrun``, a simulated two-node job, resuming (also from
a checkpoint in the original format), and refusing checkpoints with pickled code.

Every run trains the demo model on 16 images with 4 images per process and step, for one epoch
(resumed runs: the second of two), on the CPU with one thread per process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.checkpoint import load_checkpoint
from engine.consistency import ReplicaMismatchError, check_replicas_agree, state_fingerprint
from tests.script_helpers import free_port, script_env
from tests.test_utils import _fake_dictconfig, _install_fake_omegaconf

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RUN_TIMEOUT = 300

CHECKPOINT_KEYS = ["model", "optimizer", "lr_scheduler", "config", "epoch"]
RESUME_KEYS = {"rng_states", "world_size", "sampler"}
LOG_KEYS = ["train_lr", "train_loss_mlm", "train_loss_ita", "train_loss_itm", "train_loss_mim",
            "train_loss_pseudo", "epoch"]
# the scheduler state as the original (timm 0.5) CosineLRScheduler wrote it, in its order
SCHEDULER_KEYS = ["param_group_field", "_initial_param_group_field", "base_values", "metric", "noise_range_t",
                  "noise_pct", "noise_type", "noise_std", "noise_seed", "t_initial", "t_mul", "lr_min",
                  "decay_rate", "cycle_limit", "warmup_t", "warmup_lr_init", "warmup_prefix", "t_in_epochs",
                  "warmup_steps"]

BATCH_SIZE = 4
NUM_IMAGES = 16
# Pretrain_demo.yaml: lr 5e-4, min_lr 1e-5, warmup_lr 1e-4, warmup_epochs 1
BASE_LR, MIN_LR, WARMUP_LR, WARMUP_EPOCHS = 5e-4, 1e-5, 1e-4, 1
# learning rates of 0 everywhere: the trained weights stay exactly those loaded from --checkpoint
FROZEN = ("optimizer.lr=0", "schedular.lr=0", "schedular.min_lr=0", "schedular.warmup_lr=0")

TRAIN_LINE = re.compile(r"^Train Epoch: \[(\d+)\]\s+\[\s*\d+/\d+\].*?\blr: ([0-9.]+)", re.MULTILINE)
FINGERPRINT_LINE = re.compile(r"^Model state fingerprint: ([0-9a-f]{64})(.*)$", re.MULTILINE)


# --- running the script -------------------------------------------------------------------------------


def torchrun() -> list[str]:
    exe = Path(PYTHON).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [PYTHON, "-m", "torch.distributed.run"]


def script(data: dict[str, str], output_dir: Path, epochs: int, *flags: str,
           overrides: Sequence[str] = ()) -> list[str]:
    return ["Pretrain.py", "--config", "configs/Pretrain_demo.yaml", "--output_dir", str(output_dir),
            "--text_encoder", "configs/demo_vocab.txt", "--device", "cpu", "--num_workers", "0", *flags,
            "--overrides", f"schedular.epochs={epochs}", f"batch_size={BATCH_SIZE}", "queue_size=16",
            f"train_file=[{data['pretrain']}]", f"image_tokenizer_path={data['dvae']}", *overrides]


def launcher(name: str, port: int) -> list[str]:
    if name == "single":
        return [PYTHON]
    if name == "launch":
        return [PYTHON, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={port}",
                "--use_env"]
    if name == "torchrun":
        return [*torchrun(), "--nproc_per_node=2", f"--master_port={port}"]
    raise ValueError(name)


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} did not finish in {timeout} s:\n{output[-6000:]}")
    return output


def _port_taken(output: str) -> bool:
    return "EADDRINUSE" in output or "ddress already in use" in output


def run(cmd_for_port: Callable[[int], list[str]], expect_success: bool = True) -> tuple[int, str]:
    """Run a command built for a free rendezvous port (retried once if the port was taken meanwhile)."""
    for attempt in range(2):
        proc = _start(cmd_for_port(free_port()))
        output = _finish(proc)
        if proc.returncode == 0 or not _port_taken(output) or attempt:
            break
    if expect_success and proc.returncode != 0:
        pytest.fail(f"{' '.join(proc.args)} exited with {proc.returncode}:\n{output[-6000:]}")
    return proc.returncode, output


def pretrain(how: str, data: dict[str, str], output_dir: Path, epochs: int, *flags: str,
             overrides: Sequence[str] = (), expect_success: bool = True) -> tuple[int, str]:
    return run(lambda port: [*launcher(how, port), *script(data, output_dir, epochs, *flags, overrides=overrides)],
               expect_success=expect_success)


# --- reading what a run wrote ---------------------------------------------------------------------------


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def check_log_line(line: dict, epoch: int) -> None:
    assert list(line) == LOG_KEYS
    assert line["epoch"] == epoch and type(line["epoch"]) is int
    for key in LOG_KEYS[:-1]:
        assert isinstance(line[key], str) and re.fullmatch(r"-?\d+\.\d{3}", line[key]), (key, line[key])


def check_checkpoint(path: Path, epoch: int, epochs: int) -> dict:
    checkpoint = load_checkpoint(path)
    # the original layout first, then what exact resume needs
    assert list(checkpoint)[:5] == CHECKPOINT_KEYS
    assert set(checkpoint) - set(CHECKPOINT_KEYS) == RESUME_KEYS
    assert checkpoint["epoch"] == epoch
    config = checkpoint["config"]
    assert type(config) is dict and type(config["schedular"]) is dict
    assert config["schedular"]["epochs"] == epochs and config["batch_size"] == BATCH_SIZE
    assert list(checkpoint["lr_scheduler"]) == SCHEDULER_KEYS
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["model"].values())
    return checkpoint


def printed_lrs(output: str) -> dict[int, set[str]]:
    """Learning rates printed in the progress lines, by epoch."""
    lrs: dict[int, set[str]] = {}
    for epoch, lr in TRAIN_LINE.findall(output):
        lrs.setdefault(int(epoch), set()).add(lr)
    return lrs


def printed_fingerprint(output: str, processes: int) -> str:
    found = FINGERPRINT_LINE.findall(output)
    assert len(found) == 1, output[-3000:]
    fingerprint, agreement = found[0]
    assert agreement == (f" (identical on all {processes} processes)" if processes > 1 else "")
    return fingerprint


def adam_steps(checkpoint: dict) -> set[int]:
    return {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}


def trained_entries(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Entries changed only by the optimizer (not the momentum models, not the queues)."""
    return [k for k in state_dict if "_m." not in k and "queue" not in k]


def cosine_lr(epoch: int, epochs: int) -> float:
    """The LR of epoch >= 1 for a scheduler built for ``epochs``: the script steps it to
    ``epoch + warmup_epochs``, i.e. ``epoch`` epochs into its single cosine cycle, after which it
    stays at ``min_lr``."""
    if epoch >= epochs:
        return MIN_LR
    return MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * epoch / epochs))


def check_first_epoch(output_dir: Path, output: str, processes: int) -> dict:
    """The files and console output of a one-epoch run; returns its checkpoint."""
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint_00.pth", "config.yaml", "log.txt"]
    assert "queue_size: 16" in (output_dir / "config.yaml").read_text()
    log = read_log(output_dir)
    assert len(log) == 1
    check_log_line(log[0], 0)
    checkpoint = check_checkpoint(output_dir / "checkpoint_00.pth", epoch=0, epochs=1)
    assert adam_steps(checkpoint) == {NUM_IMAGES // (BATCH_SIZE * processes)}
    # warm-up: iteration 0 runs at warmup_lr, and 100 iterations per warm-up step are never reached
    assert printed_lrs(output) == {0: {f"{WARMUP_LR:.6f}"}}
    assert printed_fingerprint(output, processes) == state_fingerprint(checkpoint["model"])
    return checkpoint


def check_resumed_epoch(output_dir: Path, output: str, processes: int, first: dict, expected_lr: float,
                        epochs: int = 2) -> dict:
    """A run resumed from ``first`` (epoch 0) that must train epoch 1 only."""
    assert "Train Epoch: [0]" not in output
    assert printed_lrs(output) == {1: {f"{expected_lr:.6f}"}}
    log = read_log(output_dir)
    assert [line["epoch"] for line in log] == list(range(len(log) - 1)) + [1]
    check_log_line(log[-1], 1)
    checkpoint = check_checkpoint(output_dir / "checkpoint_01.pth", epoch=1, epochs=epochs)
    # the optimizer state went on from the loaded one
    assert adam_steps(checkpoint) == {2 * s for s in adam_steps(first)}
    assert printed_fingerprint(output, processes) == state_fingerprint(checkpoint["model"])
    return checkpoint


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_run(small_demo_data, tmp_path_factory) -> tuple[Path, str]:
    """One epoch in a single process: ``(output_dir, console output)``; tests must not modify it."""
    output_dir = tmp_path_factory.mktemp("single")
    _, output = pretrain("single", small_demo_data, output_dir, 1)
    return output_dir, output


@pytest.fixture(scope="module")
def two_process_run(small_demo_data, tmp_path_factory) -> Callable[[str], tuple[Path, str]]:
    """One epoch with two processes under a launcher, run once per launcher."""
    runs: dict[str, tuple[Path, str]] = {}

    def get(how: str) -> tuple[Path, str]:
        if how not in runs:
            output_dir = tmp_path_factory.mktemp(how)
            _, output = pretrain(how, small_demo_data, output_dir, 1)
            runs[how] = (output_dir, output)
        return runs[how]

    return get


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# --- tests ------------------------------------------------------------------------------------------


def test_single_process_epoch_then_resume(single_run, small_demo_data, tmp_path):
    output_dir, output = single_run
    assert "Not using distributed mode" in output
    first = check_first_epoch(output_dir, output, processes=1)
    assert first["config"]["train_file"] == [small_demo_data["pretrain"]]

    resumed = copy_run(output_dir, tmp_path / "resumed")
    before = (resumed / "checkpoint_00.pth").read_bytes()
    _, output = pretrain("single", small_demo_data, resumed, 2, "--resume", "true", "--checkpoint",
                         str(resumed / "checkpoint_00.pth"))
    # The loaded scheduler state is the one saved by the one-epoch run (a single cycle of one epoch),
    # so epoch 1 runs at min_lr; a fresh two-epoch scheduler would give the mid-cosine value.
    assert cosine_lr(1, 2) != cosine_lr(1, 1) == MIN_LR
    check_resumed_epoch(resumed, output, 1, first, expected_lr=cosine_lr(1, 1))
    assert (resumed / "checkpoint_00.pth").read_bytes() == before
    assert len(read_log(resumed)) == 2


def test_step_in_backward_trains_the_same_weights(single_run, small_demo_data, tmp_path):
    """--step_in_backward applies each update during backward: bitwise the same training, same files."""
    _, output = single_run
    output_dir = tmp_path / "in_backward"
    _, in_backward = pretrain("single", small_demo_data, output_dir, 1, "--step_in_backward")
    check_first_epoch(output_dir, in_backward, processes=1)
    assert printed_fingerprint(in_backward, 1) == printed_fingerprint(output, 1)


def test_step_in_backward_refuses_several_processes(small_demo_data, tmp_path):
    code, output = pretrain("torchrun", small_demo_data, tmp_path / "refused", 1, "--step_in_backward",
                            expect_success=False)
    assert code != 0
    assert "--step_in_backward needs a single process" in output


@pytest.mark.parametrize("how", ["launch", "torchrun"])
def test_two_processes_epoch_then_resume(how, two_process_run, small_demo_data, tmp_path):
    output_dir, output = two_process_run(how)
    assert "| distributed init (rank 0): env://" in output
    assert "| distributed init (rank 1): env://" in output
    first = check_first_epoch(output_dir, output, processes=2)  # one log line: rank 1 writes nothing
    # both launchers give the same processes, hence bitwise the same training
    if how != "torchrun":
        _, torchrun_output = two_process_run("torchrun")
        assert printed_fingerprint(torchrun_output, 2) == printed_fingerprint(output, 2)

    resumed = copy_run(output_dir, tmp_path / "resumed")
    _, output = pretrain(how, small_demo_data, resumed, 2, "--resume", "true", "--checkpoint",
                         str(resumed / "checkpoint_00.pth"))
    check_resumed_epoch(resumed, output, 2, first, expected_lr=cosine_lr(1, 1))
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint_00.pth", "checkpoint_01.pth",
                                                         "config.yaml", "log.txt"]


def test_simulated_two_node_run(two_process_run, small_demo_data, tmp_path):
    """Two torchrun "nodes" of one process each: global ranks 0 and 1, local rank 0 on both."""
    output_dir = tmp_path / "two_nodes"
    for attempt in range(2):
        port = free_port()
        nodes = [_start([*torchrun(), "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                         "--master_addr=127.0.0.1", f"--master_port={port}",
                         *script(small_demo_data, output_dir, 1)])
                 for rank in (0, 1)]
        outputs = [_finish(node) for node in nodes]
        if all(node.returncode == 0 for node in nodes) or attempt or not any(map(_port_taken, outputs)):
            break
        shutil.rmtree(output_dir, ignore_errors=True)
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    assert "| distributed init (rank 0): env://" in outputs[0]
    assert "| distributed init (rank 1): env://" in outputs[1]
    assert "Start training" not in outputs[1]  # global rank 1 is silenced
    check_first_epoch(output_dir, outputs[0], processes=2)
    # Sharding and seeding follow the global rank: the result is bitwise that of one node with two
    # processes (had node 1 used its local rank 0, both would have trained on the same shard).
    _, one_node_output = two_process_run("torchrun")
    assert printed_fingerprint(outputs[0], 2) == printed_fingerprint(one_node_output, 2)


def _original_format_checkpoint(checkpoint: dict, path: Path, monkeypatch, t_initial: int) -> dict:
    """Write ``checkpoint`` as the original Pretrain.py did: the config a pickled OmegaConf DictConfig
    and the scheduler state in the timm 0.5 attribute layout (here for ``t_initial`` epochs)."""
    groups = len(checkpoint["optimizer"]["param_groups"])
    scheduler_state = {
        "param_group_field": "lr", "_initial_param_group_field": "initial_lr", "base_values": [BASE_LR] * groups,
        "metric": None, "noise_range_t": None, "noise_pct": 0.67, "noise_type": "normal", "noise_std": 1.0,
        "noise_seed": 42, "t_initial": t_initial, "t_mul": 1.0, "lr_min": MIN_LR, "decay_rate": 1,
        "cycle_limit": 1, "warmup_t": WARMUP_EPOCHS, "warmup_lr_init": WARMUP_LR, "warmup_prefix": True,
        "t_in_epochs": True, "warmup_steps": [(BASE_LR - WARMUP_LR) / WARMUP_EPOCHS] * groups,
    }
    assert list(scheduler_state) == SCHEDULER_KEYS
    classes = _install_fake_omegaconf(monkeypatch)
    state = {"model": checkpoint["model"], "optimizer": checkpoint["optimizer"], "lr_scheduler": scheduler_state,
             "config": _fake_dictconfig(classes, checkpoint["config"]), "epoch": checkpoint["epoch"]}
    torch.save(state, path)
    monkeypatch.undo()
    assert "omegaconf.dictconfig.DictConfig" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return scheduler_state


def test_resume_from_original_format_checkpoint(single_run, small_demo_data, tmp_path, monkeypatch):
    first = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    original = tmp_path / "original.pth"
    scheduler_state = _original_format_checkpoint(first, original, monkeypatch, t_initial=4)
    assert load_checkpoint(original)["config"] == first["config"]

    output_dir = tmp_path / "resumed"
    _, output = pretrain("single", small_demo_data, output_dir, 2, "--resume", "1", "--checkpoint",
                         str(original))
    # the LR of epoch 1 follows the loaded four-epoch schedule, not a fresh two-epoch one
    assert f"{cosine_lr(1, 4):.6f}" not in (f"{cosine_lr(1, 2):.6f}", f"{cosine_lr(1, 1):.6f}")
    checkpoint = check_resumed_epoch(output_dir, output, 1, first, expected_lr=cosine_lr(1, 4))
    assert [line["epoch"] for line in read_log(output_dir)] == [1]
    assert not (output_dir / "checkpoint_00.pth").exists()
    assert checkpoint["lr_scheduler"]["t_initial"] == 4
    assert checkpoint["lr_scheduler"]["base_values"] == scheduler_state["base_values"]


def test_weights_only_start_from_original_format_checkpoint(single_run, small_demo_data, tmp_path,
                                                            monkeypatch):
    first = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    original = tmp_path / "original.pth"
    _original_format_checkpoint(first, original, monkeypatch, t_initial=4)
    output_dir = tmp_path / "finetuned"
    _, output = pretrain("single", small_demo_data, output_dir, 1, "--checkpoint", str(original),
                         overrides=FROZEN)
    assert f"load checkpoint from {original}" in output
    assert "Train Epoch: [0]" in output
    checkpoint = check_checkpoint(output_dir / "checkpoint_00.pth", epoch=0, epochs=1)
    # a fresh optimizer, and with a zero LR the weights are exactly those of the file
    assert adam_steps(checkpoint) == adam_steps(first)
    keys = trained_entries(first["model"])
    assert len(keys) > 100
    for key in keys:
        assert torch.equal(checkpoint["model"][key], first["model"][key]), key


def test_incomplete_checkpoint_is_refused(single_run, small_demo_data, tmp_path):
    first = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    model = dict(first["model"])
    del model["visual_encoder.cls_token"]
    incomplete = tmp_path / "incomplete.pth"
    torch.save({**first, "model": model}, incomplete)
    returncode, output = pretrain("single", small_demo_data, tmp_path / "out", 1, "--checkpoint",
                                  str(incomplete), expect_success=False)
    assert returncode != 0
    assert "does not fit the model" in output and "visual_encoder.cls_token" in output


class _Payload:
    """Unpickling this object runs ``function(argument)``."""

    def __init__(self, function: Callable, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("kind", ["exec", "system"])
def test_checkpoint_with_pickled_code_is_refused(kind, single_run, small_demo_data, tmp_path):
    marker = tmp_path / "marker.txt"
    if kind == "exec":
        payload, name = _Payload(exec, f"open({str(marker)!r}, 'w').write('ran')"), "builtins.exec"
        flags = ["--checkpoint"]
    else:
        payload, name = _Payload(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"
        flags = ["--resume", "true", "--checkpoint"]
    checkpoint = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    planted = tmp_path / "planted.pth"
    torch.save({**checkpoint, "config": payload}, planted)

    output_dir = tmp_path / "out"
    returncode, output = pretrain("single", small_demo_data, output_dir, 1, *flags, str(planted),
                                  expect_success=False)
    assert returncode != 0
    assert "UnsafeCheckpointError" in output and name in output and "--trust_checkpoint" in output
    assert not marker.exists()
    assert not (output_dir / "checkpoint_00.pth").exists()


def test_resume_false_loads_weights_and_starts_at_epoch_0(single_run, small_demo_data, tmp_path):
    first = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    output_dir = tmp_path / "out"
    _, output = pretrain("single", small_demo_data, output_dir, 1, "--resume", "false", "--checkpoint",
                         str(single_run[0] / "checkpoint_00.pth"), overrides=FROZEN)
    assert "Train Epoch: [0]" in output and "Train Epoch: [1]" not in output
    assert [line["epoch"] for line in read_log(output_dir)] == [0]
    checkpoint = check_checkpoint(output_dir / "checkpoint_00.pth", epoch=0, epochs=1)
    assert adam_steps(checkpoint) == adam_steps(first)  # the optimizer state was not restored
    for key in trained_entries(first["model"]):
        assert torch.equal(checkpoint["model"][key], first["model"][key]), key


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), ("1", True), ("0", False),
                                                 ("True", True), ("False", False), ("yes", True), ("no", False)])
def test_boolean_flags(value, expected):
    import Pretrain

    args = Pretrain.get_parser().parse_args(["--resume", value, "--distributed", value])
    assert args.resume is expected and args.distributed is expected


def test_boolean_flags_reject_other_values(capsys):
    import Pretrain

    with pytest.raises(SystemExit):
        Pretrain.get_parser().parse_args(["--resume", "maybe"])
    assert "invalid boolean value 'maybe'" in capsys.readouterr().err


# --- the replica check itself -------------------------------------------------------------------------


def _replica_worker(rank: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        results = []
        for perturb in (False, True):
            if perturb and rank == 1:
                with torch.no_grad():  # the smallest possible change of one value
                    model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(1.0))
            try:
                results.append("ok " + check_replicas_agree(model))
            except ReplicaMismatchError as exc:
                results.append(f"error {exc}")
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_replica_check_detects_any_difference(tmp_path):
    mp.spawn(_replica_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    torch.manual_seed(0)
    expected = state_fingerprint(torch.nn.Linear(4, 3).state_dict())
    for same, different in results:  # every rank reaches the same verdict
        assert same == f"ok {expected}"
        assert different.startswith("error ") and "rank(s) [1] disagree with rank 0" in different
