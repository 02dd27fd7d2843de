"""Annotations of the demo data, correct by construction from each scene's layout."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from demo.shapes import (
    ANSWER_SYNONYMS,
    CATEGORY_IDS,
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    REF_TEST_SPLITS,
    SHAPES,
    SIZES,
    VE_LABELS,
    Scene,
    Shape,
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(item: Shape, size: bool = True, color: bool = True) -> str:
    """Indefinite noun phrase, e.g. ``a large red circle`` or ``an orange star``."""
    words = ([item.size] if size else []) + ([item.color] if color else []) + [item.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _the(item: Shape, size: bool = False) -> str:
    """Definite noun phrase, e.g. ``the red circle``."""
    return "the " + " ".join(([item.size] if size else []) + [item.color, item.shape])


def _where(item: Shape, rng: random.Random) -> str:
    """A phrase for the shape's position, e.g. ``on the left``."""
    return rng.choice(POSITION_PHRASES[item.position])


def _relation(a: Shape, b: Shape, rng: random.Random) -> str:
    """Spatial relation of ``a`` with respect to ``b`` from their grid slots."""
    (ra, ca), (rb, cb) = POSITIONS[a.position], POSITIONS[b.position]
    if ra != rb:
        return rng.choice(("above", "over")) if ra < rb else rng.choice(("below", "under"))
    return "to the left of" if ca < cb else "to the right of"


def _count_phrase(n: int, noun: str = "shape") -> str:
    """``one shape``, ``two shapes``, ..."""
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else noun + 's'}"


def _listing(items: Sequence[Shape], size: bool = False) -> str:
    """``a red circle, a blue square and a green star``."""
    phrases = [_np(item, size=size) for item in items]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _raw(text: str) -> str:
    """Human-looking form of a sentence: capitalised, with a full stop."""
    return text[0].upper() + text[1:] + "."


def _present(scene: Scene, color: str | None = None, shape: str | None = None) -> bool:
    return any(
        (color is None or s.color == color) and (shape is None or s.shape == shape) for s in scene.shapes
    )


def _absent_combo(scene: Scene, rng: random.Random) -> tuple[str, str]:
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if not _present(scene, color, shape):
            return color, shape


def _caption_candidates(scene: Scene, rng: random.Random) -> list[str]:
    """Paraphrases of the scene (possibly with repeats)."""
    shapes = list(scene.shapes)
    n = len(shapes)
    if n == 1:
        s = shapes[0]
        return [
            f"{_np(s)} {_where(s, rng)}",
            f"{_np(s, size=False)} {_where(s, rng)}",
            f"there is {_np(s)} {_where(s, rng)}",
            f"{_where(s, rng)} there is {_np(s, size=False)}",
            f"a picture of {_np(s)}",
            f"an image with {_np(s, size=False)} {_where(s, rng)}",
            f"a single {s.color} {s.shape} on a plain background",
            f"one {s.size} {s.color} {s.shape}",
        ]
    a, b = rng.sample(shapes, 2)
    c, d = rng.sample(shapes, 2)
    ordered = sorted(shapes, key=lambda item: POSITIONS[item.position])
    placed = [f"{_np(item)} {_where(item, rng)}" for item in ordered]
    return [
        f"{_np(a)} {_relation(a, b, rng)} {_np(b, size=False)}",
        f"{_the(c)} is {_relation(c, d, rng)} {_the(d)}",
        f"{_count_phrase(n)}: {_listing(shapes)}",
        (", ".join(placed[:-1]) + " and " + placed[-1]),
        f"there are {_count_phrase(n)} including {_np(rng.choice(shapes), size=False)}",
        f"a picture of {_listing(shapes, size=True)}",
        f"{_np(a, size=False)} and {_np(b, size=False)} on a plain background",
        f"an image with {_count_phrase(n)}, {_the(c)} is {_where(c, rng)}",
    ]


def scene_captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """``k`` distinct paraphrases describing the scene."""
    pool = _caption_candidates(scene, rng)
    rng.shuffle(pool)
    captions: list[str] = []
    for text in pool:
        if text not in captions:
            captions.append(text)
    while len(captions) < k:
        text = rng.choice(_caption_candidates(scene, rng))
        if text not in captions:
            captions.append(text)
    return captions[:k]

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "count_shape", "exists", "where", "size")


