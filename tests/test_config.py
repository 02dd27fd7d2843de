"""Tests for the shipped configs and configs/loader.py, configs/schema.py."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest

import configs
from configs import (
    ConfigError,
    ConfigWarning,
    apply_overrides,
    dump_config,
    load_config,
    save_config,
    validate_config,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# file -> (task, image_res, batch sizes, optimizer, schedular) as in the original SIMLA configs
SHIPPED = {
    "Pretrain.yaml": ("pretrain", 256, {"batch_size": 64},
                      {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02},
                      ("cosine", 1e-4, 30, 1e-5, 1, 1e-5, 20, 0)),
    "Retrieval_coco.yaml": ("retrieval", 384, {"batch_size_train": 32, "batch_size_test": 32},
                            {"opt": "adamW", "lr": 1e-5, "weight_decay": 0.02},
                            ("cosine", 1e-5, 5, 1e-6, 1, 1e-5, 1, 0)),
    "Retrieval_flickr.yaml": ("retrieval", 384, {"batch_size_train": 32, "batch_size_test": 64},
                              {"opt": "adamW", "lr": 1e-5, "weight_decay": 0.02},
                              ("cosine", 1e-5, 10, 1e-6, 1, 1e-5, 1, 0)),
    "Grounding.yaml": ("grounding", 384, {"batch_size": 32},
                       {"opt": "adamW", "lr": 1e-5, "weight_decay": 0.02},
                       ("cosine", 1e-5, 5, 1e-6, 1, 1e-5, 1, 0)),
    "VQA.yaml": ("vqa", 384, {"batch_size_train": 32, "batch_size_test": 16},
                 {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
                 ("cosine", 2e-5, 8, 1e-6, 1, 1e-5, 4, 0)),
    "NLVR.yaml": ("nlvr", 384, {"batch_size": 8},
                  {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
                  ("cosine", 2e-5, 10, 1e-6, 1, 1e-5, 1, 0)),
    "NLVR_Pretrain.yaml": ("nlvr_pretrain", 256, {"batch_size": 64},
                           {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
                           ("cosine", 2e-5, 1, 1e-5, 1, 1e-5, 1, 0)),
    "VE.yaml": ("ve", 384, {"batch_size_train": 32, "batch_size_test": 64},
                {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
                ("cosine", 2e-5, 5, 1e-6, 1, 1e-5, 1, 0)),
}
SCHED_KEYS = ("sched", "lr", "epochs", "min_lr", "decay_rate", "warmup_lr", "warmup_epochs", "cooldown_epochs")

# keys whose value is a list of files in the original configs (the others are single strings)
LIST_FILES = {
    "Pretrain.yaml": {"train_file"},
    "Retrieval_coco.yaml": {"train_file"},
    "Retrieval_flickr.yaml": {"train_file"},
    "Grounding.yaml": {"train_file", "test_file"},
    "VQA.yaml": {"train_file", "test_file"},
    "NLVR.yaml": {"train_file", "val_file", "test_file"},
    "NLVR_Pretrain.yaml": {"train_file"},
    "VE.yaml": set(),
}


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------
# Shipped files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_with_original_values(name):
    task, image_res, batches, optimizer, schedular = SHIPPED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown keys in shipped files
        config = load_config(CONFIG_DIR / name, task=task)
    assert type(config) is dict
    assert config["image_res"] == image_res
    for key, value in batches.items():
        assert config[key] == value and type(config[key]) is int
    assert config["optimizer"] == optimizer
    assert type(config["optimizer"]["lr"]) is float
    assert tuple(config["schedular"][k] for k in SCHED_KEYS) == schedular
    for key in ("lr", "min_lr", "warmup_lr"):
        assert type(config["schedular"][key]) is float
    for key in ("train_file", "val_file", "test_file"):
        if key in config:
            expected = list if key in LIST_FILES[name] else str
            assert type(config[key]) is expected, key
    for key in ("train_file", "val_file", "test_file", "image_root", "image_tokenizer_path"):
        for value in [config.get(key)] if not isinstance(config.get(key), list) else config[key]:
            assert value is None or not os.path.isabs(value), "site-specific absolute path"
    if "vit_mask_token" in config:
        assert config["vit_mask_token"] is False
    bert = json.loads((CONFIG_DIR.parent / config["bert_config"]).read_text())
    assert bert["hidden_size"] == 768 and bert["encoder_width"] == 768


def test_shipped_task_specific_values():
    pretrain = load_config(CONFIG_DIR / "Pretrain.yaml")
    assert pretrain["embed_dim"] == 256 and pretrain["temp"] == 0.07
    assert pretrain["mlm_probability"] == 0.15 and pretrain["queue_size"] == 65536
    assert pretrain["momentum"] == 0.995 and pretrain["alpha"] == 0.4
    assert len(pretrain["train_file"]) == 5 and pretrain["bert_config"] == "configs/shared_bert.json"
    assert load_config(CONFIG_DIR / "Retrieval_coco.yaml")["k_test"] == 256
    flickr = load_config(CONFIG_DIR / "Retrieval_flickr.yaml")
    assert flickr["k_test"] == 128 and flickr["warm_up"] is True and flickr["distill"] is True
    vqa = load_config(CONFIG_DIR / "VQA.yaml")
    assert vqa["eos"] == "[SEP]" and vqa["k_test"] == 128 and vqa["distill"] is True
    assert len(vqa["train_file"]) == 3
    assert load_config(CONFIG_DIR / "VE.yaml")["warm_up"] is False
    nlvr = load_config(CONFIG_DIR / "NLVR.yaml")
    assert nlvr["eval_ema"] is False and nlvr["bert_config"] == "configs/config_bert.json"
    assert load_config(CONFIG_DIR / "NLVR_Pretrain.yaml")["bert_config"] == "configs/config_bert.json"
    grounding = load_config(CONFIG_DIR / "Grounding.yaml")
    assert {"refcoco_data", "det_file", "coco_file"} <= set(grounding)


def test_bert_json_files():
    shared = json.loads((CONFIG_DIR / "shared_bert.json").read_text())
    xbert = json.loads((CONFIG_DIR / "config_bert.json").read_text())
    common = {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "type_vocab_size": 2,
        "vocab_size": 30522, "pad_token_id": 0, "initializer_range": 0.02, "encoder_width": 768,
    }
    for config in (shared, xbert):
        assert {k: config[k] for k in common} == common
    assert shared["add_cross_attention"] is True and "fusion_layer" not in shared
    assert xbert["fusion_layer"] == 6 and not xbert.get("add_cross_attention", False)


def test_nlvr_pretrain_lowercase_name_is_accepted():
    # the original Pretrain_NLVR.py default spells the file configs/NLVR_pretrain.yaml
    config = load_config(CONFIG_DIR / "NLVR_pretrain.yaml", task="pretrain_nlvr")
    assert config["batch_size"] == 64


# ---------------------------------------------------------------------------------------------------
# YAML parsing
# ---------------------------------------------------------------------------------------------------


def test_yaml_scalar_types(tmp_path):
    path = _write(tmp_path, (
        "a: 1e-4\nb: 2e-5\nc: 1E-4\nd: 1e4\ne: 0.07\nf: True\ng: false\nh: yes\ni: [SEP]\nj: '[SEP]'\n"
        "k: null\nl: 65536\nm: {opt: adamW, lr: 1e-4}\n"
    ))
    config = load_config(path)
    assert config["a"] == 1e-4 and type(config["a"]) is float
    assert config["b"] == 2e-5 and type(config["b"]) is float
    assert config["c"] == 1e-4 and type(config["c"]) is float
    assert config["d"] == 1e4 and type(config["d"]) is float
    assert config["f"] is True and config["g"] is False
    assert config["h"] == "yes"
    assert config["i"] == ["SEP"] and config["j"] == "[SEP]"
    assert config["k"] is None and config["l"] == 65536
    assert config["m"] == {"opt": "adamW", "lr": 1e-4} and type(config["m"]) is dict


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = _write(tmp_path, "a: [1, 2\nb: 3\n", "broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad)
    listing = _write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(listing)
    empty = _write(tmp_path, "", "empty.yaml")
    with pytest.raises(ConfigError, match="empty.yaml"):
        load_config(empty)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------


def test_overrides_set_add_delete():
    config = load_config(
        CONFIG_DIR / "Pretrain.yaml",
        [
            "optimizer.lr=2e-5",
            "batch_size=32",
            "+disable_wandb=true",
            "++from_scratch=True",
            "++alpha=0.5",
            "+extra.nested.value=[a, b]",
            "~image_tokenizer_path",
            "~schedular.cooldown_epochs=0",
            "train_file=[x.json]",
            "bert_config='configs/other.json'",
            "temp=null",
            "+note=",
        ],
    )
    assert config["optimizer"]["lr"] == 2e-5 and type(config["optimizer"]["lr"]) is float
    assert config["batch_size"] == 32 and type(config["batch_size"]) is int
    assert config["disable_wandb"] is True and config["from_scratch"] is True
    assert config["alpha"] == 0.5
    assert config["extra"] == {"nested": {"value": ["a", "b"]}}
    assert "image_tokenizer_path" not in config and "cooldown_epochs" not in config["schedular"]
    assert config["train_file"] == ["x.json"] and config["bert_config"] == "configs/other.json"
    assert config["temp"] is None and config["note"] == ""


def test_override_list_index():
    config = apply_overrides({"train_file": ["a.json", "b.json"]}, ["train_file.1=c.json"])
    assert config["train_file"] == ["a.json", "c.json"]


def test_override_unknown_key_error_message():
    path = str(CONFIG_DIR / "Pretrain.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optimizer.lrr=2e-5"])
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'optimizer.lrr'" in message and path in message
    assert "closest existing key: 'optimizer.lr'" in message
    assert "'+optimizer.lrr=2e-5'" in message
    with pytest.raises(ConfigError, match=r"bach_size.*closest existing key: 'batch_size'.*\+bach_size=1"):
        load_config(path, ["bach_size=1"])


def test_override_errors():
    path = CONFIG_DIR / "Pretrain.yaml"
    with pytest.raises(ConfigError, match=r"'batch_size'.*already exists.*\+\+batch_size=3"):
        load_config(path, ["+batch_size=3"])
    with pytest.raises(ConfigError, match="cannot delete 'nothing_here'"):
        load_config(path, ["~nothing_here"])
    with pytest.raises(ConfigError, match="its value is 64"):
        load_config(path, ["~batch_size=65"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["batch_size"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(path, ["temp.x=1"])
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path, ["batch_size=[1, 2"])


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def test_missing_required_key_names_key_file_and_misspelling(tmp_path):
    text = (CONFIG_DIR / "Pretrain.yaml").read_text().replace("batch_size:", "batch_sze:")
    path = _write(tmp_path, text, "Pretrain_typo.yaml")
    with pytest.warns(ConfigWarning, match="batch_sze.*closest known key: 'batch_size'"):
        with pytest.raises(ConfigError) as info:
            load_config(path, task="pretrain")
    message = str(info.value)
    assert "'batch_size'" in message and str(path) in message and "did you mean 'batch_sze'" in message


def test_unknown_key_warns_with_closest_known_key():
    config = load_config(CONFIG_DIR / "VE.yaml")
    config["alpah"] = 0.1
    with pytest.warns(ConfigWarning, match=r"'alpah' in VE.yaml .*closest known key: 'alpha'"):
        validate_config(config, "ve", "VE.yaml")


def test_optional_keys_are_accepted_silently():
    config = load_config(
        CONFIG_DIR / "Pretrain.yaml",
        ["+from_scratch=true", "+disable_wandb=true", "+vision_depth=2", "+vision_heads=4", "+patch_size=8"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_config(config, "pretrain", "Pretrain.yaml") is config
    retrieval = load_config(CONFIG_DIR / "Retrieval_flickr.yaml", ["+freeze_visual_encoder=false"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(retrieval, "zero_shot_retrieval")


def test_section_validation():
    config = load_config(CONFIG_DIR / "NLVR.yaml", ["~optimizer.lr"])
    with pytest.raises(ConfigError, match=r"'optimizer.lr' in NLVR.yaml"):
        validate_config(config, "nlvr", "NLVR.yaml")
    config = load_config(CONFIG_DIR / "NLVR.yaml", ["~schedular.epochs"])
    with pytest.raises(ConfigError, match=r"'schedular.epochs'"):
        validate_config(config, "nlvr", "NLVR.yaml")
    config = load_config(CONFIG_DIR / "NLVR.yaml", ["schedular=cosine"])
    with pytest.raises(ConfigError, match="'schedular'.*mapping"):
        validate_config(config, "nlvr", "NLVR.yaml")
    config = load_config(CONFIG_DIR / "NLVR.yaml", ["optimizer.lr='1e-4'"])
    with pytest.raises(ConfigError, match="optimizer.lr.*number"):
        validate_config(config, "nlvr", "NLVR.yaml")
    config = load_config(CONFIG_DIR / "NLVR.yaml", ["+optimizer.opt_eps=1e-8", "+schedular.warmup_t=3"])
    with pytest.warns(ConfigWarning, match="schedular.warmup_t"):
        validate_config(config, "nlvr", "NLVR.yaml")


def test_unknown_task_and_schema_extension():
    with pytest.raises(ConfigError, match="unknown task 'captioning'"):
        validate_config({}, "captioning")
    saved = copy.deepcopy(configs.TASK_SCHEMAS["ve"])
    try:
        configs.extend_schema("ve", required=["label_smoothing"], optional={"extra_flag": False})
        config = load_config(CONFIG_DIR / "VE.yaml", ["+extra_flag=true"])
        with pytest.raises(ConfigError, match="label_smoothing"):
            validate_config(config, "ve")
    finally:
        configs.TASK_SCHEMAS["ve"] = saved


# ---------------------------------------------------------------------------------------------------
# config.yaml output
# ---------------------------------------------------------------------------------------------------


def test_dump_format_matches_original():
    config = {
        "train_file": ["a.json", "b.json"],
        "optimizer": {"opt": "adamW", "lr": 2e-05, "weight_decay": 0.02},
        "batch_size": 64,
        "alpha": 0.4,
        "lr": 1e-4,
        "distill": True,
        "warm_up": False,
        "eos": "[SEP]",
        "none": None,
    }
    assert dump_config(config) == (
        "alpha: 0.4\n"
        "batch_size: 64\n"
        "distill: true\n"
        "eos: '[SEP]'\n"
        "lr: 0.0001\n"
        "none: null\n"
        "optimizer: {lr: 2e-05, opt: adamW, weight_decay: 0.02}\n"
        "train_file: [a.json, b.json]\n"
        "warm_up: false\n"
    )


def test_defaults_are_filled_in_and_left_out_when_written(tmp_path):
    config = load_config(CONFIG_DIR / "Pretrain_demo.yaml", task="pretrain")
    filled = configs.with_defaults(config, "pretrain")
    optional = set(configs.COMMON_OPTIONAL) | set(configs.TASK_SCHEMAS["pretrain"].optional)
    assert set(filled) >= optional and set(filled["optimizer"]) >= set(configs.SECTION_SCHEMAS["optimizer"].optional)
    assert "vit_mask_token" not in config and filled["vit_mask_token"] is True
    assert "momentum" not in config["optimizer"] and filled["optimizer"]["momentum"] == 0.9
    assert configs.with_defaults(filled, "pretrain") == filled
    written = configs.as_written(filled)
    assert written == config and type(written) is dict
    assert Path(save_config(filled, tmp_path)).read_text() == dump_config(config)


def test_save_config_round_trip_and_atomicity(tmp_path, monkeypatch):
    config = load_config(CONFIG_DIR / "Pretrain.yaml", ["+disable_wandb=true"])
    out = tmp_path / "new" / "run"
    path = save_config(config, out)
    assert path == os.path.join(str(out), "config.yaml")
    text = Path(path).read_text()
    assert "schedular: {cooldown_epochs: 0, decay_rate: 1, epochs: 30, lr: 0.0001, min_lr:" in text
    assert "optimizer: {lr: 0.0001, opt: adamW, weight_decay: 0.02}" in text
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert keys == sorted(keys)
    assert load_config(path) == config
    assert os.listdir(out) == ["config.yaml"]

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(configs.loader.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_config({"other": 1}, out)
    monkeypatch.undo()
    assert Path(path).read_text() == text
    assert os.listdir(out) == ["config.yaml"]
