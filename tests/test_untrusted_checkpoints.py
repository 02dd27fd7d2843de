"""Every entry script refuses a ``--checkpoint`` whose pickle would run code, without running it.

Each script is started on a small demo dataset with a planted checkpoint whose unpickling would create
a marker file; the run must stop with a message naming the pickled global and ``--trust_checkpoint``,
and the marker must not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo.data import generate_demo_data
from tests.script_helpers import script_env

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "Pretrain.py": ("Pretrain_demo.yaml", ["--resume", "true"]),
    "Pretrain_NLVR.py": ("NLVR_Pretrain_demo.yaml", []),
    "Retrieval.py": ("Retrieval_demo.yaml", []),
    "zero_shot_retrieval.py": ("Retrieval_zero_shot_demo.yaml", []),
    "Grounding.py": ("Grounding_demo.yaml", ["--block_num", "2"]),
    "VQA.py": ("VQA_demo.yaml", []),
    "NLVR.py": ("NLVR_demo.yaml", []),
    "VE.py": ("VE_demo.yaml", []),
}


class RunsCode:
    """Unpickling this calls ``os.system`` with a command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("untrusted")
    generate_demo_data(root / "demo_data")
    # the demo configs name their BERT configs relative to the repository
    (root / "configs").symlink_to(REPO / "configs")
    return root


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_refuses_checkpoint_that_runs_code(script, demo_dir, tmp_path):
    config, flags = SCRIPTS[script]
    marker = tmp_path / "code_ran"
    planted = tmp_path / "planted.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": RunsCode(marker), "epoch": 0}, planted)
    command = [sys.executable, str(REPO / script), "--config", str(REPO / "configs" / config), "--output_dir",
               str(tmp_path / "out"), "--text_encoder", str(REPO / "configs" / "demo_vocab.txt"), "--device", "cpu",
               "--num_workers", "0", "--checkpoint", str(planted), *flags]
    proc = subprocess.run(command, cwd=demo_dir, env=script_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert not marker.exists()
    assert f"refusing to load checkpoint {planted}" in output, output[-3000:]
    assert "system" in output and "--trust_checkpoint" in output
