"""Time the retrieval evaluation and its ITM re-ranking against the original per-query procedure.

python benchmarks/retrieval_eval.py [--preset demo|small|base] [--images 16] [--captions_per_image 5]
    [--k_test 8] [--image_batch 8] [--batch_size 256] [--repeats 5] [--device cpu]
    [--amp none|bf16|fp16] [--checkpoint PATH] [--threads N] [--json out.json]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.memory import peak_rss_mb, rss_mb  # noqa: E402
from engine.retrieval_eval import (  # noqa: E402
    RetrievalFeatures,
    encode_images,
    encode_texts,
    itm_eval,
    per_query_scores,
    rerank,
)
from models.simla.retrieval import SIMLA, checkpoint_filter_fn  # noqa: E402

SMALL_BERT = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 256, "initializer_range": 0.02, "intermediate_size": 1024,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 6, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522,
    "encoder_width": 256, "add_cross_attention": True,
}
COMMON = {"embed_dim": 256, "temp": 0.07, "queue_size": 64, "momentum": 0.995, "mlm_probability": 0.15,
          "vit_mask_token": False, "from_scratch": True}
PRESETS = {
    "demo": dict(COMMON, image_res=64, vision_width=64, vision_depth=4, vision_heads=4, patch_size=16,
                 embed_dim=32, bert_config=os.path.join(REPO_ROOT, "configs", "demo_bert.json")),
    "small": dict(COMMON, image_res=128, vision_width=256, vision_depth=6, vision_heads=4, patch_size=16,
                  bert_config=SMALL_BERT),
    "base": dict(COMMON, image_res=384, vision_width=768,
                 bert_config=os.path.join(REPO_ROOT, "configs", "shared_bert.json")),
}


def synthetic_inputs(model: SIMLA, config: dict, num_images: int, num_texts: int, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images ``(I, 3, res, res)`` and captions (``[CLS]`` + 5..29 random pieces, padded to 30)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.text_encoder.config.vocab_size
    lengths = torch.randint(6, 31, (num_texts,), generator=generator)
    ids = torch.randint(min(1000, vocab // 2), vocab, (num_texts, 30), generator=generator)
    ids[:, 0] = 101
    mask = (torch.arange(30) < lengths[:, None]).long()
    res = int(config["image_res"])
    images = torch.randn(num_images, 3, res, res, generator=generator)
    return images, ids * mask, mask


@torch.no_grad()
def features_of(model: SIMLA, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_batch: int,
                device: torch.device, amp: str = "none") -> RetrievalFeatures:
    """The evaluation's features: images encoded in batches of ``image_batch``, texts in chunks."""
    ids, mask = ids.to(device), mask.to(device)
    image_feats, image_embeds = encode_images(model, images.split(image_batch), device, amp)
    return RetrievalFeatures(ids, mask, encode_texts(model, ids, mask, amp), image_embeds, image_feats)


