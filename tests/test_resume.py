"""Exact resume, verified saves and non-finite handling of the training engine.

In-process tests train a small model with dropout on randomly augmented data through the real
``train_one_epoch`` / ``TrainingCheckpointer`` / ``create_train_loader`` path and check that a run
interrupted after any step and resumed ends bit-for-bit where an uninterrupted run ends. The script
tests kill ``Pretrain.py`` and ``Retrieval.py`` right after a mid-epoch save and resume them.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from dataset.collate import SafeCollate
from dataset.resumable import ResumableSampler, create_train_loader, sample_seed
from engine.checkpoint import (
    CheckpointWriteError,
    NonFiniteWeightsError,
    ResumePoint,
    TrainingCheckpointer,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint_file,
)
from engine.loop import EpochSettings, NonFiniteLossError, train_one_epoch
from optim import create_optimizer
from scheduler import create_scheduler, epoch_start_step
from tests.script_helpers import script_env
from utils import seed_everything

REPO = Path(__file__).resolve().parents[1]

# --- data order --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples,replicas", [(10, 1), (10, 3), (7, 2), (16, 4)])
def test_sampler_order_matches_distributed_sampler(num_samples, replicas):
    for epoch in (0, 3):
        for rank in range(replicas):
            reference = DistributedSampler(range(num_samples), num_replicas=replicas, rank=rank, shuffle=True,
                                           seed=5)
            reference.set_epoch(epoch)
            ours = ResumableSampler(num_samples, num_replicas=replicas, rank=rank, shuffle=True, seed=5)
            ours.set_epoch(epoch)
            assert [index for index, _ in ours] == list(reference)
            assert len(ours) == len(reference)


def test_sampler_starts_part_way_once():
    sampler = ResumableSampler(12, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.start_at(5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # only the next iteration is shortened
    assert len(sampler) == 12
    with pytest.raises(ValueError, match="cannot start at sample 13"):
        sampler.start_at(13)


def test_sample_seeds_depend_on_seed_epoch_and_position_only():
    seeds = {sample_seed(0, epoch, position) for epoch in range(3) for position in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(7, 1, 2) == sample_seed(7, 1, 2) != sample_seed(8, 1, 2)


class NoisyImages(Dataset):
    """Samples drawn from all three global generators, like random augmentations are."""

    def __init__(self, size: int = 24, missing: tuple[int, ...] = ()) -> None:
        self.size = size
        self.missing = set(missing)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if index in self.missing:
            return None
        noise = torch.rand(4) + float(np.random.rand()) + random.random()
        return torch.full((4,), float(index)) + noise, torch.tensor(index % 3)


def test_seeded_samples_do_not_depend_on_workers_or_disturb_the_caller():
    seed_everything(3)
    outputs = []
    for workers in (0, 2):
        loader, sampler = create_train_loader(NoisyImages(), 4, workers, None, seed=11)
        sampler.set_epoch(1)
        before = capture_rng_state()
        batches = [batch[0] for batch in loader]
        after = capture_rng_state()
        assert torch.equal(before["torch"], after["torch"])
        assert before["python"] == after["python"]
        outputs.append(torch.cat(batches))
    assert torch.equal(outputs[0], outputs[1])


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    seed_everything(0)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    save_checkpoint({"rng": state}, tmp_path / "rng.pth")
    seed_everything(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# --- exact resume in process ----------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class QueueModel(torch.nn.Module):
    """Dropout, a buffer updated in the forward pass, and an optional NaN at chosen steps."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
        self.register_buffer("queue", torch.zeros(8, 3))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.nan_at: set[int] = set()
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.nan_at:
            x = x * float("nan")  # poisons the queue too, as a broken input would
        logits = self.net(x)
        with torch.no_grad():
            ptr = int(self.queue_ptr)
            self.queue[ptr:ptr + 1] = logits[:1].detach()
            self.queue_ptr[0] = (ptr + 1) % self.queue.shape[0]
        return torch.nn.functional.cross_entropy(logits + self.queue.mean(), y)


OPTIMIZER = {"opt": "adamW", "lr": 1e-2, "weight_decay": 0.02}
SCHEDULE = {"sched": "cosine", "lr": 1e-2, "epochs": 3, "min_lr": 1e-4, "decay_rate": 1, "warmup_lr": 1e-3,
            "warmup_epochs": 1, "cooldown_epochs": 0}