def _question(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """One question of the given kind: ``(question, answer, pool of wrong answers)``."""
    shapes = scene.shapes
    s = rng.choice(shapes)
    if kind == "color":
        unique = sum(item.shape == s.shape for item in shapes) == 1
        target = f"the {s.shape}" if unique else f"the {s.shape} {_where(s, rng)}"
        template = rng.choice(("what color is {}?", "what is the color of {}?"))
        return template.format(target), s.color, tuple(COLORS)
    if kind == "shape":
        question = rng.choice(("what shape is {}?", "what is the shape {}?"))
        return question.format(_where(s, rng)), s.shape, SHAPES
    if kind == "count":
        question = rng.choice(
            (
                "how many shapes are there?",
                "how many shapes are in the image?",
                "how many shapes are in the picture?",
            )
        )
        return question, str(len(shapes)), ("1", "2", "3")
    if kind == "count_shape":
        shape = s.shape if rng.random() < 0.6 else rng.choice(SHAPES)
        count = sum(item.shape == shape for item in shapes)
        return f"how many {PLURALS[shape]} are there?", str(count), ("0", "1", "2", "3")
    if kind == "exists":
        color, shape = (s.color, s.shape) if rng.random() < 0.5 else _absent_combo(scene, rng)
        suffix = rng.choice(("", " in the image"))
        answer = "yes" if _present(scene, color, shape) else "no"
        return f"is there {_article(color)} {color} {shape}{suffix}?", answer, ("yes", "no")
    if kind == "where":
        return f"where is {_the(s)}?", s.position, tuple(POSITIONS)
    if kind == "size":
        question = rng.choice(("what size is {}?", "is {} small or large?"))
        return question.format(_the(s)), s.size, SIZES
    raise ValueError(f"unknown question kind {kind!r}")


def _annotators(answer: str, pool: Sequence[str], rng: random.Random, n: int = 10) -> list[str]:
    """``n`` annotator answers, mostly ``answer``, the rest synonyms or mistakes."""
    correct = rng.choice((10, 10, 9, 9, 8, 8, 7))
    answers = [answer] * correct
    wrong = [a for a in pool if a != answer]
    for _ in range(n - correct):
        if answer in ANSWER_SYNONYMS and rng.random() < 0.6:
            answers.append(ANSWER_SYNONYMS[answer])
        else:
            answers.append(rng.choice(wrong))
    rng.shuffle(answers)
    return answers


def vqa_annotations(
    train: Sequence[Scene], test: Sequence[Scene], rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """VQA train (with a few VG-style entries) and test annotations."""
    train_entries: list[dict[str, Any]] = []
    for scene in train:
        for kind in rng.sample(QUESTION_TYPES, 4):
            question, answer, pool = _question(scene, kind, rng)
            train_entries.append(
                {
                    "question": question,
                    "image": scene.rel_path,
                    "dataset": "vqa",
                    "answer": _annotators(answer, pool, rng),
                }
            )
        if rng.random() < 0.125:
            question, answer, _ = _question(scene, rng.choice(QUESTION_TYPES), rng)
            train_entries.append(
                {"question": question, "image": scene.rel_path, "dataset": "vg", "answer": answer}
            )
    test_entries: list[dict[str, Any]] = []
    for scene in test:
        for kind in rng.sample(QUESTION_TYPES, 2):
            question, answer, pool = _question(scene, kind, rng)
            test_entries.append(
                {
                    "question": question,
                    "image": scene.rel_path,
                    "dataset": "vqa",
                    "question_id": len(test_entries),
                    "answer": _annotators(answer, pool, rng),
                }
            )
    return train_entries, test_entries


def _nlvr_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """A random statement about an image pair and whether it holds."""
    both = list(left.shapes) + list(right.shapes)
    if rng.random() < 0.5:
        pick = rng.choice(both)
        color, shape = pick.color, pick.shape
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    phrase = f"{_article(color)} {color} {shape}"
    n_left, n_right = len(left.shapes), len(right.shapes)
    k = rng.randint(1, 3)
    templates: list[Callable[[], tuple[str, bool]]] = [
        lambda: (f"the left image contains {phrase}", _present(left, color, shape)),
        lambda: (f"the right image contains {phrase}", _present(right, color, shape)),
        lambda: (
            f"both images contain {_article(shape)} {shape}",
            _present(left, shape=shape) and _present(right, shape=shape),
        ),
        lambda: (
            f"both images contain {_article(color)} {color} shape",
            _present(left, color=color) and _present(right, color=color),
        ),
        lambda: (
            f"neither image contains {phrase}",
            not (_present(left, color, shape) or _present(right, color, shape)),
        ),
        lambda: ("the left image has more shapes than the right image", n_left > n_right),
        lambda: ("the right image has more shapes than the left image", n_right > n_left),
        lambda: (f"the left image contains exactly {_count_phrase(k)}", n_left == k),
        lambda: (f"the right image contains exactly {_count_phrase(k)}", n_right == k),
        lambda: (
            f"at least one image contains {phrase}",
            _present(left, color, shape) or _present(right, color, shape),
        ),
        lambda: ("the two images contain the same number of shapes", n_left == n_right),
    ]
    return rng.choice(templates)()


def nlvr_annotations(scenes: Sequence[Scene], num_pairs: int, rng: random.Random) -> list[dict[str, Any]]:
    """``num_pairs`` image pairs with statements, labels balanced to within one."""
    labels = ([True, False] * (num_pairs // 2 + 1))[:num_pairs]
    rng.shuffle(labels)
    entries = []
    for label in labels:
        left, right = rng.sample(list(scenes), 2)
        for _ in range(200):
            sentence, truth = _nlvr_statement(left, right, rng)
            if truth == label:
                break
        else:
            if label:
                pick = rng.choice(left.shapes)
                color, shape = pick.color, pick.shape
            else:
                color, shape = _absent_combo(left, rng)
            sentence = f"the left image contains {_article(color)} {color} {shape}"
        entries.append(
            {
                "images": [left.rel_path, right.rel_path],
                "sentence": sentence,
                "label": "True" if label else "False",
            }
        )
    return entries


def _hypothesis(scene: Scene, label: str, rng: random.Random) -> str:
    """A hypothesis about the scene with the given entailment label."""
    s = rng.choice(scene.shapes)
    n = len(scene.shapes)
    if label == "entailment":
        options = [
            f"there is {_np(s, size=False)} in the image",
            f"the image shows {_count_phrase(n)}",
            f"{_np(s)} is {_where(s, rng)}",
            f"{_the(s)} is {s.size}",
            f"the picture contains {_article(s.shape)} {s.shape}",
            f"at least one shape is {s.color}",
        ]
    elif label == "contradiction":
        color, shape = _absent_combo(scene, rng)
        other_n = rng.choice([m for m in (1, 2, 3) if m != n])
        other_size = next(size for size in SIZES if size != s.size)
        other_place = rng.choice(POSITION_PHRASES[rng.choice([p for p in POSITIONS if p != s.position])])
        missing = [c for c in COLORS if not _present(scene, color=c)]
        options = [
            f"there is {_article(color)} {color} {shape} in the image",
            f"the image shows {_count_phrase(other_n)}",
            f"{_the(s)} is {other_size}",
            f"{_the(s)} is {other_place}",
            rng.choice(("the image is empty", "there are no shapes in the image")),
            f"all the shapes are {rng.choice(missing)}",
        ]
    else:
        options = [
            f"{_the(s)} was drawn yesterday",
            f"the {s.shape} is made of paper",
            f"{_the(s)} was painted by a child",
            f"someone drew the {s.shape} by hand",
            f"the {s.shape} is the favorite shape of the artist",
            f"{_the(s)} is heavy",
            f"the artist likes the color {s.color}",
        ]
    return rng.choice(options)


def ve_annotations(scenes: Sequence[Scene], rng: random.Random) -> list[dict[str, Any]]:
    """One hypothesis per label per image (exactly balanced labels)."""
    entries = []
    for scene in scenes:
        labels = list(VE_LABELS)
        rng.shuffle(labels)
        for label in labels:
            entries.append({"image": scene.name, "sentence": _hypothesis(scene, label, rng), "label": label})
    return entries


def _expressions(scene: Scene, target: Shape, rng: random.Random) -> list[str]:
    """Referring expressions that pick out ``target`` uniquely among the scene's shapes."""
    others = [item for item in scene.shapes if item is not target]
    candidates = [f"the {target.color} {target.shape}", f"the shape {_where(target, rng)}"]
    candidates.append(f"the {target.shape} {_where(target, rng)}")
    if all(item.shape != target.shape for item in others):
        candidates += [f"the {target.shape}", f"the {target.size} {target.shape}"]
    if all(item.color != target.color for item in others):
        candidates.append(f"the {target.color} shape")
    if all(item.size != target.size for item in others):
        candidates.append(f"the {target.size} shape")
    if all(item.size != target.size or item.shape != target.shape for item in others):
        candidates.append(f"the {target.size} {target.shape}")
    unique: list[str] = []
    for text in candidates:
        if text not in unique:
            unique.append(text)
    return rng.sample(unique, 2)


def grounding_annotations(
    train: Sequence[Scene], test: Sequence[Scene], image_size: int, rng: random.Random
) -> dict[str, Any]:
    """Grounding JSON entries and the REFER-style refs, instances, detections and GT boxes."""
    grounding_train: list[dict[str, Any]] = []
    grounding_test: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    dets: dict[str, list[list[float]]] = {}
    cocos: dict[str, list[list[float]]] = {}
    sent_id = 0
    test_index = 0
    for scene in list(train) + list(test):
        if len(scene.shapes) < 2:
            continue
        if scene.split == "train":
            split = "train"
        else:
            split = REF_TEST_SPLITS[test_index % len(REF_TEST_SPLITS)]
            test_index += 1
        images.append(
            {
                "id": scene.image_id,
                "file_name": f"{scene.name}.png",
                "height": image_size,
                "width": image_size,
            }
        )
        boxes: list[list[float]] = []
        truth: list[list[float]] = []
        for item in scene.shapes:
            ann_id = len(annotations) + 1
            category = CATEGORY_IDS[item.shape]
            x, y, w, h = item.bbox
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": scene.image_id,
                    "bbox": list(item.bbox),
                    "category_id": category,
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
            truth.append([x, y, w, h, 1.0, category])
            boxes.append(
                _jitter_box(item.bbox, image_size, rng) + [round(rng.uniform(0.7, 0.99), 3), category]
            )
            sentences = []
            for text in _expressions(scene, item, rng):
                sentences.append(
                    {"sent": text, "raw": _raw(text), "tokens": text.split(), "sent_id": sent_id}
                )
                sent_id += 1
            ref_id = len(refs) + 1
            refs.append(
                {
                    "ref_id": ref_id,
                    "ann_id": ann_id,
                    "image_id": scene.image_id,
                    "category_id": category,
                    "split": split,
                    "file_name": f"{scene.name}.png",
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                }
            )
            for sentence in sentences:
                if split == "train":
                    grounding_train.append({"image": scene.rel_path, "text": sentence["sent"]})
                else:
                    grounding_test.append(
                        {"image": scene.rel_path, "text": sentence["sent"], "ref_id": ref_id}
                    )
        free = [p for p in POSITIONS if all(item.position != p for item in scene.shapes)]
        for position in rng.sample(free, min(len(free), rng.randint(1, 2))):
            boxes.append(_distractor_box(position, image_size, rng))
        boxes.sort(key=lambda box: -box[4])
        dets[str(scene.image_id)] = boxes
        cocos[str(scene.image_id)] = truth
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in CATEGORY_IDS.items()]
    return {
        "grounding_train": grounding_train,
        "grounding_test": grounding_test,
        "refs": refs,
        "instances": {"images": images, "annotations": annotations, "categories": categories},
        "dets": dets,
        "cocos": cocos,
    }


def _jitter_box(bbox: Sequence[float], image_size: int, rng: random.Random) -> list[float]:
    """Detector-like copy of a true box (sides moved by up to 5%); always IoU above 0.5 with it."""
    x, y, w, h = bbox
    ax, ay = min(1.0, 0.05 * w), min(1.0, 0.05 * h)
    x0 = min(max(0.0, x + rng.uniform(-ax, ax)), image_size - 1.0)
    y0 = min(max(0.0, y + rng.uniform(-ay, ay)), image_size - 1.0)
    x1 = max(min(float(image_size), x + w + rng.uniform(-ax, ax)), x0 + 1.0)
    y1 = max(min(float(image_size), y + h + rng.uniform(-ay, ay)), y0 + 1.0)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _distractor_box(position: str, image_size: int, rng: random.Random) -> list[float]:
    """Low-scoring false detection on an empty grid slot."""
    cell = image_size / 3.0
    row, col = POSITIONS[position]
    side = rng.uniform(0.3, 0.8) * cell
    x = (col + 0.5) * cell - side / 2 + rng.uniform(-2, 2)
    y = (row + 0.5) * cell - side / 2 + rng.uniform(-2, 2)
    x = min(max(0.0, x), image_size - side)
    y = min(max(0.0, y), image_size - side)
    score = round(rng.uniform(0.05, 0.4), 3)
    return [
        round(x, 2),
        round(y, 2),
        round(side, 2),
        round(side, 2),
        score,
        rng.choice(list(CATEGORY_IDS.values())),
    ]
