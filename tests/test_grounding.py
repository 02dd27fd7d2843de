"""Weakly supervised grounding: Grad-CAM maps, the REFER reader and grounding datasets, box selection
and accuracy, and end-to-end runs of ``Grounding.py`` (one process and two gloo processes) on a small
generated demo dataset, starting from a randomly initialised pretraining-format checkpoint."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import load_config
from dataset import pre_caption
from dataset.annotations import AnnotationError
from dataset.grounding import GroundingDataset, ReferAnnotations, create_grounding_datasets, read_refs_pickle
from engine.grounding_eval import (
    box_score,
    check_evaluation_inputs,
    collect_result,
    compute_iou,
    evaluate_grounding,
    select_box,
    upsample_map,
)
from models.simla.gradcam import check_block_num, itc_gradcam, itm_gradcam
from models.tokenization import build_tokenizer
from tests.script_helpers import free_port, script_env

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEMO_CONFIG = REPO / "configs" / "Grounding_demo.yaml"
VOCAB = str(REPO / "configs" / "demo_vocab.txt")
RUN_TIMEOUT = 300
LOG_KEYS_TRAIN = ["train_lr", "train_loss_itm", "train_loss_ita", "val_d", "testA_d", "testB_d", "epoch"]
LOG_KEYS_EVAL = ["val_d", "testA_d", "testB_d", "epoch"]


# --- box scores, selection, IoU -------------------------------------------------------------------------


def test_iou_uses_inclusive_pixels() -> None:
    assert compute_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # overlap x 5..9, y 5..9 = 25 pixels; union 100 + 100 - 25
    assert compute_iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    # a one-pixel overlap (x2 == x1) counts as no intersection in the original formula
    assert compute_iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    assert compute_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0


def test_box_score_sums_truncated_pixel_ranges() -> None:
    mask = torch.arange(100, dtype=torch.float32).view(10, 10)
    # rows int(1.7):int(1.7+2.6) = 1:4, columns int(2.2):int(2.2+1.9) = 2:4
    expected = float(mask[1:4, 2:4].sum()) / (1.9 * 2.6) ** 0.5
    assert box_score(mask, [2.2, 1.7, 1.9, 2.6]) == pytest.approx(expected, rel=1e-6)
    assert box_score(mask, [2, 1, 2, 3], alpha=1.0) == pytest.approx(float(mask[1:4, 2:4].sum()) / 6, rel=1e-6)


def test_select_box_first_best_positive_and_fallbacks() -> None:
    boxes = [[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]]
    assert select_box([0.5, 2.0, 2.0], boxes, None) == [1.0, 1.0, 2.0, 2.0]  # ties: the first wins
    previous = [9.0, 9.0, 9.0, 9.0]
    # no positive score: the original reuses the previous expression's box
    assert select_box([0.0, -1.0, -0.5], boxes, previous) == previous
    assert select_box([0.0, -1.0, -0.5], boxes, None) is None
    # the flag chooses the best-scoring box whatever its sign
    assert select_box([-2.0, -1.0, -1.0], boxes, previous, skip_empty_fix=True) == [1.0, 1.0, 2.0, 2.0]
    assert select_box([], [], previous, skip_empty_fix=True) is None


def test_upsample_is_bicubic_without_corner_alignment() -> None:
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = upsample_map(grid, 4, 6)
    assert up.shape == (4, 6)
    ref = torch.nn.functional.interpolate(grid[None, None], size=(4, 6), mode="bicubic", align_corners=False)[0, 0]
    assert torch.equal(up, ref)
    with pytest.raises(ValueError, match="2-D"):
        upsample_map(torch.zeros(1, 2, 2), 4, 4)


def _toy_refer(splits: list[str]) -> ReferAnnotations:
    images = [{"id": i, "height": 8, "width": 8} for i in range(len(splits))]
    anns = [{"id": 100 + i, "image_id": i, "bbox": [4, 4, 4, 4]} for i in range(len(splits))]
    refs = [{"ref_id": i + 1, "ann_id": 100 + i, "image_id": i, "split": s, "sentences": []}
            for i, s in enumerate(splits)]
    return ReferAnnotations(refs, {"images": images, "annotations": anns, "categories": []}, source="toy")


def test_evaluate_grounding_accuracy_per_split_and_previous_box_reuse() -> None:
    refer = _toy_refer(["val", "val", "testA", "testB", "val"])
    # per image: the true box (bottom right) and a decoy (top left)
    dets = {str(i): [[0, 0, 4, 4, 0.9], [4, 4, 4, 4, 0.8]] for i in range(5)}
    hot_right = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    hot_left = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    results = [
        {"ref_id": 1, "pred": hot_right},  # correct
        {"ref_id": 2, "pred": hot_left},  # wrong
        {"ref_id": 3, "pred": hot_right},  # correct
        {"ref_id": 4, "pred": hot_left},  # wrong
        {"ref_id": 5, "pred": torch.zeros(2, 2)},  # no positive score: reuses the previous (wrong) box
    ]
    outcome = evaluate_grounding(results, dets, refer)
    assert outcome.accuracy == {"val_d": 1 / 3, "testA_d": 1.0, "testB_d": 0.0}
    assert outcome.boxes[4] == outcome.boxes[3] == [0.0, 0.0, 4.0, 4.0]
    assert outcome.ious[0] == 1.0
    fixed = evaluate_grounding(results, dets, refer, skip_empty_fix=True)
    # with the flag the all-zero map picks the first box of equal (zero) score
    assert fixed.boxes[4] == [0.0, 0.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="testB"):
        evaluate_grounding(results[:3], dets, refer)
    with pytest.raises(KeyError, match="dets.json: no detections for image id '2'"):
        evaluate_grounding(results, {k: v for k, v in dets.items() if k != "2"}, refer, det_file="dets.json")


def test_check_evaluation_inputs_names_the_problem() -> None:
    refer = _toy_refer(["val", "testA", "testB"])
    dets = {str(i): [[0, 0, 4, 4]] for i in range(3)}
    assert check_evaluation_inputs([1, 2, 3, 3], refer, dets, "test.json", "dets.json") == {
        "val": 1, "testA": 1, "testB": 2}
    with pytest.raises(KeyError, match=r"test.json: 1 ref_id\(s\) not in the REFER annotations toy \(e.g. \[7\]\)"):
        check_evaluation_inputs([1, 2, 3, 7], refer, dets, "test.json", "dets.json")
    with pytest.raises(KeyError, match="dets.json: no detections for image id"):
        check_evaluation_inputs([1, 2, 3], refer, {"0": [], "1": []}, "test.json", "dets.json")
    with pytest.raises(ValueError, match=r"no referring expression of split\(s\) \['testB'\]"):
        check_evaluation_inputs([1, 2], refer, dets, "test.json", "dets.json")


def test_collect_result_single_process(tmp_path: Path) -> None:
    result = [{"ref_id": 3, "pred": torch.ones(4, 4)}, {"ref_id": 5, "pred": torch.zeros(4, 4)}]
    merged = collect_result(result, str(tmp_path / "result"), "epoch0")
    assert (tmp_path / "result" / "epoch0_rank0.pth").is_file()
    assert [r["ref_id"] for r in merged] == [3, 5]
    assert torch.equal(merged[0]["pred"], torch.ones(4, 4))


# --- REFER reader and datasets --------------------------------------------------------------------------


def test_refer_reader_and_grounding_datasets(small_demo_data: dict[str, str], tmp_path: Path) -> None:
    paths = small_demo_data
    refer = ReferAnnotations.load(paths["refcoco_data"])
    refs = read_refs_pickle(paths["refs"])
    assert set(refer.Refs) == {r["ref_id"] for r in refs}
    first = refs[0]
    assert refer.refToAnn[first["ref_id"]]["id"] == first["ann_id"]
    assert refer.ref_box(first["ref_id"]) == [float(v) for v in refer.Anns[first["ann_id"]]["bbox"]]
    assert refer.Imgs[first["image_id"]]["height"] == 64
    assert set(refer.ref_ids("val")) == {r["ref_id"] for r in refs if r["split"] == "val"}

    config = load_config(str(DEMO_CONFIG), task="grounding")
    config.update(train_file=[paths["grounding_train"]], test_file=[paths["grounding_test"]],
                  image_root=paths["image_root"])
    train, test = create_grounding_datasets(config)
    train_ann = json.loads(Path(paths["grounding_train"]).read_text())
    test_ann = json.loads(Path(paths["grounding_test"]).read_text())
    assert len(train) == len(train_ann) and len(test) == len(test_ann)
    names = list(dict.fromkeys(a["image"].split("/")[-1] for a in train_ann))
    assert train.img_ids == {name: i for i, name in enumerate(names)}
    image, text, idx = train[1]
    assert image.shape == (3, 64, 64) and idx == names.index(train_ann[1]["image"].split("/")[-1])
    assert text == pre_caption(train_ann[1]["text"], 30)
    image, text, ref_id = test[0]
    assert image.shape == (3, 64, 64) and ref_id == test_ann[0]["ref_id"]
    assert test.ref_ids == [a["ref_id"] for a in test_ann]

    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps([{"image": "x.png", "text": "the dog", "ref_id": "7"}]))
    with pytest.raises(AnnotationError, match=r"bad_test.json: entry 0 'ref_id' must be an integer"):
        GroundingDataset([str(bad)], lambda img: img, None, mode="test")
    missing = tmp_path / "no_ref.json"
    missing.write_text(json.dumps([{"image": "x.png", "text": "the dog"}]))
    with pytest.raises(AnnotationError, match="no_ref.json: entry 0 has no field 'ref_id'"):
        GroundingDataset([str(missing)], lambda img: img, None, mode="test")


def test_refs_pickle_refuses_objects(tmp_path: Path) -> None:
    import datetime

    folder = tmp_path / "refcoco+"
    folder.mkdir()
    (folder / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "when": datetime.date(2020, 1, 1)}]))
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\).p: refuses to load the pickled object datetime"):
        ReferAnnotations.load(str(tmp_path))
    (folder / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "ann_id": 5, "image_id": 0, "split": "val"}]))
    with pytest.raises(AnnotationError, match="ref 1 points to annotation id 5"):
        ReferAnnotations.load(str(tmp_path))


# --- Grad-CAM -----------------------------------------------------------------------------------------------


def _tiny_model(image_res: int = 32, patch_size: int = 8):
    from models.simla.retrieval import SIMLA

    bert = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 32, "vocab_size": 559, "encoder_width": 24, "add_cross_attention": True,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12,
            "initializer_range": 0.02, "hidden_act": "gelu", "pad_token_id": 0, "type_vocab_size": 2}
    config = {"image_res": image_res, "patch_size": patch_size, "vision_width": 24, "vision_depth": 3,
              "vision_heads": 2, "embed_dim": 16, "temp": 0.07, "queue_size": 8, "momentum": 0.995,
              "mlm_probability": 0.15, "bert_config": bert, "vit_mask_token": False, "from_scratch": True}
    torch.manual_seed(0)
    model = SIMLA(config=config).eval()
    with torch.no_grad():
        for param in model.parameters():  # move away from the constant initial values
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _reference_itm_map(model, ids, mask, image, block):
    """The original procedure: hooks on the cross-attention, backward into every parameter."""
    attn = model.text_encoder.encoder.layer[block].crossattention.self
    attn.save_attention = True
    try:
        image_embeds = model.visual_encoder(image)
        logits = model.itm_logits(ids, mask, image_embeds)
        model.zero_grad()
        logits[:, 1].sum().backward()
        cams, grads = attn.get_attention_map().detach(), attn.get_attn_gradients().detach()
    finally:
        attn.save_attention = False
    rows, cols = model.visual_encoder.grid_size
    m = mask.view(mask.shape[0], 1, -1, 1, 1)
    cams = cams[:, :, :, 1:].reshape(*cams.shape[:3], rows, cols) * m
    grads = grads[:, :, :, 1:].clamp(min=0).reshape(*grads.shape[:3], rows, cols) * m
    return (cams * grads).mean(1).mean(1)


def test_gradcam_grid_heads_padding_and_original_procedure() -> None:
    model = _tiny_model(image_res=40, patch_size=8)  # a 5x5 grid, 2 ViT heads, 4 BERT heads
    tokenizer = build_tokenizer(VOCAB)
    texts = ["the red circle", "the large blue square in the top left"]
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    image = torch.randn(2, 3, 40, 40)
    maps = itm_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=1)
    assert maps.shape == (2, 5, 5) and maps.dtype == torch.float32
    assert bool((maps >= 0).all()) and bool((maps > 0).any())
    # the gradient is taken at the attention probabilities only: parameters get no .grad
    assert all(p.grad is None for p in model.parameters())
    assert not model.text_encoder.encoder.layer[1].crossattention.self.save_attention
    reference = _reference_itm_map(model, enc.input_ids, enc.attention_mask, image, 1)
    torch.testing.assert_close(maps, reference, atol=1e-12, rtol=1e-5)

    # padding positions count in the mean over text positions: the short text's map is its own
    # unpadded map scaled by (real length / padded length)
    alone = tokenizer(texts[:1], padding="longest", return_tensors="pt")
    single = itm_gradcam(model, alone.input_ids, alone.attention_mask, image[:1], block_num=1)
    ratio = alone.input_ids.shape[1] / enc.input_ids.shape[1]
    torch.testing.assert_close(maps[0], single[0] * ratio, atol=1e-12, rtol=1e-4)

    itc = itc_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=2)
    assert itc.shape == (2, 5, 5) and bool((itc >= 0).all())
    # itc: each image's map depends on its own text only
    itc_alone = itc_gradcam(model, alone.input_ids, alone.attention_mask, image[:1], block_num=2)
    torch.testing.assert_close(itc[0], itc_alone[0], atol=1e-12, rtol=1e-4)

    with pytest.raises(ValueError, match=r"--block_num 8 is out of range for --gradcam_mode itm: the model has "
                                         r"3 text encoder layers \(valid: 0..2\)"):
        check_block_num(model, "itm", 8)
    with pytest.raises(ValueError, match="3 ViT blocks"):
        itc_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=3)


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grounding_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Demo data (16 training images: 50 expressions; 8 test images: 24 expressions over val, testA,
    testB) and a randomly initialised tiny pretraining checkpoint."""
    from demo.data import generate_demo_data
    from models.simla.pretrain import SIMLA as PretrainSIMLA

    root = tmp_path_factory.mktemp("grounding")
    paths = generate_demo_data(root / "data", num_train_images=16, num_test_images=8, image_size=64)
    config = load_config(str(REPO / "configs" / "Pretrain_demo.yaml"), task="pretrain")
    config["bert_config"] = str(REPO / config["bert_config"])
    torch.manual_seed(0)
    model = PretrainSIMLA(tokenizer=build_tokenizer(VOCAB), config=config)
    checkpoint = root / "pretrain.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return dict(paths, checkpoint=str(checkpoint), root=str(root))