def train(output_dir: Path, epochs: int = 3, stop_after: tuple[int, int] | None = None,
          resume_from: Path | None = None, save_every: int = 1, missing: tuple[int, ...] = ()) -> QueueModel:
    """One run of the engine (as the scripts drive it); ``stop_after=(epoch, next_step)`` interrupts right
    after that mid-epoch checkpoint is written."""
    seed_everything(42)
    dataset = NoisyImages(missing=missing)
    loader, sampler = create_train_loader(dataset, 4, 0, SafeCollate(), seed=42)
    model = QueueModel()
    optimizer = create_optimizer(OPTIMIZER, model)
    scheduler, _ = create_scheduler(SCHEDULE, optimizer)
    checkpointer = TrainingCheckpointer(str(output_dir), model, optimizer, scheduler, {"seed": 42}, None, sampler, 4)
    point = ResumePoint()
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from)
        point = checkpointer.restore(checkpoint, str(resume_from), len(loader))
        model.load_state_dict(checkpoint["model"])
    settings = EpochSettings(loss_names=("loss",), warmup_epochs=1, step_size=2, print_freq=100,
                             counted_batches=True, save_every_steps=save_every)

    def save_step(epoch: int, next_step: int) -> None:
        checkpointer.save_last(epoch, next_step)
        if stop_after == (epoch, next_step):
            raise Interrupted

    checkpointer.start(point)
    for epoch in range(point.epoch, epochs):
        start = point.step if epoch == point.epoch else 0
        if start == 0:
            epoch_start_step(scheduler, epoch, 1)
        train_one_epoch(model, loader, optimizer, scheduler, epoch, torch.device("cpu"),
                        lambda batch, i, n: {"loss": model(*batch)}, settings, sampler=sampler, start_step=start,
                        save_step=lambda next_step, e=epoch: save_step(e, next_step))
        checkpointer.finish_epoch(epoch, str(output_dir / f"checkpoint_{epoch:02d}.pth"), keep_last=True)
    return model


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("stop_after", [(0, 1), (0, 4), (1, 3), (2, 5)])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, stop_after):
    reference = train(tmp_path / "reference")
    with pytest.raises(Interrupted):
        train(tmp_path / "run", stop_after=stop_after)
    last = tmp_path / "run" / "checkpoint_last.pth"
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["next_step"]) == stop_after
    resumed = train(tmp_path / "run", resume_from=last)
    assert same_state(resumed, reference)
    # the optimizer moments too
    final_ref = load_checkpoint(tmp_path / "reference" / "checkpoint_02.pth")
    final_run = load_checkpoint(tmp_path / "run" / "checkpoint_02.pth")
    for ref_state, run_state in zip(final_ref["optimizer"]["state"].values(),
                                    final_run["optimizer"]["state"].values()):
        assert all(torch.equal(ref_state[k], run_state[k]) for k in ref_state)


def test_resume_from_an_epoch_checkpoint_is_exact(tmp_path):
    reference = train(tmp_path / "reference")
    resumed = train(tmp_path / "reference", resume_from=tmp_path / "reference" / "checkpoint_00.pth")
    assert same_state(resumed, reference)


def test_resume_is_exact_with_unreadable_samples(tmp_path):
    reference = train(tmp_path / "reference", missing=(1, 5, 6))
    with pytest.raises(Interrupted):
        train(tmp_path / "run", stop_after=(1, 2), missing=(1, 5, 6))
    resumed = train(tmp_path / "run", resume_from=tmp_path / "run" / "checkpoint_last.pth", missing=(1, 5, 6))
    assert same_state(resumed, reference)


# --- non-finite losses and weights ----------------------------------------------------------------------


def run_epoch(model: QueueModel, skip: bool, print_freq: int = 100) -> dict:
    loader, sampler = create_train_loader(NoisyImages(), 4, 0, None, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler, _ = create_scheduler(SCHEDULE, optimizer)
    settings = EpochSettings(loss_names=("loss",), print_freq=print_freq, skip_nonfinite=skip)
    return train_one_epoch(model, loader, optimizer, scheduler, 1, torch.device("cpu"),
                           lambda batch, i, n: {"loss": model(*batch)}, settings, sampler=sampler)


def test_nonfinite_loss_stops_with_step_and_components():
    model = QueueModel()
    model.nan_at = {3}
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 2.*loss=nan; also at iterations 3, 4, 5; "
                                                 r"--skip_nonfinite"):
        run_epoch(model, skip=False)
    # the losses are read at progress lines (iterations 0 and 5 of 6), not at every step
    assert model.calls == 6


def test_losses_read_at_progress_lines_reach_every_meter(capsys):
    stats = {}
    for print_freq in (1, 4, 100):
        torch.manual_seed(0)
        stats[print_freq] = run_epoch(QueueModel(), skip=False, print_freq=print_freq)
    assert stats[1] == stats[4] == stats[100]
    # a progress line shows the step's own loss (the window's median), not the previous one
    lines = [line for line in capsys.readouterr().out.splitlines() if "[5/6]" in line]
    assert len({line.split("loss: ")[1].split()[0] for line in lines}) == 1


