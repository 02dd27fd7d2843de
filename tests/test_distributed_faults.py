"""A failing or hanging process of a multi-process run must not leave the others blocked in a collective.

Covers the process-group timeout (``--dist_timeout``) that ``engine.distributed.init_distributed_mode`` passes to
``init_process_group``, the NCCL error-handling setting, and ``engine.runtime.run_entry``: two gloo
processes (started directly with the launcher variables, and under torchrun) in which one rank raises
or hangs while its peer waits in an all-reduce, and a two-process ``Pretrain.py`` run whose rank 1
fails in its second training step.
"""

from __future__ import annotations

import argparse
import builtins
import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine import distributed
from engine.runtime import job_rank, run_entry
from tests.script_helpers import LAUNCHER_VARIABLES, free_port, script_env

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# seconds within which every process of a failed two-process run must have exited
BOUND = 60.0

# Two ranks: both join an all-reduce, then rank ``--fail_rank`` raises (or sleeps) while the other
# waits in a second all-reduce that can only finish with its help.
PROGRAM = textwrap.dedent('''
    import argparse
    import time

    import torch

    from engine.distributed import init_distributed_mode
    from engine.runtime import run_entry
    from utils import all_reduce_sum


    def main(args):
        init_distributed_mode(args)
        assert all_reduce_sum(torch.ones(1)).item() == 2
        if args.rank == args.fail_rank:
            if args.fault == "raise":
                raise RuntimeError(f"injected fault on rank {args.rank}")
            time.sleep(600)
        print(f"rank {args.rank} waits in all_reduce", flush=True, force=True)
        all_reduce_sum(torch.ones(1))
        print(f"rank {args.rank} finished", force=True)


    if __name__ == "__main__":
        parser = argparse.ArgumentParser()
        parser.add_argument("fault", choices=("raise", "hang"))
        parser.add_argument("--fail_rank", type=int, default=1)
        parser.add_argument("--dist_timeout", type=float, default=1800)
        args = parser.parse_args()
        args.device, args.dist_url = "cpu", "env://"
        run_entry(main, args)
''')

# Pretrain.py whose training step raises in the second iteration on rank 1 only.
PRETRAIN_WITH_FAULT = textwrap.dedent('''
    import os
    import sys

    import Pretrain
    from engine.runtime import run_entry
    from utils import get_rank

    make_step = Pretrain.make_step


    def make_failing_step(*args, **kwargs):
        step = make_step(*args, **kwargs)
        calls = 0

        def failing_step(*step_args, **step_kwargs):
            nonlocal calls
            calls += 1
            if get_rank() == 1 and calls == 2:
                raise RuntimeError("injected fault in training step 2")
            return step(*step_args, **step_kwargs)

        return failing_step


    Pretrain.make_step = make_failing_step
    sys.argv[0] = Pretrain.__file__
    cli_args = Pretrain.get_parser().parse_args()
    os.makedirs(cli_args.output_dir, exist_ok=True)
    run_entry(Pretrain.main, cli_args)
''')


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "two_ranks.py"
    path.write_text(PROGRAM)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = script_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def _wait(procs: list[subprocess.Popen], bound: float, until_exit: int | None = None) -> list[float | None]:
    """Seconds after which each process exited (None: still running after ``bound``), polling; with
    ``until_exit`` only process ``until_exit`` is waited for."""
    start = time.monotonic()
    exited: list[float | None] = [None] * len(procs)
    wanted = range(len(procs)) if until_exit is None else [until_exit]
    while time.monotonic() - start < bound:
        for index, proc in enumerate(procs):
            if exited[index] is None and proc.poll() is not None:
                exited[index] = time.monotonic() - start
        if all(exited[i] is not None for i in wanted):
            break
        time.sleep(0.05)
    return exited


def _outputs(procs: list[subprocess.Popen]) -> list[str]:
    for proc in procs:
        _kill(proc)
    return [proc.communicate()[0] for proc in procs]


def _port_taken(outputs: list[str]) -> bool:
    return any("EADDRINUSE" in out or "ddress already in use" in out for out in outputs)


