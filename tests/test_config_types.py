"""Type checks of configuration values (configs/schema.py): every shipped config passes, a value of the
wrong type or a missing required key fails with the key named, a misspelt key warns with the closest
known key, and an entry script with such a config stops before it reads any data."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from configs import (
    SECTION_SCHEMAS,
    TASK_SCHEMAS,
    ConfigError,
    ConfigWarning,
    extend_schema,
    load_config,
    validate_config,
)
from configs.schema import INT, expected_type
from tests.script_helpers import script_env

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"

# every YAML file under configs/ and the tasks of the scripts that read it
SHIPPED_TASKS = {
    "Pretrain.yaml": ("pretrain",),
    "Pretrain_demo.yaml": ("pretrain",),
    "Pretrain_demo_shards.yaml": ("pretrain",),
    "Retrieval_coco.yaml": ("retrieval",),
    "Retrieval_flickr.yaml": ("retrieval", "zero_shot_retrieval"),
    "Retrieval_demo.yaml": ("retrieval",),
    "Retrieval_zero_shot_demo.yaml": ("zero_shot_retrieval",),
    "Grounding.yaml": ("grounding",),
    "Grounding_demo.yaml": ("grounding",),
    "VQA.yaml": ("vqa",),
    "VQA_demo.yaml": ("vqa",),
    "NLVR.yaml": ("nlvr",),
    "NLVR_demo.yaml": ("nlvr",),
    "NLVR_Pretrain.yaml": ("nlvr_pretrain",),
    "NLVR_Pretrain_demo.yaml": ("nlvr_pretrain",),
    "VE.yaml": ("ve",),
    "VE_demo.yaml": ("ve",),
}
SHIPPED = [(name, task) for name, tasks in SHIPPED_TASKS.items() for task in tasks]

RETRIEVAL_DEMO = CONFIG_DIR / "Retrieval_demo.yaml"


def _load_retrieval(*overrides: str) -> dict:
    return load_config(RETRIEVAL_DEMO, list(overrides), task="retrieval")


# --- shipped files ----------------------------------------------------------------------------------


def test_every_shipped_config_is_listed():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(SHIPPED_TASKS)


@pytest.mark.parametrize(("name", "task"), SHIPPED)
def test_shipped_config_passes_its_task(name, task):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown keys either
        config = load_config(CONFIG_DIR / name, task=task)
    for key, value in config.items():
        kind = expected_type(task, key)
        assert kind is not None and kind.accepts(value), key


@pytest.mark.parametrize("task", sorted(TASK_SCHEMAS))
def test_every_known_key_has_a_type(task):
    untyped = sorted(key for key in TASK_SCHEMAS[task].known if expected_type(task, key) is None)
    assert untyped == []
    for section, schema in SECTION_SCHEMAS.items():
        assert sorted(k for k in schema.known if expected_type(task, f"{section}.{k}") is None) == []


# --- wrong types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "expected", "found"),
    [
        ("batch_size_train='32'", "batch_size_train", "an integer", "str '32'"),
        ("image_res=2.5", "image_res", "an integer", "float 2.5"),
        ("k_test=true", "k_test", "an integer", "bool True"),
        ("train_file=5", "train_file", "a string or a list of strings", "int 5"),
        ("test_file=[a.json, 3]", "test_file", "a string or a list of strings", "list ['a.json', 3]"),
        ("image_root=[a, b]", "image_root", "a string", "list ['a', 'b']"),
        ("alpha=true", "alpha", "a number", "bool True"),
        ("temp=null", "temp", "a number", "null None"),
        ("warm_up=yes", "warm_up", "a boolean", "str 'yes'"),
        ("vit_mask_token=0", "vit_mask_token", "a boolean", "int 0"),
        ("optimizer.lr=fast", "optimizer.lr", "a number", "str 'fast'"),
        ("optimizer.opt=[adamW]", "optimizer.opt", "a string", "list ['adamW']"),
        ("schedular.epochs=2.0", "schedular.epochs", "an integer", "float 2.0"),
        ("schedular.min_lr='1e-5'", "schedular.min_lr", "a number", "str '1e-5'"),
        ("+optimizer.opt_betas=[0.9, x]", "optimizer.opt_betas", "a list of numbers or null",
         "list [0.9, 'x']"),
        ("+max_image_pixels=big", "max_image_pixels", "an integer or null", "str 'big'"),
    ],
)
def test_wrong_type_names_file_key_and_types(override, key, expected, found):
    with pytest.raises(ConfigError) as info:
        _load_retrieval(override)
    message = str(info.value)
    assert message.startswith(f"config key '{key}' in {RETRIEVAL_DEMO} has the wrong type: ")
    assert f"expected {expected}" in message and f"found {found}" in message


def test_all_wrong_types_are_reported_together():
    with pytest.raises(ConfigError) as info:
        _load_retrieval("batch_size_train='32'", "image_res=2.5", "train_file=5", "optimizer.lr=fast")
    lines = str(info.value).splitlines()
    assert lines[0] == f"4 config keys in {RETRIEVAL_DEMO} have the wrong type:"
    keys = sorted(line.split("'")[1] for line in lines[1:])
    assert keys == ["batch_size_train", "image_res", "optimizer.lr", "train_file"]


def test_values_of_the_accepted_alternative_types_pass():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = _load_retrieval(
            "optimizer.lr=0", "alpha=1", "schedular.min_lr=0",  # integers where a float is expected
            "train_file=one.json", "val_file=[a.json, b.json]",  # one path or a list
            "+max_image_pixels=null", "++deit_weights=null", "schedular.lr=null",  # null where allowed
            "+optimizer.opt_betas=[0.9, 0.98]", "+schedular.lr_noise=[2, 4]", "+optimizer.opt_args={foo: 1}",
        )
    assert config["optimizer"]["lr"] == 0 and config["max_image_pixels"] is None
    pretrain = load_config(CONFIG_DIR / "Pretrain_demo.yaml", ["+psl_layer=null", "+mask_max_aspect=2"],
                           task="pretrain")
    assert pretrain["psl_layer"] is None


def test_unknown_keys_are_not_type_checked():
    # k_test is typed, but not a pretraining key: only the unknown-key warning
    with pytest.warns(ConfigWarning, match="'k_test' in .* is not read by the pretrain task"):
        load_config(CONFIG_DIR / "Pretrain_demo.yaml", ["+k_test=many"], task="pretrain")


def test_validate_config_checks_types_of_an_in_memory_config():
    config = load_config(CONFIG_DIR / "VE.yaml")
    config["batch_size_test"] = "64"
    with pytest.raises(ConfigError, match=r"'batch_size_test' in VE\.yaml .*integer.*str '64'"):
        validate_config(config, "ve", "VE.yaml")
    config["batch_size_test"] = 64
    config["optimizer"] = dict(config["optimizer"], weight_decay="0.02")
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.weight_decay' has the wrong type"):
        validate_config(config, "ve")


def test_schema_extension_with_a_type():
    saved = copy.deepcopy(TASK_SCHEMAS["ve"])
    try:
        extend_schema("ve", optional={"label_smoothing_steps": 0}, types={"label_smoothing_steps": INT})
        config = load_config(CONFIG_DIR / "VE.yaml", ["+label_smoothing_steps=3"], task="ve")
        assert config["label_smoothing_steps"] == 3
        with pytest.raises(ConfigError, match="'label_smoothing_steps'.*an integer.*str 'three'"):
            load_config(CONFIG_DIR / "VE.yaml", ["+label_smoothing_steps=three"], task="ve")
    finally:
        TASK_SCHEMAS["ve"] = saved


# --- missing and misspelt keys ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k_test", "image_root", "optimizer.lr", "schedular.epochs"])
def test_missing_required_key_fails(key):
    with pytest.raises(ConfigError, match=rf"missing required config key '{key}' in .*Retrieval_demo\.yaml"):
        _load_retrieval(f"~{key}")


def test_misspelt_key_warns_with_closest_known_key(tmp_path):
    text = RETRIEVAL_DEMO.read_text().replace("warm_up: True", "warm_up: True\nimage_ress: 64\nk_tset: 8")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.warns(ConfigWarning) as record:
        load_config(path, task="retrieval")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0] == (f"config key 'image_ress' in {path} is not read by the retrieval task; "
                           "closest known key: 'image_res'")
    assert "'k_tset'" in messages[1] and "closest known key: 'k_test'" in messages[1]
    with pytest.warns(ConfigWarning, match="'optimizer.weight_decy'.*closest known key: 'optimizer.weight_decay'"):
        _load_retrieval("+optimizer.weight_decy=0.1")


def test_misspelt_required_key_fails_and_suggests_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(RETRIEVAL_DEMO.read_text().replace("batch_size_test:", "batch_size_tset:"))
    with pytest.warns(ConfigWarning, match="'batch_size_tset'.*closest known key: 'batch_size_test'"):
        with pytest.raises(ConfigError, match=r"'batch_size_test' in .*typo\.yaml.*did you mean 'batch_size_tset'"):
            load_config(path, task="retrieval")


# --- an entry script --------------------------------------------------------------------------------


def _run_retrieval(config: Path, output_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "Retrieval.py", "--config", str(config), "--output_dir", str(output_dir),
           "--text_encoder", "configs/demo_vocab.txt", "--device", "cpu", "--num_workers", "0"]
    return subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)


def test_script_with_a_wrong_type_fails_before_reading_data(tmp_path):
    missing = tmp_path / "no_such_dir"
    text = RETRIEVAL_DEMO.read_text()
    for old, new in (("demo_data/re_train.json", missing / "train.json"),
                     ("demo_data/re_val.json", missing / "val.json"),
                     ("demo_data/re_test.json", missing / "test.json"),
                     ("image_root: 'demo_data'", f"image_root: '{missing / 'images'}'")):
        assert old in text
        text = text.replace(old, str(new))
    good = tmp_path / "good.yaml"
    good.write_text(text)
    bad = tmp_path / "bad.yaml"
    assert "batch_size_train: 16\n" in text
    bad.write_text(text.replace("batch_size_train: 16\n", "batch_size_train: '16'\n"))

    result = _run_retrieval(bad, tmp_path / "out_bad")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert (f"configs.schema.ConfigError: config key 'batch_size_train' in {bad} has the wrong type: "
            "expected an integer, found str '16'") in output, output
    assert "Creating retrieval dataset" not in output and "FileNotFoundError" not in output
    assert not (tmp_path / "out_bad" / "config.yaml").exists()

    # the same config with the right type gets past the check and stops at the missing data
    result = _run_retrieval(good, tmp_path / "out_good")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "ConfigError" not in output and "Creating retrieval dataset" in output
    assert str(missing) in output, output