def test_nonfinite_loss_skipped_and_counted(capsys):
    model = QueueModel()
    model.nan_at = {2, 4}
    stats = run_epoch(model, skip=True)
    assert stats["skipped_steps"] == 2
    assert "non-finite loss at epoch 1, iteration 1" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # what the skipped steps put in the queue was taken out again
    assert torch.isfinite(model.queue).all()
    assert float(stats["loss"]) == float(stats["loss"])


def test_nonfinite_weights_are_never_saved(tmp_path):
    model = QueueModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler, _ = create_scheduler(SCHEDULE, optimizer)
    checkpointer = TrainingCheckpointer(str(tmp_path), model, optimizer, scheduler, {})
    checkpointer.save_last(0, 1)
    before = (tmp_path / "checkpoint_last.pth").read_bytes()
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"net\.0\.weight"):
        checkpointer.save_last(0, 2)
    assert (tmp_path / "checkpoint_last.pth").read_bytes() == before


# --- atomic, verified saves ------------------------------------------------------------------------------


def test_failed_write_keeps_previous_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_corrupt_write_is_caught_before_replacing(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def flipping_save(obj, handle, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = bytearray(buffer.getvalue())
        data[len(data) // 3] ^= 0xFF  # a flipped byte inside the tensor data
        handle.write(bytes(data))

    monkeypatch.setattr(torch, "save", flipping_save)
    with pytest.raises(CheckpointWriteError, match="does not read back intact"):
        save_checkpoint({"w": torch.arange(1000.0)}, path)
    assert path.read_bytes() == before


def test_partial_files_of_killed_saves_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.pth.{dead.stdout.strip()}.abcd1234.tmp"
    stale.write_bytes(b"PK partial")
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "checkpoint.pth")
    assert not stale.exists()


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "checkpoint_03.pth"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=re.escape(str(path))):
        load_checkpoint(path)
    with pytest.raises(CheckpointWriteError, match=re.escape(str(path))):
        verify_checkpoint_file(str(path))


@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_cut_anywhere_is_reported_as_damaged_not_unsafe(tmp_path, legacy):
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1, "config": {"a": [1, 2]}}, buffer,
               _use_new_zipfile_serialization=not legacy)
    data = buffer.getvalue()
    path = tmp_path / "checkpoint.pth"
    for cut in range(0, len(data), 1 if legacy else 7):
        path.write_bytes(data[:cut])
        with pytest.raises(RuntimeError, match=re.escape(str(path))) as info:
            load_checkpoint(path)
        assert not isinstance(info.value, pickle.UnpicklingError), (cut, info.value)


# --- scripts: killed right after a mid-epoch save, then resumed --------------------------------------------

