"""Use a trained model: search images with a sentence, score image-text pairs, show where the model
looks, answer questions (a VQA checkpoint), export the weights.

    python Predict.py search --checkpoint C --images DIR --query TEXT -k 3 --out OUT
    python Predict.py score --checkpoint C --image PATH --text TEXT [--text TEXT ...] --out OUT
    python Predict.py ground --checkpoint C --image PATH --text TEXT --block_num 8 --out OUT
    python Predict.py answer --checkpoint VQA_C --image PATH --question TEXT --out OUT
    python Predict.py export --checkpoint C --out DIR

Every option is given after the subcommand. With ``--out`` the results are also written there: a
contact sheet of the search results (``search.png``), the Grad-CAM heat map over the image with the
text as caption (``ground.png``) and a JSON of every number printed (``search.json``, ``score.json``,
``ground.json``, ``answer.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _common(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint (.pth) or an exported folder / model.safetensors")
    parser.add_argument("--config", default=None, help="YAML config (default: the one saved with the weights)")
    parser.add_argument("--text_encoder", default="bert-base-uncased",
                        help="Hugging Face BERT name or folder, or a vocab.txt (the tokenizer)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                        help="autocast precision (bf16 on a GPU)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow a checkpoint that only loads with full unpickling")
    parser.add_argument("--out", default=None, help=out_help)


def get_parser() -> argparse.ArgumentParser:
    """The parser of the subcommands ``search``, ``score``, ``ground``, ``answer`` and ``export``."""
    parser = argparse.ArgumentParser(description="SIMLA inference on your own images and texts")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="rank the images of a folder for a sentence")
    _common(search, "write search.png (contact sheet) and search.json here")
    search.add_argument("--images", required=True, help="folder of images (searched recursively)")
    search.add_argument("--query", required=True)
    search.add_argument("-k", type=int, default=5, help="number of results (at most k_test)")
    search.add_argument("--cache", default=None, help="safetensors file caching the image features")
    score = commands.add_parser("score", help="ITC similarity and ITM match probability of image-text pairs")
    _common(score, "write score.json here")
    score.add_argument("--image", required=True)
    score.add_argument("--text", required=True, action="append", help="a text (repeat for several)")
    ground = commands.add_parser("ground", help="Grad-CAM map of a text on an image (as the grounding evaluation)")
    _common(ground, "write ground.png (heat map) and ground.json here")
    ground.add_argument("--image", required=True)
    ground.add_argument("--text", required=True)
    ground.add_argument("--block_num", type=int, default=8, help="text-encoder layer (itm) or ViT block (itc)")
    ground.add_argument("--gradcam_mode", default="itm", choices=["itm", "itc"])
    answer = commands.add_parser("answer", help="ranked answers to a question (a VQA checkpoint)")
    _common(answer, "write answer.json here")
    answer.add_argument("--image", required=True)
    answer.add_argument("--question", required=True)
    answer.add_argument("--answer_list", default=None, help="JSON list of candidate answers (default: the config's)")
    export = commands.add_parser("export", help="write model.safetensors + config.yaml")
    _common(export, "the folder to write (required)")
    return parser


def image_files(folder: str) -> list[str]:
    """The image files under ``folder``, sorted."""
    found = []
    for root, _dirs, files in os.walk(folder):
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)


def _write_json(out: str, name: str, data: Any) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)


def run_search(predictor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Search ``args.images`` for ``args.query``; print, and with ``--out`` write the sheet and JSON."""
    from dataset.images import read_rgb
    from engine.pictures import contact_sheet

    files = image_files(args.images)
    if not files:
        raise SystemExit(f"no images found under {args.images}")
    results = predictor.search(args.query, files, k=args.k, cache=args.cache)
    rows = [{"rank": n + 1, "image": files[r.index], "itm": r.itm, "itc": r.itc} for n, r in enumerate(results)]
    for row in rows:
        print(f"{row['rank']:3d}  itm {row['itm']:8.4f}  itc {row['itc']:7.4f}  {row['image']}")
    data = {"query": args.query, "results": rows}
    if args.out:
        sheet = contact_sheet([read_rgb(row["image"]) for row in rows],
                              [f"#{row['rank']} itm {row['itm']:.3f}" for row in rows], title=args.query)
        os.makedirs(args.out, exist_ok=True)
        sheet.save(os.path.join(args.out, "search.png"))
        _write_json(args.out, "search.json", data)
    return data


