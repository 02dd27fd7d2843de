"""benchmarks/gpu_check.py in its CPU dry mode, its keyword-tie analysis, and loader pinning on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import torch

from benchmarks.gpu_check import FIXTURES, ROWS, keyword_ties
from engine.training import evaluation_loaders, training_loader
from models.simla.pretrain import keyword_votes

REPO_ROOT = Path(__file__).resolve().parents[1]


def _dry_run(out: Path, *flags: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out), *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_dry_run_writes_every_section(tmp_path):
    report, printed = _dry_run(tmp_path)
    assert (tmp_path / "gpu_check.md").read_text() in printed
    assert report["matmul"]["tflops_per_s"] > 0
    rows = report["pretraining"]
    assert [row["row"] for row in rows] == [*ROWS, "float32 (compiled)"]
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        assert row["s_per_step"] > 0 and row["samples_per_s"] > 0 and row["first_step_s"] > 0
        assert row["gflop_per_step"] > 0 and 0 < row["mfu"] < 1
    assert len(report["parity"]) == len(FIXTURES) == 11
    assert all(fixture["passed"] and fixture["outputs"] > 0 for fixture in report["parity"]), report["parity"]
    ties = report["keyword_ties"]
    assert [tie["caption"] for tie in ties] == [0, 1]
    for tie in ties:
        assert tie["min_gap"] > 0 and tie["min_gap_float32_spacings"] >= 1
        assert tie["positions_with_those_votes"] >= tie["of_them_keywords"] >= 1
        assert tie["tie_at_boundary"] == (tie["positions_with_those_votes"] > tie["of_them_keywords"])
    (script,) = report["scripts"]
    assert script["passed"] and script["seconds"] > 0


def test_spent_budget_skips_scripts_and_rows_and_still_checks_parity(tmp_path):
    report, _ = _dry_run(tmp_path, "--budget_s", "0")
    assert all(row["skipped"].startswith("time budget") for row in report["pretraining"])
    assert all(run["skipped"].startswith("time budget") for run in report["scripts"])
    assert all(fixture["passed"] for fixture in report["parity"])


def test_keyword_ties_measure_gaps_in_float32_spacings_and_vote_ties():
    spacing = 2.0**-25  # of float32 values in [0.25, 0.5)
    attention = torch.tensor([[[0.5, 0.25, 0.125, 0.0625, 0.0625],
                               [0.4, 0.25 + spacing, 0.25, 0.1, 0.0]]])
    votes = keyword_votes(attention, 2)  # both heads pick positions 0 and 1
    assert votes.tolist() == [[2, 2, 0, 0, 0]]
    (two,) = keyword_ties(attention, votes, keys_per_head=2, keywords=2)
    assert (two["head"], two["min_gap"], two["min_gap_float32_spacings"]) == (1, spacing, 1.0)
    assert (two["last_keyword_votes"], two["positions_with_those_votes"], two["of_them_keywords"]) == (2, 2, 2)
    assert not two["tie_at_boundary"]
    (one,) = keyword_ties(attention, votes, keys_per_head=2, keywords=1)
    assert (one["positions_with_those_votes"], one["of_them_keywords"], one["tie_at_boundary"]) == (2, 1, True)


def test_loaders_pin_memory_only_for_an_available_cuda_device(monkeypatch):
    def pinned(device: str) -> list[bool]:
        args = Namespace(device=device, num_workers=0, seed=0)
        loader, _ = training_loader(args, {"train_file": "list"}, list(range(4)), 2, None)
        return [loader.pin_memory] + [eval_loader.pin_memory for eval_loader in evaluation_loaders(args, [[0]], 2)]

    assert pinned("cpu") == [False, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pinned("cuda") == [False, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pinned("cuda") == [True, True] and pinned("cpu") == [False, False]
