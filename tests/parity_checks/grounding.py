"""Parity check of the grounding Grad-CAM maps and of the box selection / accuracy evaluation."""

from __future__ import annotations

from tests.parity_checks.support import check_tokenized, fixture_config, fixture_tokenizer


def _fixture_refer(inputs: dict):
    """REFER annotations holding the fixture's images (sizes), reference boxes and splits."""
    from dataset.grounding import ReferAnnotations

    refs, images, annotations = [], [], []
    for b, ref_id in enumerate(inputs["ref_ids"].tolist()):
        height, width = inputs["image_hw"][b]
        images.append({"id": b, "height": int(height), "width": int(width)})
        annotations.append({"id": 1000 + b, "image_id": b, "bbox": list(inputs["reference_boxes"][b])})
        refs.append({"ref_id": int(ref_id), "ann_id": 1000 + b, "image_id": b, "split": inputs["splits"][b],
                     "sentences": [{"sent_id": b, "sent": inputs["texts"][b]}]})
    return ReferAnnotations(refs, {"images": images, "annotations": annotations, "categories": []},
                            source="grounding fixture")


def check_grounding(fx: dict) -> dict:
    from engine.grounding_eval import evaluate_grounding, upsample_map
    from models.simla.gradcam import itc_gradcam, itm_gradcam
    from models.simla.retrieval import SIMLA

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["texts"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="longest")
    model = SIMLA(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    ids, mask, image = inputs["text_input_ids"], inputs["text_attention_mask"], inputs["image"]
    block = int(inputs["block_num"])
    maps_itm = itm_gradcam(model, ids, mask, image, block)
    maps_itc = itc_gradcam(model, ids, mask, image, block)

    refer = _fixture_refer(inputs)
    dets = {str(b): boxes for b, boxes in enumerate(inputs["detections"])}
    results = [{"ref_id": int(r), "pred": m} for r, m in zip(inputs["ref_ids"].tolist(), maps_itm)]
    outcome = evaluate_grounding(results, dets, refer)
    upsampled = [upsample_map(m, h, w) for m, (h, w) in zip(maps_itm, inputs["image_hw"])]
    return {
        "gradcam_itm": maps_itm,
        "gradcam_itc": maps_itc,
        "upsampled_maps": upsampled,
        "selected_boxes": outcome.boxes,
        "iou": outcome.ious,
        "accuracy": outcome.accuracy,
    }


CHECKS = {"grounding": check_grounding}
