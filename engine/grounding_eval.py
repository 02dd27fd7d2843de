"""Weakly supervised grounding evaluation as the original (IoU >= 0.5, inclusive pixels)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dataset.annotations import read_json
from dataset.grounding import ReferAnnotations
from engine.metrics import MetricLogger
from models.simla.gradcam import gradcam
from utils import barrier, get_rank, get_world_size, is_main_process

REFER_DATASET, REFER_SPLIT_BY = "refcoco+", "unc"

GROUNDING_SPLITS = ("val", "testA", "testB")
BOX_SCORE_ALPHA = 0.5
IOU_THRESHOLD = 0.5

Box = Sequence[float]


def grounding_maps(model: Any, data_loader: Iterable, tokenizer: Any, device: torch.device, gradcam_mode: str,
                   block_num: int, amp: str = "none") -> list[dict[str, Any]]:
    """``[{"ref_id", "pred": map (rows, cols) on CPU}]`` for this process's test batches (with gradients)."""
    model.eval()
    logger = MetricLogger(delimiter="  ")
    result: list[dict[str, Any]] = []
    for image, text, ref_ids in logger.log_every(data_loader, 50, "Evaluation:"):
        image = image.to(device, non_blocking=True)
        text_input = tokenizer(list(text), padding="longest", return_tensors="pt").to(device)
        maps = gradcam(model, gradcam_mode, text_input.input_ids, text_input.attention_mask, image, block_num, amp)
        maps = maps.detach().cpu()
        for ref_id, cam in zip(ref_ids, maps):
            result.append({"ref_id": int(ref_id), "pred": cam})
    return result


def collect_result(result: list[dict[str, Any]], result_dir: str, filename: str) -> list[dict[str, Any]] | None:
    """Write ``<filename>_rank<r>.pth``; the main process returns all ranks' results in order, others None."""
    os.makedirs(result_dir, exist_ok=True)
    path = os.path.join(result_dir, f"{filename}_rank{get_rank()}.pth")
    tmp = path + ".tmp"
    torch.save(result, tmp)
    os.replace(tmp, path)
    barrier()
    if not is_main_process():
        return None
    merged: list[dict[str, Any]] = []
    for rank in range(get_world_size()):
        rank_path = os.path.join(result_dir, f"{filename}_rank{rank}.pth")
        if not os.path.isfile(rank_path):
            raise FileNotFoundError(f"grounding result file of rank {rank} not found: {rank_path}")
        merged += torch.load(rank_path, map_location="cpu", weights_only=True)
    return merged


