"""Pretraining runs that used to fail: a skipped non-finite step, batches with no masked token, a resumed
feature queue that the new batch does not fit, and repeatable multi-threaded runs (``--deterministic``).

Runs use the helpers and the tiny demo set of ``tests/test_pretrain_script.py`` (16 images, 4 per step).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.cli import base_parser
from engine.runtime import use_tf32
from models.bert import BertForMaskedLM, load_bert_config
from tests.script_helpers import script_env
from tests.test_pretrain_script import (
    PYTHON,
    REPO,
    RUN_TIMEOUT,
    _original_format_checkpoint,
    adam_steps,
    pretrain,
    printed_fingerprint,
    read_log,
    script,
    single_run,  # noqa: F401  (fixture)
)

STEPS = 4  # 16 images, 4 per step
NO_MASK = ("mlm_probability=0.0",)


def _tiny_mlm_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = load_bert_config("tests/data/parity/configs/tiny_config_bert.json")
    return BertForMaskedLM(config).eval()  # no dropout: two forwards give the same numbers


@pytest.mark.parametrize("every_position", [False, True])  # soft labels of the selected rows, or of all (B, L)
def test_mlm_loss_without_masked_tokens_is_zero_and_connected(every_position):
    model = _tiny_mlm_bert()
    ids = torch.randint(5, model.config.vocab_size, (2, 6))
    labels = torch.full_like(ids, -100)
    soft = torch.softmax(torch.randn(2, 6, model.config.vocab_size), -1) if every_position else \
        torch.zeros(0, model.config.vocab_size)
    loss = model(ids, labels=labels, soft_labels=soft, alpha=0.4, mode="text").loss
    assert loss.item() == 0.0 and not torch.signbit(loss)
    loss.backward()
    # every parameter the loss can reach gets a (zero) gradient: distributed hooks fire as on any step
    grads = {name: p.grad for name, p in model.named_parameters() if "crossattention" not in name}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())

    original = model(ids, labels=labels, soft_labels=soft, alpha=0.4, mode="text", nan_without_labels=True).loss
    assert torch.isnan(original)


def test_mlm_loss_with_masked_tokens_is_unchanged():
    model = _tiny_mlm_bert()
    ids = torch.randint(5, model.config.vocab_size, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4] = 7, 9
    soft = torch.softmax(torch.randn(2, model.config.vocab_size), dim=-1)
    zeroed = model(ids, labels=labels, soft_labels=soft, alpha=0.4, mode="text").loss
    plain = model(ids, labels=labels, soft_labels=soft, alpha=0.4, mode="text", nan_without_labels=True).loss
    assert torch.equal(zeroed, plain) and torch.isfinite(plain)
    # soft labels for every position, averaged over the labelled ones without indexing: the same loss
    every = torch.softmax(torch.randn(2, 6, model.config.vocab_size), dim=-1)
    every[0, 2], every[1, 4] = soft
    torch.testing.assert_close(model(ids, labels=labels, soft_labels=every, alpha=0.4, mode="text").loss, plain)


def test_batches_without_masked_tokens_train_and_are_counted(small_demo_data, tmp_path):
    output_dir = tmp_path / "no_mask"
    pretrain("single", small_demo_data, output_dir, 1, overrides=NO_MASK)
    (line,) = read_log(output_dir)
    assert line["train_loss_mlm"] == "0.000"
    assert line["train_mlm_empty_steps"] == STEPS
    checkpoint = load_checkpoint(output_dir / "checkpoint_00.pth")
    assert adam_steps(checkpoint) == {STEPS}
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_a_genuinely_non_finite_step(small_demo_data, tmp_path):
    """The original's NaN masked-LM loss on every step, through the real model: each step is skipped."""
    output_dir = tmp_path / "skipped"
    _, output = pretrain("single", small_demo_data, output_dir, 1, "--skip_nonfinite",
                         overrides=(*NO_MASK, "+mlm_empty_mask_nan=true"))
    assert output.count("warning: non-finite loss at epoch 0") == STEPS
    assert "loss_mlm=nan" in output
    (line,) = read_log(output_dir)
    assert line["train_skipped_steps"] == STEPS and line["train_mlm_empty_steps"] == STEPS
    checkpoint = load_checkpoint(output_dir / "checkpoint_00.pth")
    assert checkpoint["optimizer"]["state"] == {}  # no update was applied
    assert int(checkpoint["model"]["queue_ptr"]) == 0  # the enqueued features were taken back


