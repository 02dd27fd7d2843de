"""What a new user meets first: failed weight downloads, a --checkpoint that is no checkpoint, the line
naming the starting weights, and the conda environment file."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch

from engine.checkpoint import check_checkpoint_format
from engine.training import starting_weights
from models import bert, tokenization
from models.vit import DEIT_BASE_URL, load_deit_weights, vit_from_config
from tests.script_helpers import script_env

REPO = Path(__file__).resolve().parents[1]
DEMO_VOCAB = str(REPO / "configs" / "demo_vocab.txt")
TINY_VIT = {"image_res": 32, "patch_size": 16, "vision_width": 32, "vision_depth": 1, "vision_heads": 2}


def _offline(*_args, **_kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


# --- failed downloads ----------------------------------------------------------------------------------


def test_deit_download_failure_names_url_and_config_keys(monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    with pytest.raises(OSError) as info:
        load_deit_weights(vit_from_config(TINY_VIT), DEIT_BASE_URL)
    message = str(info.value)
    assert DEIT_BASE_URL in message and "name resolution" in message
    assert "from_scratch" in message and "deit_weights" in message


def test_bert_download_failure_names_model_and_flag(monkeypatch):
    import huggingface_hub

    def offline(*_args, **_kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError) as info:
        bert.resolve_pretrained_file("bert-base-uncased")
    message = str(info.value)
    assert "'bert-base-uncased'" in message and "--text_encoder" in message and "from_scratch" in message

    # the tokenizer (built first) fails on its first file, not after retrying every file
    monkeypatch.setattr(tokenization.BertTokenizer, "from_pretrained",
                        lambda *_args, **_kwargs: pytest.fail("from_pretrained was reached"))
    with pytest.raises(OSError) as info:
        tokenization.build_tokenizer("bert-base-uncased")
    message = str(info.value)
    assert "'bert-base-uncased'" in message and "--text_encoder" in message and "vocab.txt" in message


# --- --checkpoint that is not a checkpoint ------------------------------------------------------------


def test_checkpoint_format_check(tmp_path):
    zipped, legacy, archive = tmp_path / "zip.pth", tmp_path / "legacy.pth", tmp_path / "old.tar"
    torch.save({"w": torch.ones(2)}, zipped)
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with tarfile.open(archive, "w") as handle:
        handle.add(zipped, arcname="storages")
    for path in (zipped, legacy, archive):
        check_checkpoint_format(str(path))
    text, empty = tmp_path / "notes.txt", tmp_path / "empty.pth"
    text.write_text("epoch 3: loss 1.2\n")
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(text))} is not a PyTorch checkpoint \(.*'epoch 3"):
        check_checkpoint_format(str(text))
    with pytest.raises(ValueError, match=r"empty.pth is not a PyTorch checkpoint \(the file is empty"):
        check_checkpoint_format(str(empty))


def _run_ve(output_dir: Path, *flags: str, data: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    paths = data or {"ve_train": "missing/ve_train.json", "ve_val": "missing/ve_val.json",
                     "ve_test": "missing/ve_test.json", "ve_image_root": "missing"}
    overrides = [f"train_file={paths['ve_train']}", f"val_file={paths['ve_val']}", f"test_file={paths['ve_test']}",
                 f"image_root={paths['ve_image_root']}"]
    command = [sys.executable, "VE.py", "--config", "configs/VE_demo.yaml", "--output_dir", str(output_dir),
               "--text_encoder", DEMO_VOCAB, "--device", "cpu", "--num_workers", "0", *flags,
               "--overrides", *overrides]
    return subprocess.run(command, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)


def test_text_checkpoint_fails_before_data_or_model(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3: loss 1.2\n")
    proc = _run_ve(tmp_path / "out", "--checkpoint", str(notes))
    assert proc.returncode != 0
    assert f"--checkpoint {notes} is not a PyTorch checkpoint" in proc.stdout, proc.stdout[-3000:]
    # the annotation files do not exist: nothing was read, no model was built
    assert "Creating" not in proc.stdout and "Traceback" not in proc.stdout


# --- the starting weights ------------------------------------------------------------------------------


def _args(**values) -> argparse.Namespace:
    return argparse.Namespace(**{"checkpoint": "", "resume": False, "text_encoder": "bert-base-uncased", **values})


def test_starting_weights_line():
    model = torch.nn.Module()
    model.visual_encoder = vit_from_config(TINY_VIT)
    assert starting_weights(_args(checkpoint="out/checkpoint_07.pth"), {}, model) == (
        "Starting weights: checkpoint out/checkpoint_07.pth")
    assert starting_weights(_args(checkpoint="out/last.pth", resume=True), {}, model) == (
        "Starting weights: checkpoint out/last.pth (resumed)")
    assert starting_weights(_args(), {"from_scratch": True}, model) == (
        "Starting weights: random (from_scratch: true, no --checkpoint)")
    assert starting_weights(_args(text_decoder="bert-base-cased"), {"from_scratch": False}, model) == (
        "Starting weights: random ViT, text encoder from BERT bert-base-uncased (--text_encoder), answer "
        "decoder from BERT bert-base-cased (--text_decoder); no --checkpoint")
    model.visual_encoder.init_source = DEIT_BASE_URL
    assert starting_weights(_args(), {"from_scratch": False}, model) == (
        f"Starting weights: ViT from DeiT {DEIT_BASE_URL}, text encoder from BERT bert-base-uncased "
        "(--text_encoder); no --checkpoint")


def test_deit_load_records_its_source(tmp_path):
    vit = vit_from_config(TINY_VIT)
    path = tmp_path / "deit.pth"
    torch.save({"model": vit_from_config(TINY_VIT).state_dict()}, path)
    assert vit.init_source is None
    load_deit_weights(vit, str(path))
    assert vit.init_source == str(path)


def test_script_prints_starting_weights(small_demo_data, tmp_path):
    proc = _run_ve(tmp_path / "out", "--evaluate", data=small_demo_data)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Starting weights: random (from_scratch: true, no --checkpoint)" in proc.stdout.splitlines()


# --- the conda environment -----------------------------------------------------------------------------


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised as PEP 503 does."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def test_environment_yaml_has_every_dependency():
    tomllib = pytest.importorskip("tomllib")
    from ruamel.yaml import YAML

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = {_name(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    environment = YAML(typ="safe").load((REPO / "environment.yaml").read_text(encoding="utf-8"))
    listed: set[str] = set()
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            listed.update(_name(r) for r in entry.get("pip", []))
        else:
            listed.add(_name(re.split(r"[=<>! ]", entry, maxsplit=1)[0]))
    missing = sorted(wanted - listed)
    assert not missing, f"environment.yaml lacks {missing}, which pyproject.toml requires"
