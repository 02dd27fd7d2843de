"""Retrieval: datasets, model details, checkpoint mapping, the de-duplicated evaluation, and end-to-end
runs of ``Retrieval.py`` / ``zero_shot_retrieval.py`` (one process and two gloo processes) on a small
demo dataset, starting from a pretraining checkpoint in the original key layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import load_config
from dataset.annotations import AnnotationError
from dataset.retrieval import RetrievalEvalDataset, RetrievalTrainDataset
from engine.checkpoint import CheckpointLoad, load_checkpoint, load_filtered_state, prepare_state
from engine.retrieval_eval import (
    RetrievalFeatures,
    gather_shards,
    itm_eval,
    per_query_scores,
    rerank,
    shard_bounds,
    unique_pairs,
)
from models.simla import pretrain as pretrain_model
from models.simla.checkpoint_keys import strip_bert_prefix
from models.simla.retrieval import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from tests.script_helpers import free_port, script_env

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PARITY = REPO / "tests" / "data" / "parity"
DEMO_VOCAB = str(REPO / "configs" / "demo_vocab.txt")
RUN_TIMEOUT = 300

METRICS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]
TRAIN_LOG_KEYS = ["train_lr", "train_loss_itm", "train_loss_ita", *[f"test_{m}" for m in METRICS], "epoch"]
EVAL_LOG_KEYS = [*[f"test_{m}" for m in METRICS], "epoch"]
BATCH = 8  # per process; 80 demo captions give 10 (one process) or 5 (two processes) steps


# --- shared set-up ------------------------------------------------------------------------------------------


def demo_config(**extra) -> dict:
    config = load_config(str(REPO / "configs" / "Retrieval_demo.yaml"), task="retrieval")
    config.update(bert_config=str(REPO / "configs" / "demo_bert.json"), **extra)
    return config


def tiny_model(**extra) -> SIMLA:
    torch.manual_seed(0)
    return SIMLA(config=demo_config(**extra)).eval()


def pretraining_state() -> dict[str, torch.Tensor]:
    """State of a randomly initialised demo-size pretraining model (the original pretraining layout)."""
    config = load_config(str(REPO / "configs" / "Pretrain_demo.yaml"), task="pretrain")
    config["bert_config"] = str(REPO / "configs" / "demo_bert.json")
    torch.manual_seed(1)
    model = pretrain_model.SIMLA(tokenizer=build_tokenizer(DEMO_VOCAB), config=config)
    return model.state_dict()


def _write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


# --- datasets -----------------------------------------------------------------------------------------


def test_train_dataset_numbers_images_by_first_appearance(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    entries = [{"image": "a.png", "caption": "A Red, square!", "image_id": "x"},
               {"image": "a.png", "caption": "red", "image_id": 17},
               {"image": "a.png", "caption": "another red", "image_id": "x"},
               {"image": "a.png", "caption": "list id", "image_id": [1, 2]}]
    dataset = RetrievalTrainDataset([_write(tmp_path / "t.json", entries)], lambda img: torch.zeros(1),
                                    str(tmp_path))
    assert [dataset[i][2] for i in range(4)] == [0, 1, 0, 2]
    assert dataset[0][1] == "a red square"


def test_train_dataset_errors_name_file_entry_and_field(tmp_path):
    path = _write(tmp_path / "bad.json", [{"image": "a.png", "caption": "x", "image_id": 1},
                                          {"image": "b.png", "caption": "y"}])
    with pytest.raises(AnnotationError, match=r"bad\.json: entry 1 has no field 'image_id'"):
        RetrievalTrainDataset([path], lambda img: img, str(tmp_path))
    path = _write(tmp_path / "bad2.json", [{"image": "a.png", "caption": ["x"], "image_id": 1}])
    with pytest.raises(AnnotationError, match=r"bad2\.json: entry 0 has a list 'caption'"):
        RetrievalTrainDataset([path], lambda img: img, str(tmp_path))


def test_eval_dataset_index_maps(tmp_path):
    entries = [{"image": "a.png", "caption": ["One.", "Two"]}, {"image": "b.png", "caption": "three"},
               {"image": "c.png", "caption": ["four", "five", "six"]}]
    dataset = RetrievalEvalDataset(_write(tmp_path / "e.json", entries), lambda img: img, str(tmp_path))
    assert len(dataset) == 3
    assert dataset.text == ["one", "two", "three", "four", "five", "six"]
    assert dataset.img2txt == {0: [0, 1], 1: [2], 2: [3, 4, 5]}
    assert dataset.txt2img == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
    bad = _write(tmp_path / "bad.json", [{"image": "a.png", "caption": [1, 2]}])
    with pytest.raises(AnnotationError, match=r"bad\.json: entry 0 'caption' must be a list of strings"):
        RetrievalEvalDataset(bad, lambda img: img, str(tmp_path))


# --- model --------------------------------------------------------------------------------------------


def _train_step(model: SIMLA, idx: list[int]) -> None:
    tokenizer = build_tokenizer(DEMO_VOCAB)
    torch.manual_seed(2)
    text = tokenizer(["a red circle", "two blue squares", "a star", "a green cross"][: len(idx)],
                     padding="longest", return_tensors="pt")
    model.train()
    model(torch.randn(len(idx), 3, 64, 64), text, alpha=0.4, idx=torch.tensor(idx))


def test_idx_queue_is_never_written_unless_enqueue_idx():
    original = tiny_model(queue_size=8)
    _train_step(original, [3, 5, 3, 9])
    assert torch.equal(original.idx_queue, torch.full((1, 8), -100))
    assert int(original.queue_ptr) == 4

    fixed = tiny_model(queue_size=8, enqueue_idx=True)
    _train_step(fixed, [3, 5, 3, 9])
    assert fixed.idx_queue.tolist() == [[3, 5, 3, 9, -100, -100, -100, -100]]


def test_negative_sampling_refuses_a_batch_of_one_image():
    model = tiny_model(queue_size=8)
    with pytest.raises(ValueError, match="belongs to the same image id"):
        _train_step(model, [4, 4])


def test_zero_shot_model_has_no_idx_queue():
    model = SIMLA(config=demo_config(), idx_queue=False)
    keys = set(model.state_dict())
    assert "idx_queue" not in keys and set(SIMLA(config=demo_config()).state_dict()) - keys == {"idx_queue"}


# --- checkpoint mapping -------------------------------------------------------------------------------


def prepare(source: dict, model: SIMLA) -> tuple[dict, CheckpointLoad]:
    """The state the model would load from ``source`` and its key report (nothing is loaded)."""
    filtered = prepare_state(source, model, checkpoint_filter_fn)
    state, own = filtered.state_dict, model.state_dict()
    return state, CheckpointLoad([k for k in own if k not in state], [k for k in state if k not in own],
                                 filtered.renamed, filtered.dropped)


def load(model: SIMLA, source: dict, path: str, script: str) -> CheckpointLoad:
    return load_filtered_state(model, prepare_state(source, model, checkpoint_filter_fn), path, script)


def _mapping(script: str) -> dict:
    with open(PARITY / "manifests" / "checkpoint_key_mapping.json") as handle:
        return json.load(handle)[script]


def test_pretraining_checkpoint_loads_with_the_expected_key_families():
    source = pretraining_state()
    model = SIMLA(config=demo_config())
    report = load(model, source, "pretrain.pth", "Retrieval.py")
    expected = _mapping("Retrieval.py")
    # the demo model has the same module names as the full-size one, only fewer layers
    assert report.missing_keys == expected["missing_keys"] == ["idx_queue"]
    assert sorted(report.unexpected_keys) == sorted(expected["unexpected_keys"])
    assert report.renamed == {k.replace("bert.", ""): k for k in source if "bert." in k}
    assert set(report.renamed.items()) <= set(expected["renamed_target_key_from_source_key"].items())
    state = model.state_dict()
    assert torch.equal(state["text_encoder.encoder.layer.3.crossattention.self.key.weight"],
                       source["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"])
    assert torch.equal(state["text_encoder_m.embeddings.word_embeddings.weight"],
                       source["text_encoder_m.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(state["image_queue"], source["image_queue"])
    assert torch.equal(state["idx_queue"], torch.full_like(state["idx_queue"], -100))


def test_position_embeddings_are_interpolated_for_another_resolution():
    source = pretraining_state()
    model = SIMLA(config=demo_config(image_res=96))
    state, _ = prepare(source, model)
    for name in ("visual_encoder", "visual_encoder_m"):
        pos = state[f"{name}.pos_embed"]
        assert pos.shape == (1, 37, 64)
        assert torch.equal(pos[:, 0], source[f"{name}.pos_embed"][:, 0])


def test_zero_shot_drops_what_the_model_lacks_and_loads_strictly():
    source = pretraining_state()
    model = SIMLA(config=demo_config(), idx_queue=False)
    report = load(model, source, "pretrain.pth", "zero_shot_retrieval.py")
    expected = _mapping("zero_shot_retrieval.py")
    assert report.missing_keys == [] and report.unexpected_keys == expected["unexpected_keys"] == []
    assert sorted(report.dropped_keys) == sorted(_mapping("Retrieval.py")["unexpected_keys"])
    # the strict load fails with the offending key named when the checkpoint lacks an entry
    del source["itm_head.weight"]
    with pytest.raises(ValueError, match="itm_head.weight"):
        load(SIMLA(config=demo_config(), idx_queue=False), source, "p.pth",
                                  "zero_shot_retrieval.py")


def test_full_size_key_mapping_matches_the_recorded_one():
    """On the meta device: the 4M pretraining layout into the COCO retrieval model, per script."""
    from tests.parity import build_task_model, manifest_config

    def config_of(name: str) -> dict:
        with open(PARITY / "manifests" / f"{name}.json") as handle:
            return manifest_config(json.load(handle))

    with torch.device("meta"):
        source = build_task_model("pretrain", config_of("pretrain"), 30522).state_dict()
        target_config = config_of("retrieval_coco")
        retrieval = build_task_model("retrieval_coco", target_config, 30522)
        zero_shot = SIMLA(config=dict(target_config, from_scratch=True), idx_queue=False)
        for script, model in (("Retrieval.py", retrieval), ("zero_shot_retrieval.py", zero_shot)):
            expected = _mapping(script)
            state, report = prepare(source, model)
            assert report.renamed == expected["renamed_target_key_from_source_key"]
            loaded = [k for k in state if k in retrieval.state_dict()]
            assert len(loaded) == expected["loaded_count"]
            assert len([k for k in loaded if k not in report.renamed]) == expected["loaded_unchanged_count"]
            assert [k for k in retrieval.state_dict() if k not in state] == expected["missing_keys"]
            assert sorted(report.unexpected_keys) == sorted(expected["unexpected_keys"])
            assert state["visual_encoder.pos_embed"].shape == (1, 577, 768)
        # a Retrieval.py (COCO-finetuned) checkpoint loads as it is
        expected = _mapping("Retrieval.py (COCO-finetuned checkpoint)")
        state, report = prepare(retrieval.state_dict(), retrieval)
        assert report.renamed == expected["renamed_target_key_from_source_key"] == {}
        assert report.missing_keys == report.unexpected_keys == []
        assert len(state) == expected["loaded_count"] == expected["loaded_unchanged_count"]


def test_one_filter_renames_and_the_model_decides_strictness():
    source = {"text_encoder.bert.x": torch.zeros(1), "temp": torch.zeros(())}
    filtered = checkpoint_filter_fn(source, SIMLA(config=demo_config()))
    assert list(filtered.state_dict) == ["text_encoder.x", "temp"]
    assert filtered.renamed == {"text_encoder.x": "text_encoder.bert.x"} and not filtered.strict
    with pytest.raises(ValueError, match="both map to 'text_encoder.x'"):
        strip_bert_prefix({"text_encoder.bert.x": torch.zeros(1), "text_encoder.x": torch.zeros(1)})
    # the model built without an idx_queue (zero-shot evaluation) loads strictly what it has a key for
    zero_shot = checkpoint_filter_fn(source, SIMLA(config=demo_config(), idx_queue=False))
    assert zero_shot.strict and list(zero_shot.state_dict) == ["temp"] and zero_shot.dropped == ["text_encoder.x"]


# --- evaluation ---------------------------------------------------------------------------------------


def _features(model: SIMLA, num_images: int, num_texts: int, seed: int = 5) -> RetrievalFeatures:
    """Encoded random images and captions of 3 to 29 tokens (the inputs of re-ranking)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, 64, 64, generator=generator)
    lengths = torch.randint(3, 30, (num_texts,), generator=generator)
    ids = torch.randint(104, 559, (num_texts, 30), generator=generator)
    ids[:, 0] = 101
    mask = (torch.arange(30) < lengths[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        image_feats, image_embeds = model.image_features(images)
        _, text_embeds = model.text_features(ids, mask)
    return RetrievalFeatures(ids, mask, text_embeds, image_embeds, image_feats)


def test_each_pair_is_scored_once_and_matrices_equal_the_per_query_procedure():
    model = tiny_model()
    features = _features(model, num_images=10, num_texts=30)
    k_test = 6
    pairs_seen: list[int] = []
    hook = model.itm_head.register_forward_pre_hook(lambda module, args: pairs_seen.append(args[0].shape[0]))
    try:
        scores = rerank(model, features, k_test, batch_size=16)
        deduplicated = sum(pairs_seen)
        passes = len(pairs_seen)
        pairs_seen.clear()
        reference = per_query_scores(model, features.image_feats, features.image_embeds, features.text_ids,
                                     features.text_mask, features.text_embeds, k_test)
    finally:
        hook.remove()
    # the pairs of both directions' candidate lists, counted independently of the implementation
    sims = features.image_embeds @ features.text_embeds.t()
    i2t = {(i, int(t)) for i in range(10) for t in sims[i].topk(k_test).indices}
    t2i = {(int(i), t) for t in range(30) for i in sims[:, t].topk(k_test).indices}
    assert i2t & t2i, "the example must have pairs in both directions' lists"
    assert deduplicated == scores.num_pairs == len(i2t | t2i) < len(i2t) + len(t2i)
    assert sum(pairs_seen) == scores.num_candidates == (10 + 30) * k_test
    assert passes == -(-len(i2t | t2i) // 16) and len(pairs_seen) == 10 + 30
    np.testing.assert_allclose(scores.score_i2t, reference[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scores.score_t2i, reference[1], atol=1e-5, rtol=1e-5)
    assert (scores.score_i2t != -100).sum(axis=1).tolist() == [k_test] * 10
    assert (scores.score_t2i != -100).sum(axis=1).tolist() == [k_test] * 30


def test_batch_size_and_similarity_blocks_do_not_change_the_result():
    from engine.retrieval_eval import topk_candidates

    model = tiny_model()
    features = _features(model, num_images=7, num_texts=21)
    first = rerank(model, features, 4, batch_size=1)
    for batch_size in (5, 256):
        other = rerank(model, features, 4, batch_size=batch_size)
        np.testing.assert_allclose(other.score_i2t, first.score_i2t, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(other.score_t2i, first.score_t2i, atol=1e-5, rtol=1e-5)
    whole = topk_candidates(features.image_embeds, features.text_embeds, 4)
    blocks = topk_candidates(features.image_embeds, features.text_embeds, 4, max_elements=2 * 21)
    assert torch.equal(whole[0], blocks[0])
    assert torch.equal(whole[1].sort(dim=1).values, blocks[1].sort(dim=1).values)
    with pytest.raises(ValueError, match="k_test = 8 exceeds the evaluation split"):
        rerank(model, features, 8)


def test_unique_pairs_and_shards():
    topk_i2t = torch.tensor([[0, 2], [1, 2]])  # 2 images, 3 texts
    topk_t2i = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert unique_pairs(topk_i2t, topk_t2i).tolist() == [0, 1, 2, 3, 4, 5]
    assert unique_pairs(topk_i2t, topk_t2i[:, :1]).tolist() == [0, 2, 4, 5]
    bounds = [shard_bounds(10, rank, 4) for rank in range(4)]
    assert bounds == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [shard_bounds(2, rank, 4) for rank in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    local = torch.arange(6.0).view(3, 2)
    assert gather_shards(local, 3) is local  # one process: nothing to gather


def test_itm_eval_ranks_and_recalls():
    # 2 images x 4 captions; image 0's captions are 0, 1; image 1's are 2, 3
    scores_i2t = np.array([[0.1, 3.0, 2.0, 1.0, ], [5.0, 4.0, 3.0, 2.0]])
    scores_t2i = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, -1.0]])
    result = itm_eval(scores_i2t, scores_t2i, [0, 0, 1, 1], [[0, 1], [2, 3]])
    # image 0: caption 1 first (rank 0); image 1: caption 2 at rank 2
    assert result["txt_r1"] == 50.0 and result["txt_r5"] == 100.0
    # captions 0 and 2 rank their image first, 1 and 3 second
    assert result["img_r1"] == 50.0 and result["img_r5"] == 100.0
    assert result["r_mean"] == (result["txt_r_mean"] + result["img_r_mean"]) / 2
    assert list(result) == METRICS


# --- end-to-end runs ----------------------------------------------------------------------------------


def run_script(name: str, data: dict[str, str], output_dir: Path, *flags: str, processes: int = 1,
               epochs: int = 1, test_file: str = "re_test", extra: tuple[str, ...] = ()) -> str:
    config = "configs/Retrieval_demo.yaml" if name == "Retrieval.py" else "configs/Retrieval_zero_shot_demo.yaml"
    overrides = [f"train_file=[{data['re_train']}]", f"val_file={data['re_val']}",
                 f"test_file={data[test_file]}", f"image_root={data['image_root']}",
                 f"batch_size_train={BATCH}", "batch_size_test=4", "queue_size=64", "k_test=2",
                 f"schedular.epochs={epochs}", "++itm_eval_batch_size=4", *extra]
    for attempt in range(2):
        launcher = [PYTHON]
        if processes > 1:
            launcher = [PYTHON, "-m", "torch.distributed.launch", f"--nproc_per_node={processes}",
                        f"--master_port={free_port()}", "--use_env"]
        cmd = [*launcher, name, "--config", config, "--output_dir", str(output_dir), "--text_encoder",
               DEMO_VOCAB, "--device", "cpu", "--num_workers", "0", *flags, "--overrides", *overrides]
        proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} did not finish in {RUN_TIMEOUT} s:\n{output[-6000:]}")
        if proc.returncode == 0 or "ddress already in use" not in output or attempt:
            break
    assert proc.returncode == 0, output[-6000:]
    return output


def read_log(output_dir: Path) -> tuple[list[dict], str]:
    """The JSON lines of log.txt and the trailing text after the last newline.

    ``best epoch: N`` ends without a newline, as in the original, so a resumed run's first line
    follows it on the same line."""
    text = (output_dir / "log.txt").read_text()
    *lines, tail = text.split("\n")
    return [json.loads(re.sub(r"^(best epoch: \d+)+", "", line)) for line in lines], tail


def check_metrics(line: dict, annotation_file: str) -> None:
    """What the logged recalls must be whatever the ranks: counts out of the images (text retrieval) or
    captions (image retrieval) in percent, growing with k, 100 at k >= the number of images, and means."""
    entries = json.loads(Path(annotation_file).read_text())
    counts = {"txt": len(entries), "img": sum(len(e["caption"]) for e in entries)}
    candidates = {"txt": counts["img"], "img": counts["txt"]}
    for side, queries in counts.items():
        recalls = [line[f"test_{side}_r{k}"] for k in (1, 5, 10)]
        for k, value in zip((1, 5, 10), recalls):
            hits = value * queries / 100
            assert isinstance(value, float) and abs(hits - round(hits)) < 1e-9, (side, k, value)
            if k >= candidates[side]:
                assert value == 100.0, (side, k, value)
        assert recalls == sorted(recalls)
        assert line[f"test_{side}_r_mean"] == pytest.approx(sum(recalls) / 3)
    assert line["test_r_mean"] == pytest.approx((line["test_txt_r_mean"] + line["test_img_r_mean"]) / 2)


def recalls_by_hand(score_i2t: np.ndarray, score_t2i: np.ndarray, annotation_file: str) -> dict[str, float]:
    """Recall@1/5/10 from score matrices, ranking as the original (``argsort`` reversed, ties included)."""
    entries = json.loads(Path(annotation_file).read_text())
    image_of = [i for i, entry in enumerate(entries) for _ in entry["caption"]]

    def rank(row: np.ndarray, wanted: list[int]) -> int:
        order = list(np.argsort(row)[::-1])
        return min(order.index(w) for w in wanted)

    ranks = {"txt": [rank(row, [t for t, i2 in enumerate(image_of) if i2 == i]) for i, row in enumerate(score_i2t)],
             "img": [rank(row, [image_of[t]]) for t, row in enumerate(score_t2i)]}
    return {f"{side}_r{k}": 100.0 * sum(r < k for r in values) / len(values)
            for side, values in ranks.items() for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    from demo.data import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("re_demo"), num_train_images=16, num_test_images=6,
                              image_size=64)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pretrained") / "pretrain.pth"
    torch.save({"model": pretraining_state()}, path)
    return str(path)


@pytest.fixture(scope="module")
def trained(data, pretrained, tmp_path_factory) -> tuple[Path, str]:
    output_dir = tmp_path_factory.mktemp("finetune")
    output = run_script("Retrieval.py", data, output_dir, "--checkpoint", pretrained)
    return output_dir, output


def test_finetune_one_process(trained, data):
    output_dir, output = trained
    assert "missing_keys=['idx_queue']" in output and "'mim_head.weight'" in output
    assert re.search(r"Evaluation:\s+\[\d+/\d+\].*pairs: \d+/\d+", output), "no re-ranking progress line"
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint_best.pth", "config.yaml", "log.txt"]
    lines, tail = read_log(output_dir)
    assert len(lines) == 1 and list(lines[0]) == TRAIN_LOG_KEYS and lines[0]["epoch"] == 0
    assert re.fullmatch(r"\d+\.\d{3}", lines[0]["train_loss_ita"])
    check_metrics(lines[0], data["re_test"])
    assert tail == "best epoch: 0"
    checkpoint = load_checkpoint(output_dir / "checkpoint_best.pth")
    assert list(checkpoint)[:5] == ["model", "optimizer", "lr_scheduler", "config", "epoch"]
    assert checkpoint["epoch"] == 0 and checkpoint["best_r_mean"] == lines[0]["test_r_mean"]
    assert checkpoint["config"]["freeze_visual_encoder"] is False
    assert "freeze_visual_encoder: false" in (output_dir / "config.yaml").read_text()
    assert "idx_queue" in checkpoint["model"] and "text_encoder.embeddings.word_embeddings.weight" in checkpoint["model"]


def test_resume_and_evaluate_a_saved_checkpoint(trained, data, tmp_path):
    output_dir, _ = trained
    first = load_checkpoint(output_dir / "checkpoint_best.pth")
    resumed = Path(shutil.copytree(output_dir, tmp_path / "resumed"))
    output = run_script("Retrieval.py", data, resumed, "--resume", "true", "--checkpoint",
                        str(resumed / "checkpoint_best.pth"), epochs=2)
    assert "Train Epoch: [0]" not in output and "Train Epoch: [1]" in output
    lines, tail = read_log(resumed)
    assert [line["epoch"] for line in lines] == [0, 1]
    steps = {int(s["step"]) for s in first["optimizer"]["state"].values()}
    if lines[1]["test_r_mean"] > lines[0]["test_r_mean"]:
        assert tail.endswith("best epoch: 1")
        saved = load_checkpoint(resumed / "checkpoint_best.pth")
        assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {2 * s for s in steps}
    else:
        assert tail.endswith("best epoch: 0")

    evaluated = tmp_path / "evaluated"
    output = run_script("Retrieval.py", data, evaluated, "--evaluate", "--checkpoint",
                        str(output_dir / "checkpoint_best.pth"))
    assert "Train Epoch" not in output and "_IncompatibleKeys(missing_keys=[], unexpected_keys=[])" in output
    lines_eval, tail = read_log(evaluated)
    assert len(lines_eval) == 1 and list(lines_eval[0]) == EVAL_LOG_KEYS and tail == "best epoch: 0"
    # the checkpoint holds the weights that gave the training run's evaluation
    assert {k: v for k, v in lines_eval[0].items()} == {k: v for k, v in read_log(output_dir)[0][0].items()
                                                       if k.startswith("test_") or k == "epoch"}
    assert not (evaluated / "checkpoint_best.pth").exists()


def test_two_processes_finetune_and_agree_with_one_process_evaluation(trained, data, tmp_path):
    output_dir, _ = trained
    two = tmp_path / "two"
    output = run_script("Retrieval.py", data, two, "--checkpoint", str(output_dir / "checkpoint_best.pth"),
                        processes=2)
    assert "| distributed init (rank 1): env://" in output
    lines, tail = read_log(two)
    assert len(lines) == 1 and list(lines[0]) == TRAIN_LOG_KEYS and tail == "best epoch: 0"
    assert load_checkpoint(two / "checkpoint_best.pth")["epoch"] == 0

    # the same evaluation split over two processes gives the same score matrices
    sims = {}
    for processes in (1, 2):
        folder = tmp_path / f"zs{processes}"
        run_script("zero_shot_retrieval.py", data, folder, "--evaluate", "--save_sims", "--checkpoint",
                   str(output_dir / "checkpoint_best.pth"), processes=processes, test_file="re_test2",
                   extra=(f"save_sims={folder / 'sims'}",))
        sims[processes] = {name: np.load(folder / "sims" / f"{name}.npy")
                           for name in ("sims_matrix", "score_matrix_i2t", "score_matrix_t2i")}
        logged = read_log(folder)[0][0]
        check_metrics(logged, data["re_test2"])
        expected = recalls_by_hand(sims[processes]["score_matrix_i2t"], sims[processes]["score_matrix_t2i"],
                                   data["re_test2"])
        assert {k: logged[f"test_{k}"] for k in expected} == pytest.approx(expected)
    for name, matrix in sims[1].items():
        np.testing.assert_allclose(sims[2][name], matrix, atol=1e-5, rtol=1e-5, err_msg=name)
    assert sims[1]["score_matrix_i2t"].shape == (6, 30) and sims[1]["score_matrix_t2i"].shape == (30, 6)


def test_zero_shot_from_the_pretraining_checkpoint_on_another_split(data, pretrained, tmp_path):
    output_dir = tmp_path / "zero_shot"
    output = run_script("zero_shot_retrieval.py", data, output_dir, "--checkpoint", pretrained,
                        test_file="re_test2", epochs=2)
    # strict load after dropping what the model lacks (idx_queue, MLM/MIM/keyword heads, mask tokens)
    assert "_IncompatibleKeys(missing_keys=[], unexpected_keys=[])" in output
    text = (output_dir / "log.txt").read_text()
    assert text.endswith("\n") and "best epoch" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    # without --evaluate the evaluation is repeated once per scheduler epoch, with the same result
    assert [line["epoch"] for line in lines] == [0, 1] and list(lines[0]) == EVAL_LOG_KEYS
    assert {k: v for k, v in lines[0].items() if k != "epoch"} == {k: v for k, v in lines[1].items() if k != "epoch"}
    check_metrics(lines[0], data["re_test2"])
    assert not any(p.suffix == ".npy" for p in output_dir.rglob("*"))