def test_original_checkpoint_resumes_over_a_batch_without_masked_tokens(single_run, small_demo_data,  # noqa: F811
                                                                        tmp_path, monkeypatch):
    first = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    original = tmp_path / "original.pth"
    _original_format_checkpoint(first, original, monkeypatch, t_initial=2)
    output_dir = tmp_path / "resumed"
    # a low masking rate: with this seed, some batches of the epoch mask a token and some mask none
    pretrain("single", small_demo_data, output_dir, 2, "--resume", "true", "--checkpoint", str(original),
             overrides=("mlm_probability=0.02",))
    (line,) = read_log(output_dir)
    assert line["epoch"] == 1
    assert 1 <= line["train_mlm_empty_steps"] < STEPS
    assert all(float(line[k]) == float(line[k]) for k in line if k.startswith("train_loss"))  # no NaN
    checkpoint = load_checkpoint(output_dir / "checkpoint_01.pth")
    assert adam_steps(checkpoint) == {2 * STEPS}


def test_resume_with_a_batch_the_queue_cannot_take_fails_at_start(single_run, small_demo_data,  # noqa: F811
                                                                  tmp_path):
    checkpoint = load_checkpoint(single_run[0] / "checkpoint_00.pth")
    checkpoint["model"]["queue_ptr"] = torch.tensor([4])
    path = tmp_path / "ptr4.pth"
    torch.save(checkpoint, path)
    code, output = pretrain("single", small_demo_data, tmp_path / "out", 2, "--resume", "true",
                            "--checkpoint", str(path), overrides=("batch_size=8",), expect_success=False)
    assert code != 0
    assert ("queue_size 16, batch size 8 x world size 1 = 8 per step, stored queue_ptr 4" in output), output[-3000:]
    assert "Train Epoch" not in output and "Traceback" in output


def test_deterministic_two_thread_runs_and_resume_are_identical(small_demo_data, tmp_path):
    """With --deterministic, two-thread runs repeat bitwise, and so does a resumed one."""
    env = {**script_env(), "OMP_NUM_THREADS": "2"}

    def fingerprint(name: str, *flags: str) -> str:
        cmd = [PYTHON, *script(small_demo_data, tmp_path / name, 2, "--deterministic", *flags)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return printed_fingerprint(proc.stdout, 1)

    first = fingerprint("first")
    assert fingerprint("again") == first
    resumed = fingerprint("resumed", "--resume", "true", "--checkpoint", str(tmp_path / "first" / "checkpoint_00.pth"))
    assert resumed == first


def test_num_workers_default_fits_the_machine():
    args = base_parser("x", "c.yaml", "out").parse_args([])
    assert args.num_workers == min(4, len(os.sched_getaffinity(0)))


def test_help_shows_defaults():
    text = "".join(base_parser("x", "c.yaml", "out/").format_help().split())  # help lines wrap anywhere
    for shown in ("(default: 42)", "(default: out/)", "(default: c.yaml)", "(default: bert-base-uncased)",
                  "(default: 1800)", "(default: none)"):
        assert shown.replace(" ", "") in text, shown


def test_tf32_flag_switches_float32_matrix_products():
    assert base_parser("x", "c.yaml", "out").parse_args([]).tf32 is False
    assert base_parser("x", "c.yaml", "out").parse_args(["--tf32"]).tf32 is True
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        use_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32
        use_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
