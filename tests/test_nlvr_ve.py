"""NLVR2 and SNLI-VE: the shared cross-attention layout, the text-assignment pairing, checkpoint key
mappings against the recorded key lists, datasets, and ``Pretrain_NLVR.py`` / ``NLVR.py`` / ``VE.py``
end to end on a small demo dataset (one of them in two processes under gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from dataset.annotations import AnnotationError
from dataset.nlvr import NlvrDataset, create_nlvr_datasets
from dataset.ve import VeDataset, create_ve_datasets
from demo.data import generate_demo_data
from engine.checkpoint import load_checkpoint, load_checkpoint_into
from models.simla import classifier as classifier_model
from models.simla import nlvr as nlvr_model
from models.simla import pretrain_nlvr as pretrain_nlvr_model
from models.simla import ve as ve_model
from models.simla.checkpoint_keys import strip_bert_prefix
from optim import create_optimizer
from tests.parity import manifest_weight_decay_groups
from tests.script_helpers import free_port, script_env

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "data" / "parity"
MANIFESTS = PARITY / "manifests"
PYTHON = sys.executable
RUN_TIMEOUT = 300
DEMO_VOCAB = "configs/demo_vocab.txt"


def fixture_file(name: str) -> dict:
    return torch.load(PARITY / "fixtures" / f"{name}.pt", weights_only=True)


def tiny_config(name: str, **extra) -> dict:
    """The config of a parity fixture (tiny sizes; 12 ViT blocks and 12 BERT layers as full size)."""
    fx = fixture_file(name)
    return {**fx["config"], "bert_config": dict(fx["bert_config"]), "from_scratch": True, **extra}


def demo_config(path: str, **extra) -> dict:
    config = load_config(REPO / path)
    config["bert_config"] = str(REPO / config["bert_config"])
    config.update(extra)
    return config


# --- the two-image text encoder ---------------------------------------------------------------------------


def test_cross_attention_key_value_shared_in_layer_pairs():
    model = nlvr_model.SIMLA(config=tiny_config("nlvr"))
    for encoder_name in ("text_encoder", "text_encoder_m"):
        layers = getattr(model, encoder_name).encoder.layer
        assert len(layers) == 18
        for n in range(18):
            cross = layers[n].crossattention.self
            partner = layers[n + 1 if n % 2 == 0 else n - 1].crossattention.self
            for name in ("key", "value"):
                shared = getattr(cross, name).weight is getattr(partner, name).weight
                assert shared == (n >= 6), (encoder_name, n, name)
                assert (getattr(cross, name).bias is getattr(partner, name).bias) == (n >= 6)
            assert cross.query.weight is not partner.query.weight
            assert layers[n].crossattention.output.dense.weight is not \
                layers[n + 1 if n % 2 == 0 else n - 1].crossattention.output.dense.weight
    state = model.state_dict(keep_vars=True)
    names = dict(model.named_parameters())
    for n in range(6, 18, 2):
        for part in ("key.weight", "key.bias", "value.weight", "value.bias"):
            even = f"text_encoder.encoder.layer.{n}.crossattention.self.{part}"
            odd = f"text_encoder.encoder.layer.{n + 1}.crossattention.self.{part}"
            assert state[even] is state[odd]
            assert even in names and odd not in names
    assert "text_encoder.encoder.layer.4.crossattention.self.key.weight" in names
    assert "text_encoder.encoder.layer.5.crossattention.self.key.weight" in names


def test_layers_alternate_between_the_two_images():
    model = nlvr_model.SIMLA(config=tiny_config("nlvr", distill=False)).eval()
    seen: list[int] = []
    states = [torch.randn(2, 17, 32), torch.randn(2, 17, 32)]

    def record(module, args):
        seen.append(next(i for i, s in enumerate(states) if args[2] is s))

    for layer in model.text_encoder.encoder.layer:
        layer.crossattention.register_forward_pre_hook(record)
    ids = torch.tensor([[101, 200, 201], [101, 202, 0]])
    model.text_encoder(ids, attention_mask=(ids > 0).long(), encoder_hidden_states=states,
                       encoder_attention_mask=[torch.ones(2, 17), torch.ones(2, 17)], mode="multi_modal")
    assert seen == [i % 2 for i in range(18)]


def test_nlvr_layout_depth_and_split_are_configurable():
    model = nlvr_model.SIMLA(config=tiny_config("nlvr", nlvr_num_layers=6, nlvr_split_layer=2))
    layers = model.text_encoder.encoder.layer
    assert len(layers) == 6
    assert layers[2].crossattention.self.key.weight is layers[3].crossattention.self.key.weight
    assert layers[4].crossattention.self.value.bias is layers[5].crossattention.self.value.bias
    assert layers[0].crossattention.self.key.weight is not layers[1].crossattention.self.key.weight
    with pytest.raises(ValueError, match="must be even"):
        nlvr_model.nlvr_layout({"nlvr_num_layers": 7, "nlvr_split_layer": 2})
    with pytest.raises(ValueError, match="nlvr_split_layer"):
        nlvr_model.nlvr_layout({"nlvr_num_layers": 4, "nlvr_split_layer": 6})


def test_token_type_embeddings_only_in_the_two_image_encoder():
    nlvr = nlvr_model.SIMLA(config=tiny_config("nlvr", distill=False))
    ve = ve_model.SIMLA(config=tiny_config("ve", distill=False))
    assert "text_encoder.embeddings.token_type_embeddings.weight" in nlvr.state_dict()
    assert not any("token_type" in k for k in ve.state_dict())


def test_pretrained_bert_initialises_the_first_layers_then_keys_are_shared(tmp_path):
    """Without ``from_scratch`` a Hugging Face BERT folder initialises layers 0-11 (plus token types);
    layers 12-17 and the cross-attention keep the BERT initialisation; the momentum model is a copy."""
    from models.bert import BertModel, load_bert_config

    config = tiny_config("nlvr", from_scratch=False)
    torch.manual_seed(3)
    source = BertModel(load_bert_config(config["bert_config"], fusion_layer=12), layout="xbert")
    weights = {f"bert.{k}": v for k, v in source.state_dict().items()}
    weights["pooler.dense.weight"] = torch.zeros(32, 32)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    model = nlvr_model.SIMLA(text_encoder=str(tmp_path), config=config)
    state = model.state_dict()
    for key in ("embeddings.token_type_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.11.output.dense.weight"):
        assert torch.equal(state[f"text_encoder.{key}"], source.state_dict()[key]), key
        assert torch.equal(state[f"text_encoder_m.{key}"], source.state_dict()[key]), key
    layers = model.text_encoder.encoder.layer
    assert not torch.equal(layers[12].output.dense.weight, layers[11].output.dense.weight)
    assert layers[16].crossattention.self.key.weight is layers[17].crossattention.self.key.weight
    with pytest.raises(ValueError, match="text_encoder"):
        nlvr_model.SIMLA(config=config)


@pytest.mark.parametrize("path, task", [
    ("configs/NLVR.yaml", "nlvr"), ("configs/NLVR_Pretrain.yaml", "nlvr_pretrain"),
    ("configs/NLVR_pretrain.yaml", "nlvr_pretrain"), ("configs/VE.yaml", "ve"), ("configs/NLVR_demo.yaml", "nlvr"),
    ("configs/NLVR_Pretrain_demo.yaml", "nlvr_pretrain"), ("configs/VE_demo.yaml", "ve"),
])
def test_configs_load_without_warnings(path, task):
    """The shipped and demo configs validate; the original default name of ``Pretrain_NLVR.py``
    (``NLVR_pretrain.yaml``) finds ``NLVR_Pretrain.yaml``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(REPO / path, task=task)
    assert config["vit_mask_token"] is False


