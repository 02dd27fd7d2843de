"""Every dataset against bad image files and odd annotation content.

Each generated image is named ``<kind>.jpg`` whatever its real format (PIL detects the format from
the content, and the VE dataset appends ``.jpg`` to its image ids). Readable kinds must give a
correctly shaped sample; unreadable kinds must give ``None`` in training (counted by the collate)
and a clear error in evaluation.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from configs.schema import COMMON_OPTIONAL, with_defaults
from dataset import create_dataset
from dataset.annotations import AnnotationError
from dataset.collate import SafeCollate
from dataset.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    REPORT_FIRST,
    ImageReader,
    UnreadableImageError,
    UnreadableImageWarning,
    max_pixels_from_config,
    read_rgb,
)
from engine.loop import EpochSettings, train_one_epoch
from models.tokenization import build_tokenizer

IMAGE_RES = 32
# every readable test image has at most 48 x 40 = 1920 pixels; "huge" has 200 x 100 = 20000
TEST_MAX_PIXELS = 10_000


def _rgb_array(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb_array()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _save(image: Image.Image, path: Path, fmt: str, **kwargs: Any) -> None:
    with open(path, "wb") as handle:
        image.save(handle, format=fmt, **kwargs)


def _sixteen_bit(path: Path) -> None:
    values = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    _save(image, path, "PNG")


def _palette_transparent(path: Path) -> None:
    image = Image.fromarray(_rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    _save(image, path, "PNG", transparency=0)


WRITERS: dict[str, Callable[[Path], None]] = {
    "rgb": lambda p: _save(Image.fromarray(_rgb_array()), p, "JPEG"),
    "gray": lambda p: _save(Image.fromarray(_rgb_array()).convert("L"), p, "PNG"),
    "bilevel": lambda p: _save(Image.fromarray(_rgb_array()).convert("1"), p, "PNG"),
    "rgba": lambda p: _save(Image.fromarray(_rgb_array()).convert("RGBA"), p, "PNG"),
    "cmyk": lambda p: _save(Image.fromarray(_rgb_array()).convert("CMYK"), p, "JPEG"),
    "sixteen_bit": _sixteen_bit,
    "palette": lambda p: _save(Image.fromarray(_rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE), p, "PNG"),
    "palette_transparent": _palette_transparent,
    # half of the file: LOAD_TRUNCATED_IMAGES (kept from the original) decodes what is there
    "truncated": lambda p: p.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "not_an_image": lambda p: p.write_bytes(b"this is a caption file, not a picture\n" * 20),
    # cut inside the headers: nothing can be decoded even with LOAD_TRUNCATED_IMAGES
    "truncated_header": lambda p: p.write_bytes(_jpeg_bytes()[:300]),
    "huge": lambda p: _save(Image.new("1", (200, 100)), p, "PNG"),
    "missing": lambda p: None,
}
READABLE = ("rgb", "gray", "bilevel", "rgba", "cmyk", "sixteen_bit", "palette", "palette_transparent", "truncated")
UNREADABLE = ("missing", "empty", "not_an_image", "truncated_header", "huge")
KINDS = READABLE + UNREADABLE


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_images")
    for kind in KINDS:
        WRITERS[kind](root / f"{kind}.jpg")
    return root


def _write_json(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def _base_config(**extra: Any) -> dict[str, Any]:
    return {"image_res": IMAGE_RES, "patch_size": 16, "mask_num_patches": 2, "mask_min_patches": 1,
            "max_image_pixels": TEST_MAX_PIXELS, **extra}


# --- one builder per dataset: (train entry, eval entry, config) ------------------------------------------


def _pretrain(root: Path, tmp: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    train = [{"image": str(root / f"{k}.jpg"), "caption": f"a {k} picture"} for k in kinds]
    return _base_config(train_file=[_write_json(tmp / "train.json", train)])


def _retrieval(root: Path, tmp: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    train = [{"image": f"{k}.jpg", "caption": f"a {k} picture", "image_id": k} for k in kinds]
    test = [{"image": f"{k}.jpg", "caption": [f"a {k} picture", "another"]} for k in kinds]
    return _base_config(train_file=[_write_json(tmp / "train.json", train)],
                        val_file=_write_json(tmp / "val.json", test), test_file=_write_json(tmp / "test.json", test),
                        image_root=str(root))


def _vqa(root: Path, tmp: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    train = [{"question": f"what is {k}?", "image": f"{k}.jpg", "dataset": "vqa", "answer": ["yes", "no", "yes"]}
             for k in kinds]
    test = [{"question": f"what is {k}?", "image": f"{k}.jpg", "question_id": i} for i, k in enumerate(kinds)]
    return _base_config(train_file=[_write_json(tmp / "train.json", train)],
                        test_file=[_write_json(tmp / "test.json", test)],
                        answer_list=_write_json(tmp / "answers.json", ["yes", "no"]),
                        vqa_root=str(root), vg_root=str(root))


def _nlvr(root: Path, tmp: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    # the bad image is the second one, so both images of a pair are checked
    entries = [{"images": ["rgb.jpg", f"{k}.jpg"], "sentence": f"the {k} one", "label": "True"} for k in kinds]
    files = {key: [_write_json(tmp / f"{key}.json", entries)] for key in ("train_file", "val_file", "test_file")}
    return _base_config(image_root=str(root), **files)


def _ve(root: Path, tmp: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    entries = [{"image": k, "sentence": f"the {k} one", "label": "neutral"} for k in kinds]
    files = {key: [_write_json(tmp / f"{key}.json", entries)] for key in ("train_file", "val_file", "test_file")}
    return _base_config(image_root=str(root), **files)


def _grounding(root: Path, tmp: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    train = [{"image": f"{k}.jpg", "text": f"the {k} one"} for k in kinds]
    test = [{"image": f"{k}.jpg", "text": f"the {k} one", "ref_id": i} for i, k in enumerate(kinds)]
    return _base_config(train_file=[_write_json(tmp / "train.json", train)],
                        test_file=[_write_json(tmp / "test.json", test)], image_root=str(root))


BUILDERS = {"pretrain": _pretrain, "re": _retrieval, "vqa": _vqa, "nlvr": _nlvr, "ve": _ve, "grounding": _grounding}
# image-tensor positions of a training / evaluation sample
TRAIN_IMAGE_SLOTS = {"pretrain": (0,), "re": (0,), "vqa": (0,), "nlvr": (0, 1), "ve": (0,), "grounding": (0,)}
EVAL_IMAGE_SLOTS = {"re": (0,), "vqa": (0,), "nlvr": (0, 1), "ve": (0,), "grounding": (0,)}


def _split(name: str, datasets: Any) -> tuple[Any, list[Any]]:
    """(training dataset, evaluation datasets) of one factory result."""
    if name == "pretrain":
        return datasets, []
    return datasets[0], list(datasets[1:])


def _check_image(tensor: Any) -> None:
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, IMAGE_RES, IMAGE_RES)
    assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_training_samples_read_or_skip_each_kind(name, image_dir, tmp_path):
    train, _ = _split(name, create_dataset(name, BUILDERS[name](image_dir, tmp_path, KINDS)))
    assert len(train) == len(KINDS)
    for index, kind in enumerate(KINDS):
        if kind in READABLE:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UnreadableImageWarning)
                sample = train[index]
            for slot in TRAIN_IMAGE_SLOTS[name]:
                _check_image(sample[slot])
            if name == "pretrain":
                assert sample[2].shape == (3, IMAGE_RES // 2, IMAGE_RES // 2) and sample[3].shape == (2, 2)
        else:
            with pytest.warns(UnreadableImageWarning, match=rf"entry {index}\b.*{kind}\.jpg"):
                assert train[index] is None


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_training_collate_counts_unreadable_samples(name, image_dir, tmp_path):
    train, _ = _split(name, create_dataset(name, BUILDERS[name](image_dir, tmp_path, KINDS)))
    assert train.collate_fn is not None
    loader = DataLoader(train, batch_size=len(KINDS), shuffle=False, collate_fn=train.collate_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batch, failed = next(iter(loader))
    assert failed == len(UNREADABLE)
    images = batch[0]
    # SafeCollate keeps the batch size (replacing), the VQA collate drops the unreadable samples
    expected = len(READABLE) if name == "vqa" else len(KINDS)
    assert images.shape == (expected, 3, IMAGE_RES, IMAGE_RES)

    bad_only = create_dataset(name, BUILDERS[name](image_dir, tmp_path, UNREADABLE))
    bad_train, _ = _split(name, bad_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        collated = bad_train.collate_fn([bad_train[i] for i in range(len(bad_train))])
    assert collated == (None, len(UNREADABLE))


@pytest.mark.parametrize("name", sorted(EVAL_IMAGE_SLOTS))
def test_evaluation_reads_or_names_the_file(name, image_dir, tmp_path):
    _, evaluation = _split(name, create_dataset(name, BUILDERS[name](image_dir, tmp_path, KINDS)))
    assert evaluation
    for dataset in evaluation:
        assert dataset.collate_fn is None
        for index, kind in enumerate(KINDS):
            if kind in READABLE:
                sample = dataset[index]
                for slot in EVAL_IMAGE_SLOTS[name]:
                    _check_image(sample[slot])
            else:
                with pytest.raises(UnreadableImageError, match=rf"{kind}\.jpg.*dataset entry {index}\b") as info:
                    dataset[index]
                assert info.value.path.endswith(f"{kind}.jpg")


def test_vqa_and_grounding_errors_name_the_question_and_ref(image_dir, tmp_path):
    _, vqa_test = create_dataset("vqa", _vqa(image_dir, tmp_path, ("rgb", "empty")))
    with pytest.raises(UnreadableImageError, match="empty file.*question 1"):
        vqa_test[1]
    _, grounding_test = create_dataset("grounding", _grounding(image_dir, tmp_path, ("missing",)))
    with pytest.raises(UnreadableImageError, match="no such file.*ref 0"):
        grounding_test[0]


def test_nlvr_first_image_unreadable_also_skips(image_dir, tmp_path):
    entries = [{"images": ["not_an_image.jpg", "rgb.jpg"], "sentence": "x", "label": "False"}]
    config = _base_config(image_root=str(image_dir), **{key: [_write_json(tmp_path / f"{key}.json", entries)]
                                                        for key in ("train_file", "val_file", "test_file")})
    train, val, _ = create_dataset("nlvr", config)
    with pytest.warns(UnreadableImageWarning, match="not_an_image.jpg"):
        assert train[0] is None
    with pytest.raises(UnreadableImageError, match="not_an_image.jpg"):
        val[0]


# --- the image reader itself -------------------------------------------------------------------------------


def test_conversions_keep_content(image_dir):
    gray = read_rgb(str(image_dir / "gray.jpg"))
    assert gray.mode == "RGB" and gray.size == (48, 40)
    r, g, b = (np.asarray(c) for c in gray.split())
    assert np.array_equal(r, g) and np.array_equal(g, b)
    # 16-bit values v become v // 256, not a clip at 255
    sixteen = np.asarray(read_rgb(str(image_dir / "sixteen_bit.jpg")).split()[0]).astype(int)
    expected = (np.arange(40 * 48).reshape(40, 48) * 34 % 65536) // 256
    assert np.abs(sixteen - expected).max() <= 1
    assert 0 < sixteen.mean() < 255
    cmyk = np.asarray(read_rgb(str(image_dir / "cmyk.jpg"))).astype(int)
    assert np.abs(cmyk - _rgb_array()).mean() < 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_rgb(str(image_dir / "palette_transparent.jpg")).mode == "RGB"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 1-bit pixels, followed by a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10**10 pixels, 1.25 GB even as 1-bit
    assert bomb.stat().st_size < 200
    with pytest.raises(UnreadableImageError, match=r"100000x100000 = 10000000000 pixels exceeds "
                                                   rf"max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS}"):
        read_rgb(str(bomb))
    reader = ImageReader(skip_unreadable=True)
    with pytest.warns(UnreadableImageWarning, match="decompression-bomb guard"):
        assert reader(str(bomb), 0) is None


def test_pixel_limit_setting(image_dir):
    huge = str(image_dir / "huge.jpg")
    with pytest.raises(UnreadableImageError, match="20000 pixels exceeds max_image_pixels=19999"):
        read_rgb(huge, 19_999)
    assert read_rgb(huge, 20_000).size == (200, 100)
    # null or 0: no limit (the original behaviour); PIL's own fixed limit is off so the key decides
    assert read_rgb(huge, None).size == (200, 100)
    assert Image.MAX_IMAGE_PIXELS is None and ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert COMMON_OPTIONAL["max_image_pixels"] == DEFAULT_MAX_IMAGE_PIXELS == 2 ** 28
    assert max_pixels_from_config(with_defaults({}, "pretrain")) == DEFAULT_MAX_IMAGE_PIXELS
    assert max_pixels_from_config({"max_image_pixels": None}) is None
    assert max_pixels_from_config({"max_image_pixels": 0}) is None
    assert max_pixels_from_config({"max_image_pixels": 5}) == 5
    for bad in (-1, "1e6", 2.5, True):
        with pytest.raises(ValueError, match="max_image_pixels"):
            max_pixels_from_config({"max_image_pixels": bad})


def test_huge_image_loads_without_limit(image_dir, tmp_path):
    config = _retrieval(image_dir, tmp_path, ("huge",))
    config["max_image_pixels"] = None
    train, val, _ = create_dataset("re", config)
    _check_image(train[0][0])
    _check_image(val[0][0])


def test_unreadable_warnings_are_rate_limited(tmp_path):
    reader = ImageReader(skip_unreadable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(1500):
            assert reader(str(tmp_path / f"gone_{index}.jpg"), index) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    # the first ten one by one, then the 100th and the 1000th
    assert len(messages) == REPORT_FIRST + 2 and reader.failures == 1500
    assert "gone_0.jpg" in messages[0] and "gone_99.jpg" in messages[-2] and "gone_999.jpg" in messages[-1]
    assert "unreadable image 1000 in this process" in messages[-1]
    assert "later ones are reported at counts 100, 1000" in messages[REPORT_FIRST - 1]


def test_worker_processes_count_unreadable_samples(image_dir, tmp_path):
    train, _, _ = create_dataset("re", _retrieval(image_dir, tmp_path, KINDS))
    loader = DataLoader(train, batch_size=7, shuffle=False, num_workers=2, collate_fn=train.collate_fn)
    counts = [failed for _, failed in loader]
    expected = [sum(kind in UNREADABLE for kind in KINDS[i:i + 7]) for i in range(0, len(KINDS), 7)]
    assert counts == expected and sum(counts) == len(UNREADABLE)


# --- the training loop skips a batch in which nothing could be read -------------------------------------


def test_train_one_epoch_skips_an_all_unreadable_batch(image_dir, tmp_path, capsys):
    kinds = ("missing", "empty", "rgb", "gray")
    train, _, _ = create_dataset("re", _retrieval(image_dir, tmp_path, kinds))
    assert isinstance(train.collate_fn, SafeCollate)
    loader = DataLoader(train, batch_size=2, shuffle=False, collate_fn=train.collate_fn)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[int] = []

    def step(batch: Any, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        images, _captions, _ids = batch
        seen.append(i)
        return {"loss": model(images.mean(dim=(2, 3))).pow(2).mean()}

    settings = EpochSettings(loss_names=("loss",), print_freq=100, counted_batches=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        stats = train_one_epoch(model, loader, optimizer, None, 1, torch.device("cpu"), step, settings)
    assert seen == [1]
    assert stats["skipped_samples"] == 2
    assert "every sample of batch 0 of epoch 1 on this process was unreadable; step skipped" in capsys.readouterr().out


# --- annotation content -----------------------------------------------------------------------------------


def _train_file(config: dict[str, Any]) -> Path:
    value = config["train_file"]
    return Path(value[0] if isinstance(value, list) else value)


REQUIRED_FIELD = {"pretrain": "caption", "re": "image_id", "vqa": "answer", "nlvr": "label", "ve": "sentence",
                  "grounding": "text"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_malformed_json_names_file_and_position(name, image_dir, tmp_path):
    config = BUILDERS[name](image_dir, tmp_path, ("rgb", "gray"))
    path = _train_file(config)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rstrip(",") + " ,,"
    path.write_text("\n".join(lines))
    with pytest.raises(AnnotationError, match=rf"{path.name}: malformed JSON at line 3, column \d+"):
        create_dataset(name, config)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_missing_field_names_file_entry_and_field(name, image_dir, tmp_path):
    config = BUILDERS[name](image_dir, tmp_path, ("rgb", "gray", "cmyk"))
    path = _train_file(config)
    entries = json.loads(path.read_text())
    del entries[1][REQUIRED_FIELD[name]]
    path.write_text(json.dumps(entries))
    with pytest.raises(AnnotationError, match=rf"{path.name}: entry 1 has no field '{REQUIRED_FIELD[name]}'"):
        create_dataset(name, config)


TEXT_FIELD = {"pretrain": "caption", "re": "caption", "vqa": "question", "nlvr": "sentence", "ve": "sentence",
              "grounding": "text"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_text_of_wrong_type_names_file_entry_and_field(name, image_dir, tmp_path):
    config = BUILDERS[name](image_dir, tmp_path, ("rgb", "gray", "cmyk"))
    path = _train_file(config)
    entries = json.loads(path.read_text())
    entries[2][TEXT_FIELD[name]] = None
    path.write_text(json.dumps(entries))
    with pytest.raises(AnnotationError, match=rf"{path.name}: entry 2 .*'{TEXT_FIELD[name]}'"):
        create_dataset(name, config)


# position of the normalised text in a training sample
TEXT_SLOT = {"pretrain": 1, "re": 1, "vqa": 1, "nlvr": 2, "ve": 1, "grounding": 1}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("text", ["", "?!...", "   "])
def test_empty_text_goes_through_the_tokenizer(name, text, image_dir, tmp_path):
    config = BUILDERS[name](image_dir, tmp_path, ("rgb", "gray"))
    path = _train_file(config)
    entries = json.loads(path.read_text())
    entries[0][TEXT_FIELD[name]] = text
    path.write_text(json.dumps(entries))
    train, _ = _split(name, create_dataset(name, config))
    empty, other = train[0][TEXT_SLOT[name]], train[1][TEXT_SLOT[name]]
    assert empty == ""
    tokenizer = build_tokenizer("configs/demo_vocab.txt")
    tokens = tokenizer([empty, other], padding="longest", return_tensors="pt")
    # the project's single-sequence convention: [CLS] then the word pieces, no trailing [SEP]
    assert tokens.input_ids[0, 0].item() == tokenizer.cls_token_id
    assert tokens.attention_mask[0].tolist() == [1] + [0] * (tokens.input_ids.shape[1] - 1)
    assert tokens.attention_mask[1].sum() > 1


def test_empty_caption_list_in_pretraining(image_dir, tmp_path):
    config = _base_config(train_file=[_write_json(tmp_path / "train.json",
                                                  [{"image": str(image_dir / "rgb.jpg"), "caption": []}])])
    assert create_dataset("pretrain", config)[0][1] == ""
