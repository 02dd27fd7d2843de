"""Run the parity runner over every shipped fixture and manifest, and test the runner itself."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from tests import parity

PARITY_DIR = os.path.join(os.path.dirname(__file__), "data", "parity")
FIXTURES = sorted(glob.glob(os.path.join(PARITY_DIR, "fixtures", "*.pt")))
MANIFESTS = sorted(p for p in glob.glob(os.path.join(PARITY_DIR, "manifests", "*.json"))
                   if not p.endswith("checkpoint_key_mapping.json"))


def _assert_results(results):
    failures = [r.line() for r in results if r.passed is False]
    assert not failures, "\n".join(failures)
    not_run = [r.line() for r in results if r.passed is None]
    assert results and not not_run, "\n".join(not_run) or "no check ran"


@pytest.mark.parametrize("path", FIXTURES, ids=[os.path.basename(p) for p in FIXTURES])
def test_fixture(path):
    _assert_results(parity.run_path(path))


@pytest.mark.parametrize("path", MANIFESTS, ids=[os.path.basename(p) for p in MANIFESTS])
def test_manifest(path):
    _assert_results(parity.run_path(path))


def test_shipped_fixtures_and_manifests_are_all_found():
    assert len(FIXTURES) == 11 and len(MANIFESTS) == 8


def test_runner_reports_failures_and_exit_status(tmp_path):
    fx = torch.load(os.path.join(PARITY_DIR, "fixtures", "vit.pt"), weights_only=True)
    fx["outputs"]["embeds"] = fx["outputs"]["embeds"] + 1e-3
    broken = tmp_path / "vit_broken.pt"
    torch.save(fx, broken)
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "parity.py"), str(broken)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any(line.startswith("vit.embeds ") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("vit.embeds_masked ") and line.endswith("PASS") for line in lines)
    assert lines[-1] == "3 passed, 1 failed"


def test_runner_handles_fixture_with_other_shapes_and_seed(tmp_path):
    """A vit fixture of another size and seed, recorded from an independent manual computation."""
    from models.vit import vit_from_config

    torch.manual_seed(123)
    config = {"image_res": 32, "vision_width": 24, "vision_depth": 2, "vision_heads": 3, "patch_size": 8}
    vit = vit_from_config(config).eval()
    image = torch.randn(3, 3, 32, 32)
    masked = torch.rand(3, 16) > 0.5
    # manual reference: patchify with the conv, replace masked patches, add positions, run the blocks
    with torch.no_grad():
        x = vit.patch_embed(image)
        w = masked.unsqueeze(-1).float()
        x = x * (1 - w) + vit.mask_token * w
        x = torch.cat([vit.cls_token.expand(3, -1, -1), x], 1) + vit.pos_embed
        for block in vit.blocks:
            x = block(x)
        embeds_masked = vit.norm(x)
        embeds = vit(image)
    fx = {
        "name": "vit", "config": config, "bert_config": {}, "state_dict": vit.state_dict(),
        "inputs": {"image": image, "masked_patch_positions": masked, "interp_image_res": 48, "register_blk": 1},
        "outputs": {"embeds": embeds, "embeds_masked": embeds_masked, "embeds_register_blk_8": embeds},
        "tolerance": {"atol": 1e-5, "rtol": 1e-5},
    }
    path = tmp_path / "vit_other.pt"
    torch.save(fx, path)
    results = parity.run_path(str(path))
    assert [r.passed for r in results] == [True, True, True]


def test_manifest_detects_wrong_shape(tmp_path):
    import json

    with open(os.path.join(PARITY_DIR, "manifests", "ve.json")) as handle:
        manifest = json.load(handle)
    manifest["state_dict"]["visual_encoder.pos_embed"] = [1, 1, 768, "float32"]
    path = tmp_path / "ve_bad.json"
    path.write_text(json.dumps(manifest))
    results = parity.run_path(str(path))
    bad = [r for r in results if r.passed is False]
    assert bad and "visual_encoder.pos_embed" in bad[0].detail
