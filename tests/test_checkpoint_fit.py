"""``--checkpoint`` must fit the model: only the documented missing and unexpected keys are accepted.

Each fine-tuning script loads its documented source checkpoint (built from the tiny demo models) with
the missing and unexpected keys of the recorded full-size mapping; a checkpoint of another task, an
unknown extra key, a lacking non-head key, a wrong shape or a missing file fail with the key or path
named.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from configs import load_config
from engine.checkpoint import (
    CheckpointFit,
    check_checkpoint_fit,
    load_checkpoint_into,
    load_filtered_state,
    prepare_state,
)
from models.simla import nlvr as nlvr_model
from models.simla import pretrain as pretrain_model
from models.simla import pretrain_nlvr as pretrain_nlvr_model
from models.simla import ve as ve_model
from models.simla import vqa as vqa_model
from models.tokenization import build_tokenizer
from tests.script_helpers import script_env

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "tests" / "data" / "parity" / "manifests" / "checkpoint_key_mapping.json"
DEMO_VOCAB = str(REPO / "configs" / "demo_vocab.txt")
SCRIPTS = ("VQA.py", "VE.py", "Pretrain_NLVR.py", "NLVR.py")
# the model each script builds and the model its documented --checkpoint comes from
SOURCE_OF = {"VQA.py": "pretrain", "VE.py": "pretrain", "Pretrain_NLVR.py": "pretrain", "NLVR.py": "pretrain_nlvr"}
TARGET_OF = {"VQA.py": "vqa", "VE.py": "ve", "Pretrain_NLVR.py": "pretrain_nlvr", "NLVR.py": "nlvr"}


def demo_config(name: str, **extra: Any) -> dict[str, Any]:
    config = load_config(REPO / "configs" / name)
    config["bert_config"] = str(REPO / config["bert_config"])
    config.update(extra)
    return config


CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "pretrain": lambda: demo_config("Pretrain_demo.yaml"),
    "vqa": lambda: demo_config("VQA_demo.yaml"),
    "ve": lambda: demo_config("VE_demo.yaml"),
    "pretrain_nlvr": lambda: demo_config("NLVR_Pretrain_demo.yaml"),
    # the recorded NLVR mapping is that of the distilling model (momentum models missing)
    "nlvr": lambda: demo_config("NLVR_demo.yaml", distill=True),
}


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    if kind == "pretrain":
        return pretrain_model.SIMLA(tokenizer=build_tokenizer(DEMO_VOCAB), config=config)
    if kind == "vqa":
        return vqa_model.SIMLA(tokenizer=build_tokenizer(DEMO_VOCAB), config=config)
    module = {"ve": ve_model, "pretrain_nlvr": pretrain_nlvr_model, "nlvr": nlvr_model}[kind]
    return module.SIMLA(config=config)


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    """The state_dict of every tiny demo model (random weights)."""
    return {kind: build(kind, seed=1).state_dict() for kind in CONFIGS}


def load_with_script(script: str, model: torch.nn.Module, path: Path, own: bool = False) -> Any:
    """Load ``path`` into ``model`` as ``script`` does, through the model's checkpoint filter (``own``: as a
    checkpoint of the script itself, i.e. ``--evaluate``); returns the ``load_state_dict`` report."""
    module = {"VQA.py": vqa_model, "VE.py": ve_model, "Pretrain_NLVR.py": pretrain_nlvr_model, "NLVR.py": nlvr_model}
    _, report = load_checkpoint_into(model, str(path), module[script].checkpoint_filter_fn, script, own=own)
    return report


def save(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "checkpoint.pth") -> Path:
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def key_pattern(key: str) -> str:
    """A key with its layer / block / sequence indices replaced, so models of any depth compare."""
    return re.sub(r"\.\d+\.", ".N.", key)


def recorded_patterns(script: str) -> tuple[set[str], set[str]]:
    recorded = json.loads(MAPPING.read_text())[script]
    return ({key_pattern(k) for k in recorded["missing_keys"]}, {key_pattern(k) for k in recorded["unexpected_keys"]})


# --- the documented checkpoints load --------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_documented_checkpoint_loads_with_the_recorded_key_differences(script, states, tmp_path):
    source = states[SOURCE_OF[script]]
    model = build(TARGET_OF[script])
    report = load_with_script(script, model, save(tmp_path, source))
    missing, unexpected = recorded_patterns(script)
    assert {key_pattern(k) for k in report.missing_keys} == missing
    assert {key_pattern(k) for k in report.unexpected_keys} == unexpected
    # what the checkpoint has was loaded
    key = "visual_encoder.blocks.1.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[key], source[key])


@pytest.mark.parametrize("script", ["VQA.py", "VE.py", "NLVR.py"])
def test_own_checkpoint_loads_with_nothing_missing(script, states, tmp_path):
    state = states[TARGET_OF[script]]
    model = build(TARGET_OF[script])
    report = load_with_script(script, model, save(tmp_path, state), own=True)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_momentum_weights_of_a_distilling_checkpoint_are_ignored_without_distillation(states, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setitem(CONFIGS, "ve", lambda: demo_config("VE_demo.yaml", distill=False))
    model = build("ve")
    report = load_with_script("VE.py", model, save(tmp_path, states["ve"]), own=True)
    assert report.missing_keys == []
    assert {k.split(".")[0] for k in report.unexpected_keys} == {"visual_encoder_m", "text_encoder_m", "cls_head_m"}


# --- checkpoints that do not fit fail --------------------------------------------------------------------


@pytest.mark.parametrize(("script", "other", "own", "named"), [
    ("NLVR.py", "vqa", False, "text_decoder."),
    ("NLVR.py", "pretrain", False, "text_encoder.bert."),
    ("VE.py", "nlvr", False, "text_encoder.embeddings.token_type_embeddings.weight"),
    ("VE.py", "pretrain", True, "text_encoder.bert."),
    ("VQA.py", "ve", False, "cls_head."),
    ("VQA.py", "pretrain", True, "text_encoder.bert."),
    ("Pretrain_NLVR.py", "ve", False, "cls_head."),
])
def test_checkpoint_of_another_model_fails(script, other, own, named, states, tmp_path):
    path = save(tmp_path, states[other], f"{other}.pth")
    with pytest.raises(ValueError, match=rf"^{re.escape(script)}: checkpoint {re.escape(str(path))} does not fit") \
            as error:
        load_with_script(script, build(TARGET_OF[script]), path, own=own)
    assert named in str(error.value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_extra_key_fails(script, states, tmp_path):
    state = dict(states[SOURCE_OF[script]], **{"visual_encoder.adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): visual_encoder\.adapter\.weight\n"):
        load_with_script(script, build(TARGET_OF[script]), save(tmp_path, state))


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_encoder_key_fails(script, states, tmp_path):
    key = "visual_encoder.blocks.2.attn.qkv.bias"
    state = {k: v for k, v in states[SOURCE_OF[script]].items() if k != key}
    with pytest.raises(ValueError, match=rf"missing keys \(1\): {re.escape(key)}\n"):
        load_with_script(script, build(TARGET_OF[script]), save(tmp_path, state))


@pytest.mark.parametrize("script", SCRIPTS)
def test_wrong_shape_fails(script, states, tmp_path):
    state = dict(states[SOURCE_OF[script]], **{"visual_encoder.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): visual_encoder\.norm\.weight: checkpoint "
                                         r"\(3,\) vs model \(64,\)"):
        load_with_script(script, build(TARGET_OF[script]), save(tmp_path, state))


def test_accepted_head_with_a_wrong_shape_still_fails(states, tmp_path):
    state = dict(states["pretrain"], **{"cls_head.2.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): cls_head\.2\.bias: checkpoint \(5,\)"):
        load_with_script("VE.py", build("ve"), save(tmp_path, state))


def test_error_lists_the_first_20_keys_and_the_counts():
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(12)])
    state = {f"unrelated.{i}": torch.zeros(1) for i in range(30)}
    fit = CheckpointFit("Demo.py", "a demo checkpoint", missing=("11.*",), unexpected=("unrelated.2?",))
    with pytest.raises(ValueError) as error:
        check_checkpoint_fit(model, state, "/x/ckpt.pth", fit)
    lines = str(error.value).splitlines()
    assert lines[0] == "Demo.py: checkpoint /x/ckpt.pth does not fit the model (Demo.py expects a demo checkpoint):"
    assert lines[1].startswith("  missing keys (22): 0.weight, 0.bias, ")
    assert lines[1].endswith(", 9.bias ... and 2 more")
    assert lines[2].startswith("  unexpected keys (20): unrelated.0, ") and "unrelated.21" not in lines[2]
    assert lines[2].endswith(", unrelated.19")
    assert lines[3] == "  (not counted: 2 missing and 10 unexpected keys that Demo.py accepts from a demo checkpoint)"
    over = {**state, **{f"more.{i}": torch.zeros(1) for i in range(5)}}
    with pytest.raises(ValueError, match=r"unexpected keys \(25\): .* \.\.\. and 5 more\n"):
        check_checkpoint_fit(model, over, "/x/ckpt.pth", fit)


def test_missing_checkpoint_file_fails_naming_it(tmp_path):
    missing = tmp_path / "no_such_checkpoint.pth"
    proc = subprocess.run(
        [sys.executable, "NLVR.py", "--config", "configs/NLVR_demo.yaml", "--output_dir", str(tmp_path / "out"),
         "--checkpoint", str(missing), "--text_encoder", DEMO_VOCAB, "--device", "cpu", "--num_workers", "0"],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and str(missing) in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("script", ["Retrieval.py", "Grounding.py"])
def test_retrieval_scripts_refuse_checkpoints_of_other_models(script, states, tmp_path):
    from models.simla import retrieval as retrieval_model

    torch.manual_seed(0)
    model = retrieval_model.SIMLA(config=demo_config("Retrieval_demo.yaml"))
    # the documented source loads: a pretraining checkpoint
    filter_fn = retrieval_model.checkpoint_filter_fn
    report = load_filtered_state(model, prepare_state(states["pretrain"], model, filter_fn), "pretrain.pth", script)
    assert report.missing_keys == ["idx_queue"]
    # a VE checkpoint brings a classifier the retrieval model has no place for
    with pytest.raises(ValueError, match=r"ve\.pth does not fit .*\n  missing keys .*itm_head.*\n  unexpected keys .*cls_head"):
        load_filtered_state(model, prepare_state(states["ve"], model, filter_fn), "ve.pth", script)