def run_pair(cmd: list[str], bound: float = BOUND,
             until_exit: int | None = None) -> tuple[list[int | None], list[float | None], list[str]]:
    """Start ranks 0 and 1 of ``cmd`` with the launcher variables (a fresh port; retried once if it
    was taken meanwhile); return their exit statuses (None: killed after ``bound``), exit times and
    outputs."""
    for attempt in range(2):
        port = free_port()
        procs = [_popen(cmd, _rank_env(rank, port)) for rank in (0, 1)]
        try:
            exited = _wait(procs, bound, until_exit)
            statuses = [proc.poll() for proc in procs]
        finally:
            outputs = _outputs(procs)
        if not _port_taken(outputs) or attempt:
            return statuses, exited, outputs
    raise AssertionError("unreachable")


def _describe(outputs: list[str]) -> str:
    return "\n".join(f"--- rank {rank}:\n{out[-4000:]}" for rank, out in enumerate(outputs))


# --- init_distributed_mode: timeout and NCCL error handling -------------------------------------------


@pytest.fixture
def launcher_env(monkeypatch):
    """A two-process torchrun environment for rank 1 with a recording ``init_process_group``."""
    original_print = builtins.print
    for name in (*LAUNCHER_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    yield monkeypatch, calls
    builtins.print = original_print  # init_distributed_mode silences print on rank 1


@pytest.mark.parametrize(("given", "seconds"), [(None, 1800.0), (7.5, 7.5), (2, 2.0)])
def test_init_passes_the_timeout(launcher_env, given, seconds):
    _, calls = launcher_env
    args = argparse.Namespace(device="cpu", dist_url="env://")
    if given is not None:
        args.dist_timeout = given
    distributed.init_distributed_mode(args)
    assert len(calls) == 1
    assert calls[0]["timeout"] == datetime.timedelta(seconds=seconds)
    assert (calls[0]["backend"], calls[0]["rank"], calls[0]["world_size"]) == ("gloo", 1, 2)


@pytest.mark.parametrize("bad", [0, -5, float("inf"), float("nan"), "soon"])
def test_init_rejects_bad_timeouts(launcher_env, bad):
    _, calls = launcher_env
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=bad)
    with pytest.raises(ValueError, match="--dist_timeout"):
        distributed.init_distributed_mode(args)
    assert calls == []


def _nccl_setup(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)


def test_nccl_turns_on_async_error_handling(launcher_env):
    monkeypatch, calls = launcher_env
    _nccl_setup(monkeypatch)
    # empty counts as unset; monkeypatch restores the variables afterwards
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "")
    distributed.init_distributed_mode(argparse.Namespace(device="cuda", dist_url="env://", dist_timeout=30))
    assert calls[0]["backend"] == "nccl" and calls[0]["timeout"] == datetime.timedelta(seconds=30)
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_nccl_keeps_an_explicit_error_handling_setting(launcher_env):
    monkeypatch, _ = launcher_env
    _nccl_setup(monkeypatch)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    distributed.init_distributed_mode(argparse.Namespace(device="cuda", dist_url="env://"))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    with pytest.warns(RuntimeWarning, match="TORCH_NCCL_ASYNC_ERROR_HANDLING=0.*hang"):
        distributed.init_distributed_mode(argparse.Namespace(device="cuda", dist_url="env://"))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"


def test_gloo_leaves_nccl_settings_alone(launcher_env):
    monkeypatch, _ = launcher_env
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")
    distributed.init_distributed_mode(argparse.Namespace(device="cpu", dist_url="env://"))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == ""


# --- run_entry in one process -----------------------------------------------------------------------


