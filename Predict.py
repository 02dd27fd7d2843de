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
from collections.abc import Sequence
from typing import Any


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


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    """Run one subcommand; returns what it printed (as data) or, for ``export``, the folder."""
    args = get_parser().parse_args(argv)
    from engine.inference import run_command

    return run_command(args)


if __name__ == "__main__":
    main()
