"""Using a trained model: :func:`load`, score, search, rank, Grad-CAM, answer; :func:`export`;
:func:`run_command` (the subcommands of ``Predict.py``)."""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from configs import load_config, save_config, with_defaults
from dataset.images import read_rgb, to_rgb
from dataset.text import pre_question
from dataset.transforms import build_transforms
from dataset.vqa import TEST_MAX_QUESTION_WORDS, load_answer_list
from engine.checkpoint import load_filtered_state, prepare_state, read_checkpoint
from engine.grounding_eval import box_score, grounding_maps, select_box, upsample_map
from engine.pictures import contact_sheet, heat_map_picture
from engine.retrieval_eval import (
    RetrievalFeatures,
    encode_images,
    encode_texts,
    score_pairs,
    tokenize_texts,
)
from engine.vqa_eval import tokenize_answers
from models.precision import autocast
from models.simla.gradcam import DEFAULT_BLOCK_NUM
from models.simla.retrieval import SIMLA, checkpoint_filter_fn
from models.simla.vqa import SIMLA as SIMLAVQA
from models.simla.vqa import checkpoint_filter_fn as vqa_filter_fn
from models.tokenization import build_tokenizer

#: An image: a file path, a PIL image or a transformed ``(3, H, W)`` tensor.
ImageInput = str | os.PathLike | Image.Image | torch.Tensor


@dataclass
class Similarity:
    """``itc``: ``(I, T)`` ITC similarities; ``itm``: ``(I, T)`` ITM match probabilities (or ``None``)."""

    itc: torch.Tensor
    itm: torch.Tensor | None = None


@dataclass
class SearchResult:
    """One ranked result: the candidate's index, its ITM match logit and its ITC similarity."""

    index: int
    itm: float
    itc: float


@dataclass
class Grounding:
    """A Grad-CAM map: ``map`` on the patch grid, ``heat`` at image size, box scores and the chosen box."""

    map: torch.Tensor
    heat: torch.Tensor
    box_scores: list[float] | None = None
    box: list[float] | None = None


def _in_precision(method: Any) -> Any:
    """Run a public method under the predictor's autocast precision (``amp``)."""

    @functools.wraps(method)
    def run(self: _ModelInputs, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.device, self.amp):
            return method(self, *args, **kwargs)

    return run