def run_score(predictor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Score ``args.image`` with every ``args.text``; print, and with ``--out`` write the JSON."""
    sims = predictor.similarity([args.image], args.text, rerank=True)
    rows = [{"text": text, "itc": float(sims.itc[0, t]), "itm": float(sims.itm[0, t])}
            for t, text in enumerate(args.text)]
    for row in rows:
        print(f"itc {row['itc']:7.4f}  itm {row['itm']:.4f}  {row['text']}")
    data = {"image": args.image, "results": rows}
    if args.out:
        _write_json(args.out, "score.json", data)
    return data


def run_ground(predictor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Grad-CAM of ``args.text`` on ``args.image``; print, and with ``--out`` write the picture and JSON."""
    from dataset.images import read_rgb
    from engine.pictures import heat_map_picture

    result = predictor.ground(args.image, args.text, block_num=args.block_num, mode=args.gradcam_mode)
    grid = result.map.tolist()
    flat = int(result.map.argmax())
    peak = [flat // result.map.shape[1], flat % result.map.shape[1]]
    print(f"Grad-CAM ({args.gradcam_mode}, block {args.block_num}) on the {len(grid)}x{len(grid[0])} patch grid, "
          f"peak at row {peak[0]} column {peak[1]}:")
    for row in grid:
        print("  " + " ".join(f"{v:.3e}" for v in row))
    data = {"image": args.image, "text": args.text, "block_num": args.block_num, "mode": args.gradcam_mode,
            "map": grid, "peak": peak}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        picture = heat_map_picture(read_rgb(args.image), result.heat.numpy(), args.text)
        picture.save(os.path.join(args.out, "ground.png"))
        _write_json(args.out, "ground.json", data)
    return data


def run_answer(predictor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Answer ``args.question`` about ``args.image``; print, and with ``--out`` write the JSON."""
    from dataset.vqa import load_answer_list

    answer_list = load_answer_list(args.answer_list) if args.answer_list else None
    ranked = predictor.answer(args.image, args.question, answer_list)
    rows = [{"rank": n + 1, "answer": answer, "probability": prob} for n, (answer, prob) in enumerate(ranked)]
    for row in rows:
        print(f"{row['rank']:3d}  {row['probability']:.4f}  {row['answer']}")
    data = {"image": args.image, "question": args.question, "results": rows}
    if args.out:
        _write_json(args.out, "answer.json", data)
    return data


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    """Run one subcommand; returns what it printed (as data) or, for ``export``, the folder."""
    args = get_parser().parse_args(argv)
    from engine import inference

    if args.command == "export":
        if not args.out:
            raise SystemExit("export needs --out DIR")
        out = inference.export(args.checkpoint, args.out, config=args.config, trust=args.trust_checkpoint)
        print(f"wrote {os.path.join(out, inference.WEIGHTS_FILE)} and {os.path.join(out, inference.CONFIG_FILE)}")
        return out
    predictor = inference.load(args.checkpoint, config=args.config, text_encoder=args.text_encoder,
                               device=args.device, task="vqa" if args.command == "answer" else "retrieval",
                               trust=args.trust_checkpoint, amp=args.amp)
    runs = {"search": run_search, "score": run_score, "ground": run_ground, "answer": run_answer}
    return runs[args.command](predictor, args)


if __name__ == "__main__":
    main()