def test_run_entry_single_process_propagates(monkeypatch):
    for name in (*LAUNCHER_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace()
    assert job_rank(args) is None
    seen: list[argparse.Namespace] = []
    run_entry(seen.append, args)
    assert seen == [args]

    def failing(_args):
        raise KeyError("no such image")

    with pytest.raises(KeyError, match="no such image"):
        run_entry(failing, args)

    def finishing(_args):
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_entry(finishing, args)


def test_job_rank_from_launcher_environment(monkeypatch):
    for name in (*LAUNCHER_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert job_rank(args) is None  # a one-process job
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert job_rank(args) == 3
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert job_rank(args) == 5


def test_run_entry_failure_before_the_process_group_names_the_rank(tmp_path):
    # a failure during set-up (no process group yet) still names the launcher's rank and exits 1
    script = tmp_path / "early.py"
    script.write_text(textwrap.dedent('''
        import argparse
        from engine.runtime import run_entry

        def main(args):
            raise FileNotFoundError("configs/missing.yaml")

        run_entry(main, argparse.Namespace())
    '''))
    env = _env(RANK="3", WORLD_SIZE="4")
    proc = subprocess.run([PYTHON, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 1
    assert "rank 3 failed: FileNotFoundError: configs/missing.yaml" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr


# --- two gloo processes -------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_rank", [1, 0])
def test_raising_rank_stops_both(program, fail_rank):
    # the timeout is far beyond the bound: the peer must fail because the connection closed
    statuses, exited, outputs = run_pair([PYTHON, str(program), "raise", "--fail_rank", str(fail_rank),
                                          "--dist_timeout", "600"])
    details = _describe(outputs)
    assert None not in exited, f"a process still ran after {BOUND} s:\n{details}"
    assert statuses[0] == 1 and statuses[1] == 1, details
    other = 1 - fail_rank
    assert f"rank {fail_rank} failed: RuntimeError: injected fault on rank {fail_rank}" in outputs[fail_rank]
    assert "Traceback (most recent call last)" in outputs[fail_rank]
    assert f"rank {other} failed: " in outputs[other], details
    assert f"rank {other} finished" not in outputs[other]


def test_hanging_rank_times_out(program):
    statuses, exited, outputs = run_pair([PYTHON, str(program), "hang", "--dist_timeout", "8"],
                                         until_exit=0)
    details = _describe(outputs)
    assert exited[0] is not None, f"rank 0 still waited after {BOUND} s:\n{details}"
    assert statuses[0] == 1, details
    assert "rank 0 waits in all_reduce" in outputs[0]
    assert "rank 0 failed: " in outputs[0] and "Timed out" in outputs[0], details
    assert exited[1] is None  # rank 1 slept on until the test killed it


def test_raising_rank_under_torchrun(program):
    torchrun = Path(PYTHON).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [PYTHON, "-m", "torch.distributed.run"]
    for attempt in range(2):
        cmd = [*launcher, "--nproc_per_node=2", f"--master_port={free_port()}", str(program), "raise",
               "--dist_timeout", "600"]
        proc = _popen(cmd, _env())
        exited = _wait([proc], BOUND)
        output = _outputs([proc])[0]
        if not _port_taken([output]) or attempt:
            break
    assert exited[0] is not None, f"torchrun still ran after {BOUND} s:\n{output[-6000:]}"
    assert proc.returncode != 0
    assert "rank 1 failed: RuntimeError: injected fault on rank 1" in output, output[-6000:]


# --- a real script ------------------------------------------------------------------------------------


def test_pretrain_rank_failure_stops_the_run(tmp_path, small_demo_data):
    wrapper = tmp_path / "pretrain_with_fault.py"
    wrapper.write_text(PRETRAIN_WITH_FAULT)
    data = small_demo_data
    cmd = [PYTHON, str(wrapper), "--config", "configs/Pretrain_demo.yaml", "--output_dir", str(tmp_path / "out"),
           "--text_encoder", "configs/demo_vocab.txt", "--device", "cpu", "--num_workers", "0",
           "--overrides", "schedular.epochs=1", "batch_size=4", "queue_size=16",
           f"train_file=[{data['pretrain']}]", f"image_tokenizer_path={data['dvae']}"]
    statuses, exited, outputs = run_pair(cmd, bound=4 * BOUND)
    details = _describe(outputs)
    assert None not in exited, f"a process still ran after {4 * BOUND} s:\n{details}"
    assert statuses == [1, 1], details
    assert "rank 1 failed: RuntimeError: injected fault in training step 2" in outputs[1], details
    assert "rank 0 failed: " in outputs[0], details
    # the default --dist_timeout is 30 minutes: rank 0 stopped because rank 1 went away, not by timing out
    assert exited[0] - exited[1] < BOUND, details
    assert not (tmp_path / "out" / "checkpoint_00.pth").exists()