KILLER = textwrap.dedent("""
    import os, runpy, sys
    sys.path.insert(0, os.getcwd())
    import engine.checkpoint as checkpoints

    target = (int(os.environ["KILL_EPOCH"]), int(os.environ["KILL_STEP"]))
    original = checkpoints.TrainingCheckpointer.save_last

    def save_last(self, epoch, next_step=None, **extra):
        original(self, epoch, next_step, **extra)
        if (epoch, next_step) == target:
            os._exit(137)  # as abrupt as SIGKILL: no clean-up, no flushing

    checkpoints.TrainingCheckpointer.save_last = save_last
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def run_script(args: list[str], kill: tuple[int, int] | None = None, tmp_path: Path | None = None
               ) -> subprocess.CompletedProcess:
    env = script_env()
    if kill is not None:
        assert tmp_path is not None
        killer = tmp_path / "killer.py"
        killer.write_text(KILLER)
        env.update(KILL_EPOCH=str(kill[0]), KILL_STEP=str(kill[1]))
        args = [str(killer), *args]
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def final_state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


SCRIPT_CASES = {
    "pretrain": (["Pretrain.py", "--config", "configs/Pretrain_demo.yaml"],
                 lambda d: ["batch_size=4", "queue_size=16", f"train_file=[{d['pretrain']}]",
                            f"image_tokenizer_path={d['dvae']}"], "checkpoint_01.pth"),
    "retrieval": (["Retrieval.py", "--config", "configs/Retrieval_demo.yaml"],
                  lambda d: ["batch_size_train=4", "queue_size=16", f"train_file=[{d['re_train']}]",
                             f"val_file={d['re_val']}", f"test_file={d['re_test']}", f"image_root={d['image_root']}",
                             "batch_size_test=4", "k_test=2"],
                  "checkpoint_last.pth"),
}


@pytest.mark.parametrize("case", sorted(SCRIPT_CASES))
def test_script_killed_mid_epoch_resumes_exactly(case, small_demo_data, tmp_path):
    command, overrides, final = SCRIPT_CASES[case]
    common = ["--text_encoder", "configs/demo_vocab.txt", "--device", "cpu", "--num_workers", "0",
              "--save_every_steps", "1"]
    tail = ["--overrides", "schedular.epochs=2", *overrides(small_demo_data)]
    reference = run_script([*command, *common, "--output_dir", str(tmp_path / "reference"), *tail])
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    run_dir = tmp_path / "run"
    killed = run_script([*command, *common, "--output_dir", str(run_dir), *tail], kill=(1, 2), tmp_path=tmp_path)
    assert killed.returncode == 137, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoint_last.pth")["next_step"] == 2
    resumed = run_script([*command, *common, "--output_dir", str(run_dir), "--resume", "true", "--checkpoint",
                          str(run_dir / "checkpoint_last.pth"), *tail])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at epoch 1, batch 2" in resumed.stdout
    expected, got = final_state(tmp_path / "reference" / final), final_state(run_dir / final)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different[:5]
    if case == "pretrain":
        fingerprint = re.compile(r"Model state fingerprint: ([0-9a-f]+)")
        assert fingerprint.search(reference.stdout).group(1) == fingerprint.search(resumed.stdout).group(1)


def test_rolling_file_never_changes_an_epoch_file(tmp_path):
    # at the end of an epoch the rolling file is a link to the epoch file; later saves replace the link
    train(tmp_path, epochs=1)
    epoch_file = tmp_path / "checkpoint_00.pth"
    before = epoch_file.read_bytes()
    assert (tmp_path / "checkpoint_last.pth").read_bytes() == before
    train(tmp_path, epochs=2, resume_from=tmp_path / "checkpoint_last.pth")
    assert epoch_file.read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint_last.pth")["epoch"] == 1


# --- two processes: every process takes the same decision about a non-finite step ----------------------------


def _nonfinite_worker(rank: int, port: int, skip: bool | str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    try:
        torch.manual_seed(0)
        model = QueueModel()
        if rank == 1 and skip != "unreadable":
            model.nan_at = {2}  # only this process sees the broken batch
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        try:
            if skip == "unreadable":
                # every image of this process is unreadable: both processes skip every step
                before = torch.cat([p.detach().flatten() for p in model.parameters()])
                stats = run_epoch_on(ddp, model, False, missing=tuple(range(24)) if rank == 1 else ())
                after = torch.cat([p.detach().flatten() for p in model.parameters()])
                results[rank] = ("ok", stats.get("skipped_samples", 0), after - before)
                return
            stats = run_epoch_on(ddp, model, bool(skip))
            results[rank] = ("ok", stats.get("skipped_steps", 0),
                             torch.cat([p.detach().flatten() for p in model.parameters()]))
        except NonFiniteLossError as exc:
            results[rank] = ("error", str(exc), None)
    finally:
        dist.destroy_process_group()


def run_epoch_on(ddp: torch.nn.Module, model: QueueModel, skip: bool, missing: tuple[int, ...] = ()) -> dict:
    loader, sampler = create_train_loader(NoisyImages(missing=missing), 4, 0, SafeCollate(), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler, _ = create_scheduler(SCHEDULE, optimizer)
    settings = EpochSettings(loss_names=("loss",), print_freq=100, skip_nonfinite=skip, counted_batches=True)
    return train_one_epoch(ddp, loader, optimizer, scheduler, 1, torch.device("cpu"),
                           lambda batch, i, n: {"loss": ddp(*batch)}, settings, sampler=sampler)


@pytest.mark.parametrize("skip", [False, True, "unreadable"])
def test_processes_agree_on_skipped_steps(skip):
    import torch.multiprocessing as mp

    from tests.script_helpers import free_port

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_nonfinite_worker, args=(free_port(), skip, results), nprocs=2, join=True)
    if skip == "unreadable":
        # the count covers every process
        assert [results[r][:2] for r in (0, 1)] == [("ok", 24), ("ok", 24)]
        assert all(float(results[r][2].abs().max()) == 0.0 for r in (0, 1))
    elif skip:
        assert [results[r][:2] for r in (0, 1)] == [("ok", 1), ("ok", 1)]
        assert torch.equal(results[0][2], results[1][2]) and torch.isfinite(results[0][2]).all()
    else:
        assert [results[r][0] for r in (0, 1)] == ["error", "error"]
        assert all("epoch 1, iteration 1" in results[r][1] for r in (0, 1))