def upsample_map(pred: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The map resized bicubically (``align_corners=False``) to ``(height, width)``, float32."""
    if pred.dim() != 2:
        raise ValueError(f"a Grad-CAM map must be 2-D (rows, cols), got shape {tuple(pred.shape)}")
    grid = pred.detach().to("cpu", torch.float32)[None, None]
    return F.interpolate(grid, size=(int(height), int(width)), mode="bicubic", align_corners=False)[0, 0]


def box_score(mask: torch.Tensor, box: Box, alpha: float = BOX_SCORE_ALPHA) -> float:
    """Summed heat inside the box divided by ``(w*h) ** alpha``, in float32 as the original."""
    x, y, w, h = (float(v) for v in box[:4])
    heat = mask[int(y):int(y + h), int(x):int(x + w)].sum()
    return float(heat / (w * h) ** alpha)


def select_box(scores: Sequence[float], boxes: Sequence[Box], previous: list[float] | None,
               skip_empty_fix: bool = False) -> list[float] | None:
    """The first box with the largest score above 0; else ``previous`` or, with ``skip_empty_fix``, the best."""
    best, chosen = 0.0, None
    for score, box in zip(scores, boxes):
        if score > best:
            best, chosen = score, box
    if chosen is not None:
        return [float(v) for v in chosen[:4]]
    if skip_empty_fix:
        finite = [(s, i) for i, s in enumerate(scores) if not math.isnan(s)]
        if finite:
            top = max(s for s, _ in finite)
            index = next(i for s, i in finite if s == top)
            return [float(v) for v in boxes[index][:4]]
        return None
    return previous


def compute_iou(box1: Box, box2: Box) -> float:
    """IoU of two ``[x, y, w, h]`` boxes with the inclusive-pixel convention of the original."""
    ix1 = max(box1[0], box2[0])
    iy1 = max(box1[1], box2[1])
    ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


@dataclass
class GroundingOutcome:
    """Per expression: ref id, split, chosen box (``None`` = none), IoU; and accuracy per split."""

    ref_ids: list[int] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    boxes: list[list[float] | None] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)


def _detections(dets: Mapping[str, Any], image_id: Any, det_file: str) -> list[Box]:
    key = str(image_id)
    if key not in dets:
        raise KeyError(f"{det_file}: no detections for image id {key!r}")
    boxes = dets[key]
    if not isinstance(boxes, list) or not all(isinstance(b, (list, tuple)) and len(b) >= 4 for b in boxes):
        raise ValueError(f"{det_file}: detections of image {key!r} must be a list of [x, y, w, h, ...] lists")
    return boxes


def evaluate_grounding(results: Sequence[Mapping[str, Any]], dets: Mapping[str, Any], refer: Any,
                       alpha: float = BOX_SCORE_ALPHA, skip_empty_fix: bool = False,
                       det_file: str = "det_file") -> GroundingOutcome:
    """Choose and score a detection box per result; every :data:`GROUNDING_SPLITS` split needs a result."""
    outcome = GroundingOutcome()
    correct = dict.fromkeys(GROUNDING_SPLITS, 0)
    total = dict.fromkeys(GROUNDING_SPLITS, 0)
    previous: list[float] | None = None
    for res in results:
        ref_id = int(res["ref_id"])
        if ref_id not in refer.Refs:
            raise KeyError(f"ref_id {ref_id} is not in the REFER annotations")
        ref = refer.Refs[ref_id]
        ref_box = [float(v) for v in refer.refToAnn[ref_id]["bbox"]]
        image = refer.Imgs[ref["image_id"]]
        mask = upsample_map(res["pred"], image["height"], image["width"])
        boxes = _detections(dets, ref["image_id"], det_file)
        scores = [box_score(mask, box, alpha) for box in boxes]
        chosen = select_box(scores, boxes, previous, skip_empty_fix)
        previous = chosen if chosen is not None else previous
        iou = compute_iou(ref_box, chosen) if chosen is not None else 0.0
        split = ref["split"]
        outcome.ref_ids.append(ref_id)
        outcome.splits.append(split)
        outcome.boxes.append(chosen)
        outcome.ious.append(iou)
        if split in total:
            total[split] += 1
            correct[split] += int(iou >= IOU_THRESHOLD)
    empty = [split for split in GROUNDING_SPLITS if total[split] == 0]
    if empty:
        raise ValueError(f"no grounding result belongs to split(s) {empty}: every one of {list(GROUNDING_SPLITS)} "
                         f"needs at least one referring expression in test_file (counts: {total})")
    outcome.accuracy = {f"{split}_d": correct[split] / total[split] for split in GROUNDING_SPLITS}
    return outcome


def grounding_eval(results: Sequence[Mapping[str, Any]], dets: Mapping[str, Any], refer: Any,
                   alpha: float = BOX_SCORE_ALPHA, skip_empty_fix: bool = False,
                   det_file: str = "det_file") -> dict[str, float]:
    """``{"val_d", "testA_d", "testB_d"}`` accuracies (fractions), each printed as ``name: %.3f``."""
    accuracy = evaluate_grounding(results, dets, refer, alpha, skip_empty_fix, det_file).accuracy
    for name, value in accuracy.items():
        print(f"{name}: {value:.3f}")
    return accuracy


def check_evaluation_inputs(ref_ids: Iterable[int], refer: Any, dets: Mapping[str, Any], test_files: Any,
                            det_file: str) -> dict[str, int]:
    """Fail before training if a test expression cannot be evaluated; return expressions per split."""
    counts = dict.fromkeys(GROUNDING_SPLITS, 0)
    unknown: list[int] = []
    no_image: list[Any] = []
    no_dets: list[Any] = []
    for ref_id in ref_ids:
        ref = refer.Refs.get(int(ref_id))
        if ref is None:
            unknown.append(int(ref_id))
            continue
        if ref["image_id"] not in refer.Imgs:
            no_image.append(ref["image_id"])
        if str(ref["image_id"]) not in dets:
            no_dets.append(ref["image_id"])
        if ref["split"] in counts:
            counts[ref["split"]] += 1
    if unknown:
        raise KeyError(f"{test_files}: {len(unknown)} ref_id(s) not in the REFER annotations {refer.source} "
                       f"(e.g. {sorted(set(unknown))[:10]})")
    if no_image:
        raise KeyError(f"{refer.source}: no 'images' entry (height, width) for image id(s) "
                       f"{sorted(set(no_image), key=str)[:10]}")
    if no_dets:
        raise KeyError(f"{det_file}: no detections for image id(s) {sorted(set(no_dets), key=str)[:10]}")
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise ValueError(f"{test_files}: no referring expression of split(s) {empty} (REFER splits of the test "
                         f"refs: {counts}); the evaluation reports {[s + '_d' for s in GROUNDING_SPLITS]}")
    return counts


def load_evaluation_inputs(config: Mapping[str, Any], ref_ids: Iterable[int]) -> tuple[Any, dict[str, Any]]:
    """The REFER annotations and detections the evaluation reads, checked against the test expressions."""
    refer = ReferAnnotations.load(config["refcoco_data"], REFER_DATASET, REFER_SPLIT_BY)
    dets = read_json(config["det_file"])
    if not isinstance(dets, dict):
        raise ValueError(f"{config['det_file']}: expected a JSON object {{image id: [[x, y, w, h, ...], ...]}}")
    counts = check_evaluation_inputs(ref_ids, refer, dets, config["test_file"], config["det_file"])
    print(f"referring expressions to evaluate per split: {counts}")
    return refer, dets
