"""Script options end to end: ``--amp bf16`` (CPU autocast) in pretraining and retrieval fine-tuning,
``--log_backend tensorboard`` read back from its event file, the unreadable-sample count in ``log.txt``,
and the error for an unusable ``--output_dir``."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.runtime import prepare_output_dir
from tests.script_helpers import script_env
from tests.test_pretrain_script import LOG_KEYS, PYTHON, REPO, pretrain, read_log
from tests.test_retrieval import check_metrics
from tests.test_retrieval import read_log as read_retrieval_log
from tests.test_retrieval import run_script as run_retrieval

LOSSES = [key[len("train_"):] for key in LOG_KEYS if key.startswith("train_loss")]


def check_finite_weights(path: Path) -> None:
    model = load_checkpoint(path)["model"]
    floats = {k: v for k, v in model.items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float32 for v in floats.values())
    assert all(bool(torch.isfinite(v).all()) for v in floats.values())


@pytest.fixture(scope="module")
def bf16_pretrain_run(small_demo_data, tmp_path_factory) -> tuple[Path, str, str]:
    """One bf16 epoch of Pretrain.py with TensorBoard logging, one training image being unreadable:
    ``(output_dir, console output, unreadable file)``."""
    folder = tmp_path_factory.mktemp("bf16_pretrain")
    broken = folder / "broken.png"
    broken.write_bytes(b"not an image")
    entries = json.loads(Path(small_demo_data["pretrain"]).read_text())
    entries[5]["image"] = str(broken)
    train_file = folder / "pretrain.json"
    train_file.write_text(json.dumps(entries))
    output_dir = folder / "out"
    _, output = pretrain("single", dict(small_demo_data, pretrain=str(train_file)), output_dir, 1,
                         "--amp", "bf16", "--log_backend", "tensorboard")
    return output_dir, output, str(broken)


def test_bf16_pretraining_logs_finite_losses_and_saves_a_checkpoint(bf16_pretrain_run):
    output_dir, _, _ = bf16_pretrain_run
    [line] = read_log(output_dir)
    assert list(line) == [*LOG_KEYS[:-1], "train_skipped_samples", "epoch"] and line["epoch"] == 0
    assert all(math.isfinite(float(line[f"train_{name}"])) for name in LOSSES)
    check_finite_weights(output_dir / "checkpoint_00.pth")


def test_unreadable_training_image_is_counted_in_log_txt(bf16_pretrain_run):
    output_dir, output, broken = bf16_pretrain_run
    assert read_log(output_dir)[0]["train_skipped_samples"] == 1
    assert f"cannot read image '{broken}'" in output


def test_tensorboard_event_file_holds_the_logged_step(bf16_pretrain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, output, _ = bf16_pretrain_run
    [event_file] = (output_dir / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted([*LOSSES, "lr", "grad_norm"])
    # one entry every 50 steps: step 0 only; its losses are those printed for iteration 0
    printed = re.search(r"^Train Epoch: \[0\]\s+\[0/\d+\].*$", output, re.MULTILINE).group(0)
    for name in LOSSES:
        [scalar] = events.Scalars(name)
        assert scalar.step == 0
        assert f"{name}: {scalar.value:.4f}" in printed, (name, scalar.value, printed)
    [lr] = events.Scalars("lr")
    assert lr.value == pytest.approx(1e-4)  # the warm-up start of Pretrain_demo.yaml
    [grad_norm] = events.Scalars("grad_norm")
    assert math.isfinite(grad_norm.value) and grad_norm.value > 0


def test_bf16_retrieval_finetuning(small_demo_data, tmp_path):
    output_dir = tmp_path / "bf16_retrieval"
    run_retrieval("Retrieval.py", small_demo_data, output_dir, "--amp", "bf16")
    [line], tail = read_retrieval_log(output_dir)
    assert all(math.isfinite(float(line[key])) for key in ("train_loss_ita", "train_loss_itm"))
    check_metrics(line, small_demo_data["re_test"])
    assert tail == "best epoch: 0"
    check_finite_weights(output_dir / "checkpoint_best.pth")


@pytest.mark.parametrize(("script", "where", "problem"), [
    ("Pretrain.py", "file", "exists and is not a folder"),
    ("Pretrain.py", "under_file", "cannot be created (Not a directory)"),
    ("VQA.py", "file", "exists and is not a folder"),
])
def test_unusable_output_dir_gives_a_one_line_error(script, where, problem, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    output_dir = existing if where == "file" else existing / "sub"
    proc = subprocess.run([PYTHON, script, "--output_dir", str(output_dir), "--device", "cpu"], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --output_dir {output_dir}: {problem}"
    assert existing.read_text() == "keep me"


def test_prepare_output_dir_creates_parents_and_refuses_unwritable_folders(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    prepare_output_dir(str(target))
    assert target.is_dir()
    monkeypatch.setattr("engine.runtime.os.access", lambda path, mode: False)
    with pytest.raises(SystemExit, match=re.escape(f"error: --output_dir {target}: is not writable")):
        prepare_output_dir(str(target))
