"""VQA v2 and Visual Genome QA datasets (``create_dataset("vqa", config)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from configs.schema import with_defaults
from dataset.annotations import (
    AnnotationError,
    as_file_list,
    join_image_path,
    load_annotations,
    read_json,
    require_text,
)
from dataset.collate import vqa_collate_fn
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, max_pixels_from_config
from dataset.text import pre_question
from dataset.transforms import build_transforms

SPLITS = ("train", "test")
SOURCES = ("vqa", "vg")
TEST_MAX_QUESTION_WORDS = 50
VG_ANSWER_WEIGHT = 0.5


def load_answer_list(path: str) -> list[str]:
    """The JSON list of candidate answers ranked at test time."""
    answers = read_json(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise AnnotationError(f"{path}: the answer list must be a non-empty JSON list of strings")
    return answers


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-occurrence order, each weighted by its share of ``answers``."""
    weights: dict[str, float] = {}
    share = 1 / len(answers)
    for answer in answers:
        # added one share at a time, as the original, so eight of ten give 0.7999999999999999
        weights[answer] = weights.get(answer, 0.0) + share
    return list(weights), list(weights.values())


def _check_entries(entries: Sequence[dict], where: str, split: str, seen: set[int]) -> None:
    """Check the fields of one file's entries; ``seen`` collects test question ids across files."""
    for index, entry in enumerate(entries):
        require_text(entry, "question", where, index)
        require_text(entry, "image", where, index)
        source = entry.get("dataset", "vqa")
        if source not in SOURCES:
            raise AnnotationError(f"{where}: entry {index} has dataset {source!r}; expected 'vqa' or 'vg'")
        if split == "train":
            answer = entry["answer"]
            if source == "vg":
                ok, expected = isinstance(answer, str), "a string"
            else:
                ok = isinstance(answer, list) and bool(answer) and all(isinstance(a, str) for a in answer)
                expected = "a non-empty list of strings"
            if not ok:
                raise AnnotationError(f"{where}: entry {index} ({source}) has answer {answer!r}; "
                                      f"expected {expected}")
            continue
        qid = entry["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise AnnotationError(f"{where}: entry {index} has question_id {qid!r}; expected an integer")
        if qid in seen:
            raise AnnotationError(f"{where}: question_id {qid} appears more than once (entry {index})")
        seen.add(qid)
        answer = entry.get("answer")
        if answer is not None and not (isinstance(answer, list) and all(isinstance(a, str) for a in answer)):
            raise AnnotationError(f"{where}: entry {index} (question {qid}) has answer {answer!r}; "
                                  "expected a list of annotator answers")


class VQADataset(Dataset):
    """One split of VQA / VG question-answer pairs from one or more JSON files."""

    def __init__(self, ann_file: str | Sequence[str], transform: Callable[[Any], torch.Tensor], vqa_root: str,
                 vg_root: str, eos: str = "[SEP]", split: str = "train", max_ques_words: int = 30,
                 answer_list: str = "", max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        files = as_file_list(ann_file, "train_file" if split == "train" else "test_file")
        required = ("question", "image", "dataset", "answer") if split == "train" else ("question", "image",
                                                                                          "question_id")
        self.ann: list[dict] = []
        seen_ids: set[int] = set()
        for path in files:
            entries = load_annotations([path], required)
            _check_entries(entries, path, split, seen_ids)
            self.ann.extend(entries)
        self.transform = transform
        self.vqa_root = vqa_root
        self.vg_root = vg_root
        self.eos = eos
        self.split = split
        self.max_ques_words = max_ques_words
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=split == "train")
        self.collate_fn = CountedVQACollate() if split == "train" else None
        self.answer_list: list[str] = []
        self.answers_by_question_id: dict[int, list[str]] = {}
        if split == "test":
            self.max_ques_words = TEST_MAX_QUESTION_WORDS
            if not answer_list:
                raise AnnotationError("the VQA test split needs the config key 'answer_list' (a JSON file)")
            self.answer_list = load_answer_list(answer_list)
            self.answers_by_question_id = {int(e["question_id"]): list(e["answer"]) for e in self.ann
                                           if isinstance(e.get("answer"), list) and e["answer"]}

    def __len__(self) -> int:
        return len(self.ann)

    def image_path(self, entry: Mapping[str, Any]) -> str:
        root = self.vg_root if entry.get("dataset", "vqa") == "vg" else self.vqa_root
        return join_image_path(root, entry["image"])

    def question_ids(self) -> list[int]:
        """The question ids of the test split, in file order."""
        return [int(entry["question_id"]) for entry in self.ann]

    def __getitem__(self, index: int):
        entry = self.ann[index]
        path = self.image_path(entry)
        question = pre_question(entry["question"], self.max_ques_words)
        if self.split == "test":
            qid = int(entry["question_id"])
            return self.transform(self.read_image(path, index, f"question {qid}")), question, qid
        image = self.read_image(path, index)
        if image is None:
            return None
        image = self.transform(image)
        if entry["dataset"] == "vqa":
            answers, weights = answer_weights(entry["answer"])
        else:
            answers, weights = [entry["answer"]], [VG_ANSWER_WEIGHT]
        return image, question, [answer + self.eos for answer in answers], weights


class CountedVQACollate:
    """:func:`dataset.collate.vqa_collate_fn` returning ``(batch_or_None, number_of_unreadable_samples)``."""

    def __call__(self, batch: Sequence[Any]) -> tuple[Any, int]:
        failed = sum(sample is None for sample in batch)
        return vqa_collate_fn(batch), failed

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def create_vqa_datasets(config: Mapping[str, Any]) -> tuple[VQADataset, VQADataset]:
    """``(train, test)`` as the original ``create_dataset("vqa", config)``."""
    config = with_defaults(config, "vqa")
    transforms = build_transforms(config)
    pixels = max_pixels_from_config(config)
    train = VQADataset(config["train_file"], transforms["train"], config["vqa_root"], config["vg_root"],
                       split="train", max_image_pixels=pixels)
    test = VQADataset(config["test_file"], transforms["test"], config["vqa_root"], config["vg_root"],
                      split="test", answer_list=config["answer_list"], max_image_pixels=pixels)
    return train, test