def count_itm(model: SIMLA) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Rows seen by the ITM head, one entry per fusion pass."""
    rows: list[int] = []
    return rows, model.itm_head.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--k_test", type=int, default=8)
    parser.add_argument("--image_batch", type=int, default=8, help="images per ViT pass (batch_size_test)")
    parser.add_argument("--batch_size", type=int, default=256, help="pairs per fusion pass (itm_eval_batch_size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed whole evaluations (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    parser.add_argument("--checkpoint", default="", help="retrieval or pretraining checkpoint (else random weights)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    after_imports = rss_mb()
    device = torch.device(args.device)
    config = dict(PRESETS[args.preset])
    torch.manual_seed(0)
    model = SIMLA(config=config)
    if args.checkpoint:
        from engine.checkpoint import load_checkpoint_into

        load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "Retrieval.py")
    model = model.to(device).eval()
    num_texts = args.images * args.captions_per_image
    images, ids, mask = synthetic_inputs(model, config, args.images, num_texts)
    txt2img = [t // args.captions_per_image for t in range(num_texts)]
    img2txt = [list(range(i * args.captions_per_image, (i + 1) * args.captions_per_image))
               for i in range(args.images)]

    def evaluate() -> dict[str, float]:
        features = features_of(model, images, ids, mask, args.image_batch, device, args.amp)
        scores = rerank(model, features, args.k_test, args.batch_size, args.amp)
        return itm_eval(scores.score_i2t, scores.score_t2i, txt2img, img2txt)

    evaluate()  # warm-up
    eval_times = [timed(evaluate, device)[1] for _ in range(max(1, args.repeats))]
    evaluation_time = statistics.median(eval_times)

    with torch.no_grad():
        features, feature_time = timed(
            lambda: features_of(model, images, ids, mask, args.image_batch, device, args.amp), device)
    rows, hook = count_itm(model)
    rows.clear()
    fast, fast_time = timed(lambda: rerank(model, features, args.k_test, args.batch_size, args.amp), device)
    fast_rows = list(rows)
    rows.clear()
    slow, slow_time = timed(lambda: per_query_scores(model, features.image_feats, features.image_embeds,
                                                     features.text_ids, features.text_mask,
                                                     features.text_embeds, args.k_test, args.amp), device)
    slow_rows = list(rows)
    hook.remove()

    same_metrics = (itm_eval(fast.score_i2t, fast.score_t2i, txt2img, img2txt)
                    == itm_eval(slow[0], slow[1], txt2img, img2txt))
    diff = max(float(np.abs(fast.score_i2t - slow[0]).max()), float(np.abs(fast.score_t2i - slow[1]).max()))
    figures = {
        "preset": args.preset, "device": str(device), "amp": args.amp, "threads": torch.get_num_threads(),
        "images": args.images, "texts": num_texts, "k_test": args.k_test, "image_batch": args.image_batch,
        "batch_size": args.batch_size,
        "evaluation_seconds_median": round(evaluation_time, 3),
        "evaluation_seconds": [round(t, 3) for t in eval_times],
        "feature_seconds": round(feature_time, 3),
        "per_query_seconds": round(slow_time, 3), "per_query_itm_pairs": sum(slow_rows),
        "per_query_fusion_passes": len(slow_rows),
        "deduplicated_seconds": round(fast_time, 3), "deduplicated_itm_pairs": sum(fast_rows),
        "deduplicated_fusion_passes": len(fast_rows),
        "speedup": round(slow_time / fast_time, 2) if fast_time else float("inf"),
        "max_abs_score_difference": diff, "same_metrics": same_metrics,
        "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(after_imports, 1),
        "peak_rss_above_imports_mb": round(peak_rss_mb() - after_imports, 1),
    }
    print(f"preset {args.preset} on {device} ({torch.get_num_threads()} threads, amp {args.amp}): "
          f"{args.images} images, {num_texts} captions, k_test {args.k_test}, image batches of {args.image_batch}")
    print(f"  whole evaluation (features, ITC, ITM re-ranking, metrics): median {evaluation_time:.3f} s "
          f"of {len(eval_times)} runs")
    print(f"  features {feature_time:.2f} s; re-ranking alone:")
    print(f"  one query per fusion pass : {slow_time:8.2f} s  {sum(slow_rows):7d} ITM pairs  "
          f"{len(slow_rows):5d} passes")
    print(f"  de-duplicated, batched    : {fast_time:8.2f} s  {sum(fast_rows):7d} ITM pairs  "
          f"{len(fast_rows):5d} passes  ({figures['speedup']}x faster)")
    print(f"  max |score difference| {diff:.2e}; identical metrics: {same_metrics}")
    print(f"  peak RSS {figures['peak_rss_mb']} MB, {figures['peak_rss_above_imports_mb']} MB above the RSS "
          f"after imports ({figures['rss_after_imports_mb']} MB)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    main()