@pytest.mark.parametrize("name, module, sizes", [
    ("nlvr", nlvr_model, (379, 224)), ("pretrain_nlvr", pretrain_nlvr_model, (380, 226)), ("ve", ve_model, (295, 175)),
])
def test_optimizer_groups_match_the_full_size_manifest(name, module, sizes):
    """Weight-decay group sizes the original's rule gives for the full-size parameter names (the tiny
    models have the same module structure)."""
    model = module.SIMLA(config=tiny_config(name))
    optimizer = create_optimizer({"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02}, model)
    expected = manifest_weight_decay_groups(str(PARITY / "manifests" / f"{name}.json"))
    assert tuple(len(group["params"]) for group in optimizer.param_groups) == expected == sizes


def test_distillation_loss_formula():
    torch.manual_seed(0)
    pred, pred_m, targets = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    expected = 0.7 * F.cross_entropy(pred, targets) + 0.3 * F.cross_entropy(pred, F.softmax(pred_m, dim=1))
    torch.testing.assert_close(classifier_model.distillation_loss(pred, pred_m, targets, 0.3), expected)


def test_nlvr_checkpoint_loads_after_copying_momentum_by_default(tmp_path):
    """The original copies online -> momentum before loading (the checkpoint has no momentum weights);
    ``copy_momentum_after_load: true`` copies the loaded weights instead."""
    torch.manual_seed(0)
    source = pretrain_nlvr_model.SIMLA(config=tiny_config("nlvr", embed_dim=16))
    path = tmp_path / "pretrain_nlvr.pth"
    torch.save({"model": source.state_dict()}, path)
    key = "text_encoder.encoder.layer.3.attention.self.query.weight"
    for after in (False, True):
        torch.manual_seed(1)
        model = nlvr_model.SIMLA(config=tiny_config("nlvr", copy_momentum_after_load=after))
        initial = model.text_encoder.state_dict()[key.removeprefix("text_encoder.")].clone()
        with torch.no_grad():  # make the momentum model differ from the freshly built online one
            model.text_encoder_m.encoder.layer[3].attention.self.query.weight.add_(1.0)
        load_checkpoint_into(model, str(path), nlvr_model.checkpoint_filter_fn, "NLVR.py")
        state = model.state_dict()
        assert torch.equal(state[key], source.state_dict()[key])
        expected = source.state_dict()[key] if after else initial
        assert torch.equal(state[key.replace("text_encoder.", "text_encoder_m.")], expected)


# --- text-assignment pairing -----------------------------------------------------------------------------


def test_pairing_replays_the_recorded_draws(monkeypatch):
    """The draws of the recorded run, replayed in the original's order, give its pairs and classes."""
    inputs = fixture_file("pretrain_nlvr")["inputs"]
    uniforms = list(inputs["random_uniform_draws"])
    draws = [list(d) for d in inputs["multinomial_draws"]]
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.tensor([uniforms.pop(0)]))

    def multinomial(weights, count, *args, **kwargs):
        values = draws.pop(0)
        assert len(values) == count and all(weights[v] > 0 for v in values)
        return torch.tensor(values)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    weights = torch.full((4, 4), 1 / 3).fill_diagonal_(0)
    slot0, slot1, labels = pretrain_nlvr_model.pair_images(weights)
    assert not uniforms and not draws
    assert torch.equal(slot0, inputs["pair_image_index_0"])
    assert torch.equal(slot1, inputs["pair_image_index_1"])
    assert torch.equal(labels, inputs["pair_labels"])


def test_pairing_class_frequencies_and_slots():
    torch.manual_seed(0)
    weights = torch.full((6, 6), 0.2).fill_diagonal_(0)
    counts = torch.zeros(3)
    for _ in range(200):
        slot0, slot1, labels = pretrain_nlvr_model.pair_images(weights)
        own = torch.arange(6)
        assert torch.equal(slot0[labels == 0], own[labels == 0])
        assert torch.equal(slot1[labels == 1], own[labels == 1])
        assert not (slot0 == slot1).any()
        neither = labels == 2
        assert not (slot0[neither] == own[neither]).any() and not (slot1[neither] == own[neither]).any()
        counts += torch.bincount(labels, minlength=3)
    # 2/3 one own image (half in each slot), 1/3 neither
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.04)
    with pytest.raises(ValueError, match="at least 3 images"):
        pretrain_nlvr_model.pair_images(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


# --- checkpoint key mappings against the recorded lists --------------------------------------------------


def manifest_shapes(name: str) -> dict[str, list]:
    return json.loads((MANIFESTS / f"{name}.json").read_text())["state_dict"]


def check_recorded_mapping(script: str, source: dict[str, list], target: dict[str, list], mapping,
                           resized: tuple[str, ...] = ()) -> None:
    """Apply ``mapping`` to the source keys (each value is its own source key) and compare the loaded,
    renamed, missing and unexpected keys and the shapes with the recorded ones."""
    recorded = json.loads((MANIFESTS / "checkpoint_key_mapping.json").read_text())[script]
    mapped = mapping({key: key for key in source})
    loaded = [k for k in mapped if k in target]
    assert len(loaded) == recorded["loaded_count"]
    assert sorted(k for k in target if k not in mapped) == sorted(recorded["missing_keys"])
    assert sorted(k for k in mapped if k not in target) == sorted(recorded["unexpected_keys"])
    renamed = {k: mapped[k] for k in loaded if mapped[k] != k}
    assert renamed == recorded["renamed_target_key_from_source_key"]
    assert len(loaded) - len(renamed) == recorded["loaded_unchanged_count"]
    wrong = [k for k in loaded if source[mapped[k]] != target[k] and k not in resized]
    assert not wrong, wrong[:5]


def test_pretrain_nlvr_mapping_matches_the_recorded_keys():
    check_recorded_mapping("Pretrain_NLVR.py", manifest_shapes("pretrain"), manifest_shapes("pretrain_nlvr"),
                           pretrain_nlvr_model.pretrain_to_nlvr_state_dict)


def test_nlvr_mapping_matches_the_recorded_keys():
    check_recorded_mapping("NLVR.py", manifest_shapes("pretrain_nlvr"), manifest_shapes("nlvr"), dict,
                           resized=("visual_encoder.pos_embed",))


def test_ve_mapping_matches_the_recorded_keys():
    check_recorded_mapping("VE.py", manifest_shapes("pretrain"), manifest_shapes("ve"), strip_bert_prefix,
                           resized=("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"))


def test_layer_duplication_follows_the_model_depth():
    source = {f"text_encoder.bert.encoder.layer.{i}.output.dense.weight": torch.full((1,), float(i))
              for i in range(4)}
    mapped = pretrain_nlvr_model.pretrain_to_nlvr_state_dict(source, num_layers=6, split_layer=2)
    assert {k.split(".")[3]: float(v) for k, v in mapped.items()} == {
        "0": 0.0, "1": 1.0, "2": 2.0, "3": 2.0, "4": 3.0, "5": 3.0}
    with pytest.raises(ValueError, match="nlvr_num_layers: 6"):
        pretrain_nlvr_model.pretrain_to_nlvr_state_dict(source, num_layers=18, split_layer=2)


# --- datasets ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> dict[str, str]:
    return generate_demo_data(tmp_path_factory.mktemp("nlvr_ve_demo"), num_train_images=16, num_test_images=6,
                              image_size=64)


def test_datasets_read_the_demo_files(demo_data):
    nlvr_config = demo_config("configs/NLVR_demo.yaml", image_root=demo_data["image_root"],
                              train_file=[demo_data["nlvr_train"]], val_file=[demo_data["nlvr_val"]],
                              test_file=[demo_data["nlvr_test"]])
    train, val, test = create_nlvr_datasets(nlvr_config)
    assert (len(train), len(val), len(test)) == (16, 3, 3)
    image0, image1, sentence, label = train[0]
    entry = json.loads(Path(demo_data["nlvr_train"]).read_text())[0]
    assert image0.shape == image1.shape == (3, 64, 64)
    assert label == (1 if entry["label"] == "True" else 0) and sentence == entry["sentence"]
    labels = [train[i][3] for i in range(len(train))]
    assert sorted(set(labels)) == [0, 1]

    ve_config = demo_config("configs/VE_demo.yaml", image_root=demo_data["ve_image_root"],
                            train_file=demo_data["ve_train"], val_file=demo_data["ve_val"],
                            test_file=demo_data["ve_test"])
    train, val, test = create_ve_datasets(ve_config)
    assert (len(train), len(val), len(test)) == (48, 9, 9)
    entries = json.loads(Path(demo_data["ve_train"]).read_text())
    image, sentence, label = val[0]
    assert image.shape == (3, 64, 64)
    assert [train[i][2] for i in range(3)] == [{"entailment": 2, "neutral": 1, "contradiction": 0}[e["label"]]
                                              for e in entries[:3]]


def test_datasets_reject_bad_entries(tmp_path):
    bad_nlvr = tmp_path / "nlvr.json"
    bad_nlvr.write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": "x", "label": True}]))
    with pytest.raises(AnnotationError, match=r"nlvr.json: entry 0 field 'label'.*True"):
        NlvrDataset([str(bad_nlvr)], lambda img: img, str(tmp_path))
    bad_nlvr.write_text(json.dumps([{"images": ["a.png"], "sentence": "x", "label": "True"}]))
    with pytest.raises(AnnotationError, match="two image paths"):
        NlvrDataset([str(bad_nlvr)], lambda img: img, str(tmp_path))
    bad_ve = tmp_path / "ve.json"
    bad_ve.write_text(json.dumps([{"image": "1", "sentence": "x", "label": "entails"}]))
    with pytest.raises(AnnotationError, match=r"ve.json: entry 0 field 'label'.*'entails'"):
        VeDataset(str(bad_ve), lambda img: img, str(tmp_path))
    bad_ve.write_text(json.dumps([{"image": "1", "label": "neutral"}]))
    with pytest.raises(AnnotationError, match="no field 'sentence'"):
        VeDataset(str(bad_ve), lambda img: img, str(tmp_path))


# --- the scripts end to end ------------------------------------------------------------------------------


def run_script(args: list[str], processes: int = 1) -> str:
    """Run an entry script (two processes: ``torch.distributed.launch --use_env``); return its output."""
    for attempt in range(2):
        launcher = [PYTHON] if processes == 1 else [
            PYTHON, "-m", "torch.distributed.launch", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", "--use_env"]
        proc = subprocess.Popen([*launcher, *args, "--device", "cpu", "--num_workers", "0",
                                 "--text_encoder", DEMO_VOCAB], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{' '.join(args)} did not finish in {RUN_TIMEOUT} s:\n{output[-6000:]}")
        if proc.returncode == 0 or attempt or "ddress already in use" not in output:
            break
    assert proc.returncode == 0, output[-6000:]
    return output


def read_log(output_dir: Path) -> tuple[list[dict], str]:
    """The JSON lines of ``log.txt`` and its unterminated last line (``best epoch: N``), if any."""
    text = (output_dir / "log.txt").read_text()
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1]], lines[-1]


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pretraining-format checkpoint of the demo model (random weights)."""
    from models.simla.pretrain import SIMLA
    from models.tokenization import build_tokenizer

    torch.manual_seed(0)
    model = SIMLA(tokenizer=build_tokenizer(str(REPO / DEMO_VOCAB)),
                  config=demo_config("configs/Pretrain_demo.yaml"))
    path = tmp_path_factory.mktemp("pretrain_ckpt") / "checkpoint_07.pth"
    state = model.state_dict()
    torch.save({"model": state, "epoch": 7}, path)
    return path, state


@pytest.fixture(scope="module")
def pretrain_nlvr_run(demo_data, pretrain_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """Pretrain_NLVR.py for one epoch in two processes, with learning rate 0 so that the checkpoint
    holds exactly the mapped pretraining weights."""
    output_dir = tmp_path_factory.mktemp("pretrain_nlvr")
    output = run_script(["Pretrain_NLVR.py", "--config", "configs/NLVR_Pretrain_demo.yaml", "--output_dir",
                         str(output_dir), "--checkpoint", str(pretrain_checkpoint[0]), "--overrides",
                         f"train_file=[{demo_data['pretrain']}]", "batch_size=4", "schedular.epochs=1",
                         "optimizer.lr=0", "schedular.warmup_lr=0", "schedular.min_lr=0"], processes=2)
    return output_dir, output


def test_pretrain_nlvr_two_processes(pretrain_nlvr_run, pretrain_checkpoint):
    output_dir, output = pretrain_nlvr_run
    assert "| distributed init (rank 1): env://" in output
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint_00.pth", "config.yaml", "log.txt"]
    log, last = read_log(output_dir)
    assert last == "" and len(log) == 1 and list(log[0]) == ["train_lr", "train_loss", "epoch"]
    assert re.fullmatch(r"\d+\.\d{3}", log[0]["train_loss"]) and log[0]["epoch"] == 0
    # 16 captions, 4 per process and step: 2 iterations
    assert re.search(r"Train Epoch: \[0\]  \[1/2\]", output)
    checkpoint = load_checkpoint(output_dir / "checkpoint_00.pth")
    assert list(checkpoint)[:5] == ["model", "optimizer", "lr_scheduler", "config", "epoch"]
    assert checkpoint["config"]["nlvr_num_layers"] == 6 and checkpoint["epoch"] == 0
    state, source = checkpoint["model"], pretrain_checkpoint[1]
    model = pretrain_nlvr_model.SIMLA(config=demo_config("configs/NLVR_Pretrain_demo.yaml"))
    assert list(state) == list(model.state_dict())
    # layers 0-1 keep their index, layer 2 -> 2 and 3, layer 3 -> 4 and 5 (learning rate 0: unchanged)
    for target, origin in {0: 0, 1: 1, 2: 2, 3: 2, 4: 3, 5: 3}.items():
        for part in ("attention.self.query.weight", "crossattention.self.key.weight", "output.LayerNorm.bias"):
            assert torch.equal(state[f"text_encoder.encoder.layer.{target}.{part}"],
                               source[f"text_encoder.bert.encoder.layer.{origin}.{part}"]), (target, part)
    assert torch.equal(state["visual_encoder.blocks.3.mlp.fc2.weight"], source["visual_encoder.blocks.3.mlp.fc2.weight"])
    assert torch.equal(state["text_encoder.embeddings.word_embeddings.weight"],
                       source["text_encoder.bert.embeddings.word_embeddings.weight"])


@pytest.fixture(scope="module")
def script_data(demo_data, tmp_path_factory) -> dict[str, str]:
    """The demo data with val splits holding each input once per label, next to each other (in one
    evaluation batch): whatever the model predicts, the val accuracy is 1/2 (NLVR2) or 1/3 (SNLI-VE), so
    it beats the initial best of 0 and the best checkpoint is always written."""
    folder = tmp_path_factory.mktemp("val_every_label")
    data = dict(demo_data)
    for split, labels in (("nlvr_val", ("True", "False")), ("ve_val", ("entailment", "neutral", "contradiction"))):
        entries = json.loads(Path(demo_data[split]).read_text())[:4]
        path = folder / f"{split}.json"
        path.write_text(json.dumps([dict(entry, label=label) for entry in entries for label in labels]))
        data[split] = str(path)
    return data


@pytest.fixture(scope="module")
def nlvr_run(script_data, pretrain_nlvr_run, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("nlvr")
    run_script(["NLVR.py", "--config", "configs/NLVR_demo.yaml", "--output_dir", str(output_dir),
                "--checkpoint", str(pretrain_nlvr_run[0] / "checkpoint_00.pth"), "--overrides",
                *nlvr_overrides(script_data), "schedular.epochs=1"])
    return output_dir


def nlvr_overrides(demo_data: dict[str, str]) -> list[str]:
    return [f"train_file=[{demo_data['nlvr_train']}]", f"val_file=[{demo_data['nlvr_val']}]",
            f"test_file=[{demo_data['nlvr_test']}]", f"image_root={demo_data['image_root']}", "batch_size=4",
            "distill=true"]


def test_nlvr_trains_evaluates_and_reloads(nlvr_run, script_data, tmp_path):
    log, last = read_log(nlvr_run)
    assert len(log) == 1 and list(log[0]) == ["train_lr", "train_loss", "val_acc", "test_acc", "epoch"]
    assert all(re.fullmatch(r"\d\.\d{4}", log[0][k]) for k in ("train_lr", "train_loss", "val_acc", "test_acc"))
    assert last == "best epoch: 0"
    # a checkpoint when the val accuracy improved on 0, which the val split guarantees
    assert log[0]["val_acc"] == "0.5000"
    assert (nlvr_run / "checkpoint_00.pth").is_file()
    checkpoint = load_checkpoint(nlvr_run / "checkpoint_00.pth")
    model = nlvr_model.SIMLA(config=demo_config("configs/NLVR_demo.yaml", distill=True))
    assert list(checkpoint["model"]) == list(model.state_dict())
    assert checkpoint["model"]["text_encoder_m.encoder.layer.4.crossattention.self.key.weight"].data_ptr() == \
        checkpoint["model"]["text_encoder_m.encoder.layer.5.crossattention.self.key.weight"].data_ptr()
    # fine-tuning again from it with learning rate 0 evaluates the same weights
    again = tmp_path / "again"
    run_script(["NLVR.py", "--config", "configs/NLVR_demo.yaml", "--output_dir", str(again), "--checkpoint",
                str(nlvr_run / "checkpoint_00.pth"), "--overrides", *nlvr_overrides(script_data), "schedular.epochs=1",
                "optimizer.lr=0", "schedular.warmup_lr=0", "schedular.min_lr=0"])
    log_again, _ = read_log(again)
    assert (log_again[0]["val_acc"], log_again[0]["test_acc"]) == (log[0]["val_acc"], log[0]["test_acc"])


def ve_overrides(demo_data: dict[str, str]) -> list[str]:
    return [f"train_file={demo_data['ve_train']}", f"val_file={demo_data['ve_val']}",
            f"test_file={demo_data['ve_test']}", f"image_root={demo_data['ve_image_root']}",
            "batch_size_train=8", "batch_size_test=3"]


def test_ve_trains_then_evaluates_its_checkpoint(script_data, pretrain_checkpoint, tmp_path):
    train_dir = tmp_path / "ve"
    output = run_script(["VE.py", "--config", "configs/VE_demo.yaml", "--output_dir", str(train_dir),
                         "--checkpoint", str(pretrain_checkpoint[0]), "--overrides", *ve_overrides(script_data),
                         "schedular.epochs=1"])
    # 48 hypotheses in batches of 8
    assert re.search(r"Train Epoch: \[0\]  \[5/6\]", output)
    log, last = read_log(train_dir)
    assert len(log) == 1 and list(log[0]) == ["train_lr", "train_loss", "val_acc", "test_acc", "epoch"]
    assert last == "best epoch: 0" and log[0]["val_acc"] == "0.3333"
    checkpoint = load_checkpoint(train_dir / "checkpoint_best.pth")
    assert checkpoint["epoch"] == 0 and list(checkpoint["model"]) == list(
        ve_model.SIMLA(config=demo_config("configs/VE_demo.yaml")).state_dict())
    # the loaded pretraining weights were renamed (bert. removed) and trained from there
    assert not any("bert." in k for k in checkpoint["model"])

    eval_dir = tmp_path / "ve_eval"
    output = run_script(["VE.py", "--config", "configs/VE_demo.yaml", "--output_dir", str(eval_dir),
                         "--checkpoint", str(train_dir / "checkpoint_best.pth"), "--evaluate", "--overrides",
                         *ve_overrides(script_data)])
    assert "Train Epoch" not in output
    eval_log, last = read_log(eval_dir)
    assert eval_log == [{"val_acc": log[0]["val_acc"], "test_acc": log[0]["test_acc"], "epoch": 0}]
    assert last == "best epoch: 0"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["config.yaml", "log.txt"]
