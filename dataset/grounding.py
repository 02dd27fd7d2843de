"""RefCOCO+-style grounding datasets (the original ``create_dataset("grounding")``) and a REFER reader."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from configs.schema import with_defaults
from dataset.annotations import (
    AnnotationError,
    annotations_by_file,
    as_file_list,
    join_image_path,
    read_json,
)
from dataset.collate import SafeCollate
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, max_pixels_from_config
from dataset.text import pre_caption
from dataset.transforms import build_transforms

Transform = Callable[[Any], torch.Tensor]


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples, strings and numbers only (REFER ``refs(*).p`` files)."""

    def __init__(self, handle: Any, path: str) -> None:
        super().__init__(handle, encoding="utf-8")  # Python 2 pickles hold byte strings (ASCII / UTF-8 text)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{self.path}: refuses to load the pickled object {module}.{name}; a REFER "
                                     "refs file holds only lists, dicts, strings and numbers")


def read_refs_pickle(path: str) -> list[dict[str, Any]]:
    """The list of refs stored in a REFER ``refs(<split_by>).p`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"REFER refs file not found: {path}")
    with open(path, "rb") as handle:
        try:
            refs = _PlainUnpickler(handle, path).load()
        except (EOFError, UnicodeDecodeError, ValueError) as exc:
            raise AnnotationError(f"{path}: not a readable REFER refs pickle ({exc})") from None
    if not isinstance(refs, list):
        raise AnnotationError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    return refs


def _require(entry: Any, fields: Sequence[str], where: str, index: int) -> None:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: entry {index} is a {type(entry).__name__}, expected an object")
    for name in fields:
        if name not in entry:
            raise AnnotationError(f"{where}: entry {index} has no field {name!r} (fields: {sorted(entry)})")


class ReferAnnotations:
    """The lookups of the original ``REFER`` class that grounding needs (``Refs``, ``Anns``, ``Imgs``, ...)."""

    def __init__(self, refs: Sequence[Mapping[str, Any]], instances: Mapping[str, Any],
                 source: str = "REFER annotations") -> None:
        self.source = source
        for key in ("images", "annotations"):
            if not isinstance(instances.get(key), list):
                raise AnnotationError(f"{source}: instances must hold a list under {key!r}")
        self.Anns: dict[Any, dict] = {}
        self.Imgs: dict[Any, dict] = {}
        self.Cats: dict[Any, str] = {}
        self.imgToAnns: dict[Any, list[dict]] = {}
        for index, ann in enumerate(instances["annotations"]):
            _require(ann, ("id", "image_id", "bbox"), f"{source} (annotations)", index)
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise AnnotationError(f"{source} (annotations): entry {index} 'bbox' must be [x, y, w, h], "
                                      f"got {bbox!r}")
            self.Anns[ann["id"]] = ann
            self.imgToAnns.setdefault(ann["image_id"], []).append(ann)
        for index, img in enumerate(instances["images"]):
            _require(img, ("id", "height", "width"), f"{source} (images)", index)
            self.Imgs[img["id"]] = img
        for index, cat in enumerate(instances.get("categories") or []):
            _require(cat, ("id", "name"), f"{source} (categories)", index)
            self.Cats[cat["id"]] = cat["name"]

        self.Refs: dict[Any, dict] = {}
        self.refToAnn: dict[Any, dict] = {}
        self.annToRef: dict[Any, dict] = {}
        self.imgToRefs: dict[Any, list[dict]] = {}
        self.Sents: dict[Any, dict] = {}
        self.sentToRef: dict[Any, dict] = {}
        for index, ref in enumerate(refs):
            _require(ref, ("ref_id", "ann_id", "image_id", "split"), f"{source} (refs)", index)
            if ref["ann_id"] not in self.Anns:
                raise AnnotationError(f"{source}: ref {ref['ref_id']} points to annotation id {ref['ann_id']}, "
                                      "which instances.json does not have")
            self.Refs[ref["ref_id"]] = ref
            self.refToAnn[ref["ref_id"]] = self.Anns[ref["ann_id"]]
            self.annToRef[ref["ann_id"]] = ref
            self.imgToRefs.setdefault(ref["image_id"], []).append(ref)
            for sent in ref.get("sentences") or []:
                if isinstance(sent, dict) and "sent_id" in sent:
                    self.Sents[sent["sent_id"]] = sent
                    self.sentToRef[sent["sent_id"]] = ref

    @classmethod
    def load(cls, data_root: str, dataset: str = "refcoco+", split_by: str = "unc") -> ReferAnnotations:
        """Read ``<data_root>/<dataset>/refs(<split_by>).p`` and ``instances.json``."""
        folder = os.path.join(data_root, dataset)
        refs_path = os.path.join(folder, f"refs({split_by}).p")
        instances_path = os.path.join(folder, "instances.json")
        refs = read_refs_pickle(refs_path)
        instances = read_json(instances_path)
        if not isinstance(instances, dict):
            raise AnnotationError(f"{instances_path}: expected a JSON object with images/annotations/categories")
        return cls(refs, instances, source=f"{refs_path} + {instances_path}")

    def ref_ids(self, split: str | None = None) -> list[Any]:
        """Ids of every ref, or of the refs of one split, in file order."""
        return [ref_id for ref_id, ref in self.Refs.items() if split is None or ref["split"] == split]

    def ref_box(self, ref_id: Any) -> list[float]:
        """Ground-truth box ``[x, y, w, h]`` of a ref."""
        return [float(v) for v in self.refToAnn[ref_id]["bbox"]]


class GroundingDataset(Dataset):
    """``(image, expression, image index)`` (train; unreadable: ``None``), test: ``(..., ref_id)``."""

    def __init__(self, ann_file: str | Sequence[str], transform: Transform, image_root: str | None,
                 max_words: int = 30, mode: str = "train", key: str = "train_file",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"grounding dataset mode must be 'train' or 'test', got {mode!r}")
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.mode = mode
        self.read_image = ImageReader(max_image_pixels, skip_unreadable=mode == "train")
        self.collate_fn = SafeCollate() if mode == "train" else None
        required = ("image", "text", "ref_id") if mode == "test" else ("image", "text")
        self.ann: list[dict] = []
        for path, index, entry in annotations_by_file(as_file_list(ann_file, key), required=required):
            if not isinstance(entry["image"], str) or not isinstance(entry["text"], str):
                raise AnnotationError(f"{path}: entry {index} needs string 'image' and 'text' fields")
            if mode == "test" and (isinstance(entry["ref_id"], bool) or not isinstance(entry["ref_id"], int)):
                raise AnnotationError(f"{path}: entry {index} 'ref_id' must be an integer, "
                                      f"got {entry['ref_id']!r}")
            self.ann.append(entry)
        self.img_ids: dict[str, int] = {}
        if mode == "train":
            for entry in self.ann:
                self.img_ids.setdefault(entry["image"].split("/")[-1], len(self.img_ids))

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int] | None:
        entry = self.ann[index]
        sample = f"ref {entry['ref_id']}" if self.mode == "test" else ""
        image = self.read_image(join_image_path(self.image_root, entry["image"]), index, sample)
        if image is None:
            return None
        image = self.transform(image)
        caption = pre_caption(entry["text"], self.max_words)
        if self.mode == "train":
            return image, caption, self.img_ids[entry["image"].split("/")[-1]]
        return image, caption, int(entry["ref_id"])

    @property
    def ref_ids(self) -> list[int]:
        """The ``ref_id`` of every test entry, in order (empty in train mode)."""
        return [int(entry["ref_id"]) for entry in self.ann] if self.mode == "test" else []


def create_grounding_datasets(config: Mapping[str, Any]) -> tuple[GroundingDataset, GroundingDataset]:
    config = with_defaults(config, "grounding")
    transforms = build_transforms(config)
    max_words = int(config["max_words"])
    root = config["image_root"]
    pixels = max_pixels_from_config(config)
    train = GroundingDataset(config["train_file"], transforms["grounding_train"], root, max_words, "train",
                             key="train_file", max_image_pixels=pixels)
    test = GroundingDataset(config["test_file"], transforms["test"], root, max_words, "test", key="test_file",
                            max_image_pixels=pixels)
    return train, test