def _run(setup: dict[str, str], out: Path, *flags: str, nproc: int = 1) -> subprocess.CompletedProcess:
    overrides = [f"train_file=[{setup['grounding_train']}]", f"test_file=[{setup['grounding_test']}]",
                 f"refcoco_data={setup['refcoco_data']}", f"det_file={setup['det_file']}",
                 f"coco_file={setup['coco_file']}", f"image_root={setup['image_root']}",
                 f"bert_config={REPO / 'configs' / 'demo_bert.json'}", "batch_size=4", "schedular.epochs=1"]
    launcher = [PYTHON]
    if nproc > 1:
        launcher = [PYTHON, "-m", "torch.distributed.launch", f"--nproc_per_node={nproc}", "--use_env",
                    f"--master_port={free_port()}"]
    cmd = [*launcher, str(REPO / "Grounding.py"), "--config", str(DEMO_CONFIG), "--output_dir", str(out),
           "--text_encoder", VOCAB, "--device", "cpu", "--num_workers", "0", *flags, "--overrides", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _check_accuracy_line(line: dict, keys: list[str], setup: dict[str, str]) -> None:
    """Each accuracy is a count of grounded expressions out of the test expressions of its REFER split."""
    assert list(line) == keys
    with open(setup["refs"], "rb") as handle:
        split_of = {ref["ref_id"]: ref["split"] for ref in pickle.load(handle)}
    splits = [split_of[ref_id] for ref_id in _test_ref_ids(setup)]
    for split in ("val", "testA", "testB"):
        value, total = line[f"{split}_d"], splits.count(split)
        assert isinstance(value, float) and total > 0
        assert any(value == correct / total for correct in range(total + 1)), (split, value, total)


def _test_ref_ids(setup: dict[str, str]) -> list[int]:
    return [entry["ref_id"] for entry in json.loads(Path(setup["grounding_test"]).read_text())]


@pytest.fixture(scope="module")
def single_run(grounding_setup: dict[str, str]) -> dict:
    """One epoch of single-process fine-tuning (ITM Grad-CAM from text-encoder layer 2), then an
    ``--evaluate`` run of the best checkpoint it wrote (in ``<out>/evaluate``)."""
    out = Path(grounding_setup["root"]) / "single"
    proc = _run(grounding_setup, out, "--checkpoint", grounding_setup["checkpoint"], "--block_num", "2")
    best = out / "checkpoint_best.pth"
    # this seeded run grounds at least one val expression, so the best checkpoint is written
    assert best.is_file(), f"no {best}; log: {(out / 'log.txt').read_text()}"
    _run(grounding_setup, out / "evaluate", "--checkpoint", str(best), "--block_num", "2", "--evaluate")
    return {"out": out, "stdout": proc.stdout}


def test_grounding_single_process_train_and_evaluate(grounding_setup: dict[str, str], single_run: dict) -> None:
    out = single_run["out"]
    assert "missing_keys=['idx_queue']" in single_run["stdout"]
    (line,) = _log_lines(out)
    _check_accuracy_line(line, LOG_KEYS_TRAIN, grounding_setup)
    assert line["epoch"] == 0 and math.isfinite(float(line["train_loss_itm"]))
    # one result per test expression, in test-file order, with a map on the 4x4 patch grid
    results = torch.load(out / "result" / "epoch0_rank0.pth", weights_only=True)
    assert [r["ref_id"] for r in results] == _test_ref_ids(grounding_setup)
    assert all(r["pred"].shape == (4, 4) and r["pred"].device.type == "cpu" for r in results)
    for name in ("val_d", "testA_d", "testB_d"):
        assert f"{name}: {line[name]:.3f}" in single_run["stdout"]
    assert line["val_d"] > 0
    checkpoint = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert list(checkpoint)[:5] == ["model", "optimizer", "lr_scheduler", "config", "epoch"]
    assert "text_encoder.encoder.layer.0.crossattention.self.query.weight" in checkpoint["model"]

    # evaluating the saved model reproduces the accuracy logged after training
    evaluated = out / "evaluate"
    (eval_line,) = _log_lines(evaluated)
    _check_accuracy_line(eval_line, LOG_KEYS_EVAL, grounding_setup)
    assert {k: eval_line[k] for k in ("val_d", "testA_d", "testB_d")} == {
        k: line[k] for k in ("val_d", "testA_d", "testB_d")}
    assert not (evaluated / "checkpoint_best.pth").exists()
    maps = torch.load(evaluated / "result" / "epoch0_rank0.pth", weights_only=True)
    for trained, reloaded in zip(results, maps):
        torch.testing.assert_close(reloaded["pred"], trained["pred"], atol=1e-12, rtol=1e-5)


def test_grounding_two_process_gloo(grounding_setup: dict[str, str], single_run: dict) -> None:
    single = single_run["out"]
    ref_ids = _test_ref_ids(grounding_setup)

    # training on two processes (ITC Grad-CAM from ViT block 3): each rank evaluates half of the
    # test expressions; rank 0 merges them and writes the log and the checkpoint
    out = Path(grounding_setup["root"]) / "two_train"
    _run(grounding_setup, out, "--checkpoint", grounding_setup["checkpoint"], "--gradcam_mode", "itc",
         "--block_num", "3", nproc=2)
    (line,) = _log_lines(out)
    _check_accuracy_line(line, LOG_KEYS_TRAIN, grounding_setup)
    rank0 = torch.load(out / "result" / "epoch0_rank0.pth", weights_only=True)
    rank1 = torch.load(out / "result" / "epoch0_rank1.pth", weights_only=True)
    # DistributedSampler without shuffling: rank r takes expressions r, r+2, ... (24 expressions, no padding)
    assert [r["ref_id"] for r in rank0] == ref_ids[0::2]
    assert [r["ref_id"] for r in rank1] == ref_ids[1::2]
    assert (out / "checkpoint_best.pth").is_file() == (line["val_d"] > 0)

    # two-process evaluation of the single-process checkpoint: the same maps (up to the padding scale
    # of each batch) and the same accuracies as the single-process evaluation
    evaluated = Path(grounding_setup["root"]) / "two_eval"
    _run(grounding_setup, evaluated, "--checkpoint", str(single / "checkpoint_best.pth"), "--block_num", "2",
         "--evaluate", nproc=2)
    (eval_line,) = _log_lines(evaluated)
    (single_line,) = _log_lines(single / "evaluate")
    assert {k: eval_line[k] for k in LOG_KEYS_EVAL} == {k: single_line[k] for k in LOG_KEYS_EVAL}
    single_maps = torch.load(single / "evaluate" / "result" / "epoch0_rank0.pth", weights_only=True)
    for rank in (0, 1):
        for j, r in enumerate(torch.load(evaluated / "result" / f"epoch0_rank{rank}.pth", weights_only=True)):
            theirs = single_maps[2 * j + rank]
            assert r["ref_id"] == theirs["ref_id"]
            mine, theirs = r["pred"], theirs["pred"]
            torch.testing.assert_close(mine / mine.sum(), theirs / theirs.sum(), atol=1e-9, rtol=1e-4)
