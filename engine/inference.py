"""Using a trained model: :func:`load`, score, search, rank, Grad-CAM, answer; :func:`export`."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
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
        self.pair_batch = int(config.get("itm_eval_batch_size", 256))

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


def _config_of(checkpoint: dict[str, Any], config: str | os.PathLike | dict[str, Any] | None, task: str
               ) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(with_defaults(config, task))
    if config is not None:
        return dict(with_defaults(load_config(str(config)), task))
    if isinstance(checkpoint.get("config"), dict):
        return dict(with_defaults(checkpoint["config"], task))
    raise ValueError("the checkpoint holds no config: pass config= (the YAML file it was trained with)")


#: File names of the exported form (:func:`export`).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
           config: str | os.PathLike | dict[str, Any] | None = None, trust: bool = False) -> str:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml``; return ``out_dir``."""
    from safetensors.torch import save_file

    state = read_checkpoint(str(checkpoint), trust=trust)
    if isinstance(config, dict):
        written = dict(config)
    elif config is not None:
        written = load_config(str(config))
    elif isinstance(state.get("config"), dict):
        written = dict(state["config"])
    else:
        raise ValueError("the checkpoint holds no config: pass config= (the YAML file it was trained with)")
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
    config = _config_of(state, config, task)
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
