"""Atomic writes of checkpoints and of ``config.yaml``: what is fsynced, and in which order, and the clean-up
of temporary files left by killed writers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import torch

from configs import save_config
from engine.checkpoint import save_checkpoint


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple]:
    """Patch ``os.fsync`` and ``os.replace`` to log ``("fsync", inode, is_dir)`` and ``("replace", src, dst)``
    events (in call order) before doing the real work."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_checkpoint_save_fsyncs_the_file_before_the_rename_then_its_folder(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_00.pth"
    events = _record_fsyncs_and_renames(monkeypatch)
    save_checkpoint({"model": {"w": torch.arange(4.0)}, "epoch": 0}, target)
    monkeypatch.undo()

    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1 and replaces[0][2] == str(target)
    temporary = os.path.basename(replaces[0][1])
    assert temporary.startswith(f".checkpoint_00.pth.{os.getpid()}.") and temporary.endswith(".tmp")
    # a rename keeps the inode: the file fsynced is the one that became checkpoint_00.pth
    file_inode, dir_inode = target.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file_inode, False), replaces[0], ("fsync", dir_inode, True)]
    assert os.listdir(tmp_path) == ["checkpoint_00.pth"]


def test_config_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events = _record_fsyncs_and_renames(monkeypatch)
    path = save_config({"batch_size": 4}, tmp_path)
    monkeypatch.undo()
    assert path == os.path.join(tmp_path, "config.yaml")
    replaces = [e for e in events if e[0] == "replace"]
    assert events[0] == ("fsync", os.stat(path).st_ino, False) and events[1:] == replaces
    assert len(replaces) == 1 and replaces[0][2] == path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_config_write_removes_temporary_files_of_killed_writers(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".config.yaml.{dead}.0123abcd.tmp"
    alive = tmp_path / f".config.yaml.{os.getppid()}.0123abcd.tmp"  # a writer still running
    other = tmp_path / f".log.txt.{dead}.0123abcd.tmp"  # not a temporary file of config.yaml
    for path in (stale, alive, other):
        path.write_text("batch_si")
    save_config({"batch_size": 4}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "config.yaml"])
    assert "batch_size: 4" in (tmp_path / "config.yaml").read_text()
