"""Tests of the synthetic shapes demo dataset (demo/)."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from demo import data as demo
from demo.shapes import demo_words

REPO = Path(__file__).resolve().parents[1]
PUNCTUATION = ",.'!?\"()*#:;~"
SMALL = {"seed": 3, "num_train_images": 12, "num_test_images": 9, "image_size": 48}
N_TRAIN, N_TEST, SIZE = SMALL["num_train_images"], SMALL["num_test_images"], SMALL["image_size"]
N_VAL = N_TEST // 2


def _load(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return demo.generate_demo_data(tmp_path_factory.mktemp("demo") / "out", **SMALL)


def _words(text: str) -> list[str]:
    text = text.lower()
    for char in PUNCTUATION:
        text = text.replace(char, "")
    return text.replace("-", " ").replace("/", " ").split()


def _all_texts(paths: dict[str, str]) -> list[str]:
    texts: list[str] = list(_load(paths["answer_list"]))
    for key in ("pretrain", "re_train", "re_val", "re_test", "re_test2", "vqa_train", "vqa_test",
                "nlvr_train", "nlvr_val", "nlvr_test", "ve_train", "ve_val", "ve_test",
                "grounding_train", "grounding_test"):  # fmt: skip
        for entry in _load(paths[key]):
            for field in ("caption", "question", "answer", "sentence", "text"):
                value = entry.get(field)
                if value is not None:
                    texts.extend(value if isinstance(value, list) else [value])
    with open(paths["refs"], "rb") as f:
        for ref in pickle.load(f):
            for sentence in ref["sentences"]:
                texts += [sentence["sent"], sentence["raw"]]
    return texts


def _is_rel_image(root: str, rel: str) -> bool:
    return isinstance(rel, str) and not os.path.isabs(rel) and (Path(root) / rel).is_file()


def test_layout_and_images(data: dict[str, str]) -> None:
    root = Path(data["root"])
    for split, count in (("train", N_TRAIN), ("test", N_TEST), ("test2", N_TEST)):
        files = sorted((root / "images" / split).glob("*.png"))
        assert len(files) == count
        with Image.open(files[0]) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    for key, value in data.items():
        assert os.path.isabs(value), key
        assert Path(value).exists(), key
    assert Path(data["refs"]).name == "refs(unc).p"
    assert Path(data["refs"]).parent == Path(data["refcoco_data"]) / "refcoco+"
    manifest = _load(data["manifest"])
    assert manifest["arguments"]["seed"] == SMALL["seed"]
    assert all((root / rel).is_file() for rel in manifest["files"])


def test_pretrain(data: dict[str, str]) -> None:
    entries = _load(data["pretrain"])
    assert len(entries) == N_TRAIN
    kinds = set()
    for entry in entries:
        assert set(entry) == {"image", "caption"}
        assert os.path.isabs(entry["image"]) and Path(entry["image"]).is_file()
        caption = entry["caption"]
        kinds.add(type(caption))
        if isinstance(caption, list):
            assert caption and all(isinstance(c, str) and c for c in caption)
        else:
            assert isinstance(caption, str) and caption
    assert kinds == {str, list}


def test_retrieval(data: dict[str, str]) -> None:
    root = data["root"]
    train = _load(data["re_train"])
    assert len(train) == N_TRAIN * 5
    per_image = Counter(entry["image_id"] for entry in train)
    assert len(per_image) == N_TRAIN and set(per_image.values()) == {5}
    for entry in train:
        assert set(entry) == {"image", "caption", "image_id"}
        assert _is_rel_image(root, entry["image"]) and isinstance(entry["caption"], str)
        assert isinstance(entry["image_id"], (int, str))
    sizes = {"re_val": N_VAL, "re_test": N_TEST - N_VAL, "re_test2": N_TEST}
    for key, size in sizes.items():
        entries = _load(data[key])
        assert len(entries) == size
        for entry in entries:
            assert set(entry) == {"image", "caption"} and _is_rel_image(root, entry["image"])
            assert len(entry["caption"]) == 5 and len(set(entry["caption"])) == 5
    assert all("/test2/" in e["image"] for e in _load(data["re_test2"]))
    val_images = {e["image"] for e in _load(data["re_val"])}
    assert not val_images & {e["image"] for e in _load(data["re_test"])}


def test_vqa(data: dict[str, str]) -> None:
    root = data["root"]
    answer_list = _load(data["answer_list"])
    assert isinstance(answer_list, list) and len(set(answer_list)) == len(answer_list)
    train = _load(data["vqa_train"])
    sources = Counter(entry["dataset"] for entry in train)
    assert sources["vqa"] == N_TRAIN * 4 and set(sources) <= {"vqa", "vg"}
    for entry in train:
        assert isinstance(entry["question"], str) and entry["question"].endswith("?")
        assert _is_rel_image(root, entry["image"])
        if entry["dataset"] == "vqa":
            assert set(entry) == {"question", "image", "dataset", "answer"}
            answers = entry["answer"]
            assert len(answers) == 10 and all(a in answer_list for a in answers)
            assert Counter(answers).most_common(1)[0][1] >= 7
        else:
            assert isinstance(entry["answer"], str) and entry["answer"] in answer_list
    test = _load(data["vqa_test"])
    assert len(test) == N_TEST * 2
    assert [e["question_id"] for e in test] == list(range(len(test)))
    for entry in test:
        assert set(entry) == {"question", "image", "dataset", "question_id", "answer"}
        assert entry["dataset"] == "vqa" and _is_rel_image(root, entry["image"])
        assert len(entry["answer"]) == 10 and all(a in answer_list for a in entry["answer"])


def test_nlvr(data: dict[str, str]) -> None:
    root = data["root"]
    for key, size in (("nlvr_train", N_TRAIN), ("nlvr_val", N_VAL), ("nlvr_test", N_TEST - N_VAL)):
        entries = _load(data[key])
        assert len(entries) == size
        labels = Counter(entry["label"] for entry in entries)
        assert set(labels) == {"True", "False"} and abs(labels["True"] - labels["False"]) <= 1
        for entry in entries:
            assert set(entry) == {"images", "sentence", "label"}
            assert len(entry["images"]) == 2 and entry["images"][0] != entry["images"][1]
            assert all(_is_rel_image(root, path) for path in entry["images"])


def test_ve(data: dict[str, str]) -> None:
    ve_root = Path(data["ve_image_root"])
    for key, size in (("ve_train", N_TRAIN), ("ve_val", N_VAL), ("ve_test", N_TEST - N_VAL)):
        entries = _load(data[key])
        assert len(entries) == size * 3
        labels = Counter(entry["label"] for entry in entries)
        assert labels == {"entailment": size, "neutral": size, "contradiction": size}
        for entry in entries:
            assert set(entry) == {"image", "sentence", "label"}
            assert not entry["image"].endswith(".jpg") and "/" not in entry["image"]
            with Image.open(ve_root / f"{entry['image']}.jpg") as image:
                assert image.format == "JPEG" and image.size == (SIZE, SIZE)


def test_grounding(data: dict[str, str]) -> None:
    root = data["root"]
    train = _load(data["grounding_train"])
    test = _load(data["grounding_test"])
    assert train and test
    assert all(set(e) == {"image", "text"} and _is_rel_image(root, e["image"]) for e in train)
    assert all(set(e) == {"image", "text", "ref_id"} and isinstance(e["ref_id"], int) for e in test)
    with open(data["refs"], "rb") as f:
        refs = pickle.load(f)
    instances = _load(data["instances"])
    images = {image["id"]: image for image in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    categories = {cat["id"]: cat["name"] for cat in instances["categories"]}
    by_id = {ref["ref_id"]: ref for ref in refs}
    assert len(by_id) == len(refs)
    assert {ref["split"] for ref in refs} == {"train", "val", "testA", "testB"}
    assert {by_id[e["ref_id"]]["split"] for e in test} == {"val", "testA", "testB"}
    dets, cocos = _load(data["det_file"]), _load(data["coco_file"])
    for ref in refs:
        assert {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences"} <= set(ref)
        ann = anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
        assert ref["category_id"] in categories
        image = images[ref["image_id"]]
        assert image["height"] == image["width"] == SIZE and image["file_name"].endswith(".png")
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        assert ann["area"] == pytest.approx(w * h, abs=0.01)
        for sentence in ref["sentences"]:
            assert set(sentence) == {"sent", "raw", "tokens", "sent_id"}
            assert sentence["tokens"] == sentence["sent"].split()
        boxes = dets[str(ref["image_id"])]
        shapes_here = sum(a["image_id"] == ref["image_id"] for a in anns.values())
        assert 2 <= shapes_here <= 3 and len(boxes) > shapes_here
        assert len(cocos[str(ref["image_id"])]) == shapes_here
        for box in boxes:
            assert (
                len(box) == 6
                and box[2] > 0
                and box[3] > 0
                and box[0] + box[2] <= SIZE
                and box[1] + box[3] <= SIZE
            )
        best_iou = max(_iou(ann["bbox"], box[:4]) for box in boxes)
        assert best_iou > 0.5
    sentences = [s["sent"] for ref in refs for s in ref["sentences"]]
    assert sorted(e["text"] for e in train + test) == sorted(sentences)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_vocab_file_and_coverage(data: dict[str, str]) -> None:
    committed = (REPO / "configs" / "demo_vocab.txt").read_text(encoding="utf-8").splitlines()
    assert committed == demo.build_demo_vocab(None)
    base = (REPO / "tests" / "data" / "parity" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert committed[: len(base)] == base and len(set(committed)) == len(committed)
    assert [committed[i] for i in (0, 1, 100, 101, 102, 103)] == [
        "[PAD]",
        "[unused0]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    known = set(committed)
    texts = _all_texts(data)
    unknown = {word for text in texts for word in _words(text) if word not in known}
    assert not unknown
    assert set(demo_words()) <= known


def test_deterministic(data: dict[str, str], tmp_path: Path) -> None:
    other = demo.generate_demo_data(tmp_path / "again", **SMALL)
    root_a, root_b = Path(data["root"]), Path(other["root"])
    files = _load(data["manifest"])["files"]
    assert files == _load(other["manifest"])["files"]
    for rel in files:
        a, b = (root_a / rel).read_bytes(), (root_b / rel).read_bytes()
        if rel == "pretrain.json":
            a = a.replace(str(root_a).encode(), b"ROOT")
            b = b.replace(str(root_b).encode(), b"ROOT")
        if rel.endswith(".png"):
            with Image.open(root_a / rel) as ia, Image.open(root_b / rel) as ib:
                assert np.array_equal(np.asarray(ia), np.asarray(ib)), rel
        assert a == b, rel
    changed = demo.generate_demo_data(tmp_path / "seed4", **{**SMALL, "seed": 4})
    assert Path(changed["re_train"]).read_bytes() != Path(data["re_train"]).read_bytes()
    with (
        Image.open(root_a / "images/test/test_00000.png") as ia,
        Image.open(root_a / "images/test2/test2_00000.png") as ib,
    ):
        assert not np.array_equal(np.asarray(ia), np.asarray(ib))


def test_idempotent(tmp_path: Path) -> None:
    args = {"seed": 1, "num_train_images": 6, "num_test_images": 6, "image_size": 32}
    paths = demo.generate_demo_data(tmp_path / "d", **args)
    stamp = Path(paths["vqa_train"]).stat().st_mtime_ns
    image = Path(paths["root"]) / "images" / "train" / "train_00000.png"
    image_stamp = image.stat().st_mtime_ns
    assert demo.generate_demo_data(tmp_path / "d", **args) == paths
    assert Path(paths["vqa_train"]).stat().st_mtime_ns == stamp
    assert image.stat().st_mtime_ns == image_stamp
    # an incomplete folder is regenerated
    image.unlink()
    demo.generate_demo_data(tmp_path / "d", **args)
    assert image.is_file()
    # different arguments regenerate, dropping files of the old run
    demo.generate_demo_data(tmp_path / "d", **{**args, "num_train_images": 3})
    assert len(list((Path(paths["root"]) / "images" / "train").glob("*.png"))) == 3
    assert _load(paths["manifest"])["arguments"]["num_train_images"] == 3


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    paths = demo.main(
        ["--out_dir", str(out), "--seed", "2", "--num_train", "4", "--num_test", "6", "--image_size", "32"]
    )
    assert Path(paths["pretrain"]).is_file()
    assert _load(paths["manifest"])["arguments"]["image_size"] == 32


def test_rejects_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.generate_demo_data(tmp_path / "x", num_train_images=12, num_test_images=2)