class _ModelInputs:
    """A model in eval mode with its tokenizer, config, test-time image transform and precision."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: dict[str, Any], device: torch.device,
                 amp: str = "none") -> None:
        self.amp = amp
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.transform = build_transforms(config)["test"]
        self.batch_size = int(config.get("batch_size_test", 32))
        self.k_test = int(config.get("k_test", 256))

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """The transformed ``(3, H, W)`` tensor of one image (tensors are taken as already transformed)."""
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, Image.Image):
            return self.transform(to_rgb(image))
        return self.transform(read_rgb(str(image)))

    def _batches(self, images: Sequence[ImageInput]):
        for start in range(0, len(images), self.batch_size):
            yield torch.stack([self.image_tensor(img) for img in images[start:start + self.batch_size]])


class Predictor(_ModelInputs):
    """A retrieval model: similarities, two-stage search and Grad-CAM grounding."""

    def __init__(self, model: SIMLA, tokenizer: Any, config: dict[str, Any], device: torch.device,
                 amp: str = "none") -> None:
        super().__init__(model, tokenizer, config, device, amp)
        self.pair_batch = int(config["itm_eval_batch_size"])

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT states ``(n, N+1, D)`` and normalised ITC embeddings ``(n, E)``, in batches of ``batch_size_test``."""
        return encode_images(self.model, self._batches(list(images)), self.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, masks (as the evaluation pads them) and normalised ITC embeddings of ``texts``."""
        ids, mask = tokenize_texts(self.tokenizer, list(texts), self.device)
        return ids, mask, encode_texts(self.model, ids, mask)

    def cached_image_features(self, images: Sequence[ImageInput], cache: str | os.PathLike | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_images`, cached in the safetensors file ``cache`` when all images are paths."""
        images = list(images)
        keyed = cache is not None and all(isinstance(i, (str, os.PathLike)) for i in images)
        names = [os.path.abspath(str(i)) for i in images] if keyed else []
        if keyed and os.path.exists(str(cache)):
            from safetensors import safe_open

            with safe_open(str(cache), framework="pt", device="cpu") as handle:
                if json.loads((handle.metadata() or {}).get("paths", "[]")) == names:
                    return (handle.get_tensor("image_feats").to(self.device),
                            handle.get_tensor("image_embeds").to(self.device))
        feats, embeds = self.encode_images(images)
        if keyed:
            from safetensors.torch import save_file

            save_file({"image_feats": feats.contiguous().cpu(), "image_embeds": embeds.contiguous().cpu()},
                      str(cache), metadata={"paths": json.dumps(names)})
        return feats, embeds

    @torch.no_grad()
    @_in_precision
    def similarity(self, images: Sequence[ImageInput], texts: Sequence[str], rerank: bool = False) -> Similarity:
        """ITC similarities of every image with every text; with ``rerank`` also ITM match probabilities."""
        feats, image_embeds = self.encode_images(images)
        ids, mask, text_embeds = self.encode_texts(texts)
        itc = (image_embeds @ text_embeds.t()).float()
        if not rerank:
            return Similarity(itc.cpu())
        num_texts = len(texts)
        features = RetrievalFeatures(ids, mask, text_embeds, image_embeds, feats)
        pairs = torch.arange(len(images) * num_texts, device=self.device)
        probs = self._match_probabilities(features, pairs, num_texts)
        return Similarity(itc.cpu(), probs.view(len(images), num_texts).cpu())

    def _match_probabilities(self, features: RetrievalFeatures, pairs: torch.Tensor, num_texts: int) -> torch.Tensor:
        images, texts = pairs // num_texts, pairs % num_texts
        out = []
        for chunk in range(0, pairs.shape[0], self.pair_batch):
            sel = slice(chunk, chunk + self.pair_batch)
            logits = self.model.itm_logits(features.text_ids[texts[sel]], features.text_mask[texts[sel]],
                                           features.image_feats[images[sel]])
            out.append(logits.float().softmax(dim=1)[:, 1])
        return torch.cat(out)

    @torch.no_grad()
    @_in_precision
    def search(self, query: str | ImageInput, candidates: Sequence[Any], k: int = 10,
               cache: str | os.PathLike | None = None) -> list[SearchResult]:
        """Rank ``candidates`` as the retrieval evaluation (ITC top ``k_test``, ITM); the first ``k``."""
        candidates = list(candidates)
        if isinstance(query, str):
            feats, image_embeds = self.cached_image_features(candidates, cache)
            ids, mask, text_embeds = self.encode_texts([query])
            itc = (image_embeds @ text_embeds.t())[:, 0]
            num_texts = 1
        else:
            feats, image_embeds = self.encode_images([query])
            ids, mask, text_embeds = self.encode_texts(candidates)
            itc = (image_embeds @ text_embeds.t())[0]
            num_texts = len(candidates)
        top = itc.topk(min(self.k_test, itc.shape[0])).indices
        features = RetrievalFeatures(ids, mask, text_embeds, image_embeds, feats)
        order = torch.argsort(top)
        logits = torch.empty(top.shape[0], device=self.device)
        logits[order] = score_pairs(self.model, top[order], num_texts, features, self.pair_batch,
                                    print_freq=10**9)
        ranked = torch.argsort(logits, descending=True, stable=True)[:k]
        return [SearchResult(int(top[r]), float(logits[r]), float(itc[top[r]])) for r in ranked]

    @_in_precision
    def ground(self, image: ImageInput, text: str, block_num: int = DEFAULT_BLOCK_NUM, mode: str = "itm",
               boxes: Sequence[Sequence[float]] | None = None) -> Grounding:
        """Grad-CAM map of ``text`` on ``image``; with ``boxes`` (``x, y, w, h`` pixels) the chosen box."""
        tensor = self.image_tensor(image)
        if isinstance(image, torch.Tensor):
            height, width = tensor.shape[-2:]
        else:
            size = image.size if isinstance(image, Image.Image) else read_rgb(str(image)).size
            width, height = size
        batch = [(tensor[None], [text], [0])]
        cam = grounding_maps(self.model, batch, self.tokenizer, self.device, mode, block_num)[0]["pred"]
        heat = upsample_map(cam, int(height), int(width))
        if not boxes:
            return Grounding(cam, heat)
        scores = [box_score(heat, box) for box in boxes]
        return Grounding(cam, heat, scores, select_box(scores, boxes, None, skip_empty_fix=True))


class VQAPredictor(_ModelInputs):
    """A VQA model: ranked answers to questions about images."""

    @torch.no_grad()
    @_in_precision
    def answer(self, image: ImageInput, question: str, answer_list: Sequence[str] | None = None
               ) -> list[tuple[str, float]]:
        """``(answer, probability)`` of the ``k_test`` re-ranked answers, best first (VQA.py's answer)."""
        if answer_list is None:
            answer_list = load_answer_list(self.config["answer_list"])
        answers = list(answer_list)
        answer_input = tokenize_answers(self.tokenizer, answers, self.config["eos"], self.device)
        question_input = self.tokenizer([pre_question(question, TEST_MAX_QUESTION_WORDS)], padding="longest",
                                        return_tensors="pt").to(self.device)
        image_batch = self.image_tensor(image)[None].to(self.device)
        topk_ids, topk_probs = self.model(image_batch, question_input, answer_input, train=False,
                                          k=min(self.k_test, len(answers)))
        order = torch.argsort(topk_probs[0], descending=True, stable=True)
        return [(answers[int(topk_ids[0, i])], float(topk_probs[0, i])) for i in order]


def _given_config(checkpoint: dict[str, Any], config: str | os.PathLike | dict[str, Any] | None) -> dict[str, Any]:
    """``config`` (a dict or a YAML file), else the config saved in ``checkpoint``."""
    if isinstance(config, dict):
        return dict(config)
    if config is not None:
        return load_config(str(config))
    if isinstance(checkpoint.get("config"), dict):
        return dict(checkpoint["config"])
    raise ValueError("the checkpoint holds no config: pass config= (the YAML file it was trained with)")


#: File names of the exported form (:func:`export`).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
           config: str | os.PathLike | dict[str, Any] | None = None, trust: bool = False) -> str:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml``; return ``out_dir``."""
    from safetensors.torch import save_file

    state = read_checkpoint(str(checkpoint), trust=trust)
    written = _given_config(state, config)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()
               if isinstance(v, torch.Tensor)}
    save_file(tensors, os.path.join(os.fspath(out_dir), WEIGHTS_FILE))
    save_config(written, out_dir)
    return os.fspath(out_dir)


def _read_exported(path: str) -> dict[str, Any]:
    """``{"model": state, "config": config}`` of an exported folder (or its ``model.safetensors``)."""
    from safetensors.torch import load_file

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    state: dict[str, Any] = {"model": load_file(os.path.join(folder, WEIGHTS_FILE))}
    config_path = os.path.join(folder, CONFIG_FILE)
    if os.path.exists(config_path):
        state["config"] = load_config(config_path)
    return state


def load(checkpoint: str | os.PathLike, config: str | os.PathLike | dict[str, Any] | None = None,
         text_encoder: str = "bert-base-uncased", device: str | torch.device = "cpu", task: str = "retrieval",
         trust: bool = False, amp: str = "none") -> Predictor | VQAPredictor:
    """Load ``checkpoint`` into the ``task`` (``retrieval``/``vqa``) model of ``config`` (default: the saved),
    in eval mode on ``device``; an :func:`export` folder is read without pickle."""
    if task not in ("retrieval", "vqa"):
        raise ValueError(f"task must be 'retrieval' or 'vqa', got {task!r}")
    path = os.fspath(checkpoint)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        state = _read_exported(path)
    else:
        state = read_checkpoint(path, trust=trust)
    config = dict(with_defaults(_given_config(state, config), task))
    tokenizer = build_tokenizer(text_encoder)
    device = torch.device(device)
    if task == "vqa":
        vqa_model = SIMLAVQA(text_encoder=text_encoder, tokenizer=tokenizer, config=config)
        load_filtered_state(vqa_model, prepare_state(state["model"], vqa_model, vqa_filter_fn, own=True), path,
                            "VQA.py")
        return VQAPredictor(vqa_model.to(device), tokenizer, config, device, amp)
    model = SIMLA(config=config, text_encoder=text_encoder, tokenizer=tokenizer)
    load_filtered_state(model, prepare_state(state["model"], model, checkpoint_filter_fn), path, "Retrieval.py")
    return Predictor(model.to(device), tokenizer, config, device, amp)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: What a ``Predict.py`` subcommand returns: its results and, where it draws one, its picture (drawn on demand).
Outcome = tuple[dict[str, Any], Callable[[], Image.Image] | None]


def image_files(folder: str) -> list[str]:
    """The image files under ``folder``, sorted."""
    found = []
    for root, _dirs, files in os.walk(folder):
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)


def _search(predictor: Predictor, args: argparse.Namespace) -> Outcome:
    files = image_files(args.images)
    if not files:
        raise SystemExit(f"no images found under {args.images}")
    results = predictor.search(args.query, files, k=args.k, cache=args.cache)
    rows = [{"rank": n + 1, "image": files[r.index], "itm": r.itm, "itc": r.itc} for n, r in enumerate(results)]
    for row in rows:
        print(f"{row['rank']:3d}  itm {row['itm']:8.4f}  itc {row['itc']:7.4f}  {row['image']}")
    return {"query": args.query, "results": rows}, lambda: contact_sheet(
        [read_rgb(row["image"]) for row in rows], [f"#{row['rank']} itm {row['itm']:.3f}" for row in rows],
        title=args.query)


def _score(predictor: Predictor, args: argparse.Namespace) -> Outcome:
    sims = predictor.similarity([args.image], args.text, rerank=True)
    rows = [{"text": text, "itc": float(sims.itc[0, t]), "itm": float(sims.itm[0, t])}
            for t, text in enumerate(args.text)]
    for row in rows:
        print(f"itc {row['itc']:7.4f}  itm {row['itm']:.4f}  {row['text']}")
    return {"image": args.image, "results": rows}, None


def _ground(predictor: Predictor, args: argparse.Namespace) -> Outcome:
    result = predictor.ground(args.image, args.text, block_num=args.block_num, mode=args.gradcam_mode)
    grid = result.map.tolist()
    peak = list(divmod(int(result.map.argmax()), result.map.shape[1]))
    print(f"Grad-CAM ({args.gradcam_mode}, block {args.block_num}) on the {len(grid)}x{len(grid[0])} patch grid, "
          f"peak at row {peak[0]} column {peak[1]}:")
    for row in grid:
        print("  " + " ".join(f"{v:.3e}" for v in row))
    data = {"image": args.image, "text": args.text, "block_num": args.block_num, "mode": args.gradcam_mode,
            "map": grid, "peak": peak}
    return data, lambda: heat_map_picture(read_rgb(args.image), result.heat.numpy(), args.text)


def _answer(predictor: VQAPredictor, args: argparse.Namespace) -> Outcome:
    answers = load_answer_list(args.answer_list) if args.answer_list else None
    ranked = predictor.answer(args.image, args.question, answers)
    rows = [{"rank": n + 1, "answer": answer, "probability": prob} for n, (answer, prob) in enumerate(ranked)]
    for row in rows:
        print(f"{row['rank']:3d}  {row['probability']:.4f}  {row['answer']}")
    return {"image": args.image, "question": args.question, "results": rows}, None


def run_command(args: argparse.Namespace) -> dict[str, Any] | str:
    """Run a ``Predict.py`` subcommand: print its results and, with ``--out``, write ``<command>.json`` (and its
    picture, ``<command>.png``); return the results or, for ``export``, the folder."""
    if args.command == "export":
        if not args.out:
            raise SystemExit("export needs --out DIR")
        out = export(args.checkpoint, args.out, config=args.config, trust=args.trust_checkpoint)
        print(f"wrote {os.path.join(out, WEIGHTS_FILE)} and {os.path.join(out, CONFIG_FILE)}")
        return out
    predictor = load(args.checkpoint, config=args.config, text_encoder=args.text_encoder, device=args.device,
                     task="vqa" if args.command == "answer" else "retrieval", trust=args.trust_checkpoint,
                     amp=args.amp)
    commands = {"search": _search, "score": _score, "ground": _ground, "answer": _answer}
    data, picture = commands[args.command](predictor, args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        if picture is not None:
            picture().save(os.path.join(args.out, f"{args.command}.png"))
        with open(os.path.join(args.out, f"{args.command}.json"), "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
    return data
