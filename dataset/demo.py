"""Built-in demo data: a small synthetic vision-language dataset of coloured shapes.

Every task script can run end to end on it without downloading anything.  Images are PNG
drawings of 1-3 coloured geometric shapes placed on a 3x3 grid (five slots: top, left, centre,
right, bottom) over a plain or lightly noisy grey background.  Captions, VQA questions, NLVR2
statements, SNLI-VE hypotheses and referring expressions are generated from the known scene
layout, so every annotation is correct by construction.

Usage::

    python -m dataset.demo --out_dir demo_data --seed 0 [--num_train 256 --num_test 64 --image_size 64]

Everything is deterministic in ``seed``: separate ``random.Random`` streams (and numpy generators
seeded from them) are derived for each image split and each annotation family, never the global
random state.  Generation is skipped when ``out_dir`` already holds a complete dataset for the same
arguments (see ``manifest.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1

#: Default number of images per split.
DEFAULT_NUM_TRAIN = 256
DEFAULT_NUM_TEST = 64
DEFAULT_IMAGE_SIZE = 64

#: Smallest split sizes that still give every annotation family something to evaluate.
MIN_NUM_TRAIN = 3
MIN_NUM_TEST = 6

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_VOCAB = REPO_ROOT / "tests" / "data" / "parity" / "vocab.txt"
DEMO_VOCAB = REPO_ROOT / "configs" / "demo_vocab.txt"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "orange": (250, 135, 10),
    "purple": (135, 45, 185),
    "pink": (255, 125, 195),
    "brown": (125, 75, 30),
    "white": (255, 255, 255),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
SIZES: tuple[str, ...] = ("small", "large")
#: Radius of a shape as a fraction of the image side.
SIZE_RADIUS: dict[str, float] = {"small": 0.08, "large": 0.14}
#: Grid slot (row, column) of each position name.
POSITIONS: dict[str, tuple[int, int]] = {
    "top": (0, 1),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom": (2, 1),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top": ("at the top", "near the top"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom": ("at the bottom", "near the bottom"),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
#: Answers annotators may give instead of the canonical one.
ANSWER_SYNONYMS: dict[str, str] = {
    "0": "zero",
    "1": "one",
    "2": "two",
    "3": "three",
    "center": "middle",
    "large": "big",
    "small": "little",
}
#: Every candidate answer of the VQA task, in answer-list order.
ANSWER_LIST: tuple[str, ...] = (
    ("yes", "no")
    + tuple(COLORS)
    + SHAPES
    + SIZES
    + ("big", "little")
    + tuple(POSITIONS)
    + ("middle",)
    + ("0", "1", "2", "3")
    + NUMBER_WORDS
)
VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
REF_TEST_SPLITS: tuple[str, ...] = ("val", "testA", "testB")
CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(SHAPES)}

#: Words the sentence templates use besides colours, shapes, sizes, positions and numbers.
TEMPLATE_WORDS: tuple[str, ...] = tuple(
    """
    a an the there is are of on in at near side to left right above below over under and with
    picture image images shows contains contain shape shapes including single plain background
    what color size where how many small or large one two three both neither more than same
    number least all no empty someone drew by hand was drawn yesterday made paper painted child
    favorite artist heavy likes has exactly
    """.split()
)

PUNCTUATION = ",.'!?\"()*#:;~"


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its attributes, centre, radius and bounding box ``[x, y, w, h]`` in pixels."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """One generated image: its split, file name, global integer id and shapes."""

    split: str
    name: str
    image_id: int
    shapes: tuple[Shape, ...]

    @property
    def rel_path(self) -> str:
        """Image path relative to the dataset root."""
        return f"images/{self.split}/{self.name}.png"


# --------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------


def demo_words() -> list[str]:
    """Return, sorted, every word any demo caption, question, answer or statement can contain."""
    words: set[str] = set(TEMPLATE_WORDS)
    words.update(COLORS)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(SIZES)
    words.update(POSITIONS)
    for phrases in POSITION_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    words.update(NUMBER_WORDS)
    for answer in ANSWER_LIST:
        words.update(answer.split())
    return sorted(words)


def build_demo_vocab(path: str | Path | None = DEMO_VOCAB, base_vocab: str | Path = BASE_VOCAB) -> list[str]:
    """Build the demo WordPiece vocabulary: ``base_vocab`` unchanged, then every missing demo word.

    The base file keeps BERT's special-token layout (``[PAD]`` = 0, ``[UNK]`` = 100, ``[CLS]`` = 101,
    ``[SEP]`` = 102, ``[MASK]`` = 103), so the result does too.  Writes the vocabulary to ``path``
    (one token per line) unless ``path`` is ``None``; returns the token list.
    """
    base = Path(base_vocab).read_text(encoding="utf-8").splitlines()
    known = set(base)
    tokens = base + [word for word in demo_words() if word not in known]
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


# --------------------------------------------------------------------------------------------
# scenes and images
# --------------------------------------------------------------------------------------------


def _stream(seed: int, name: str) -> random.Random:
    """Independent, seeded random stream for one part of the generation."""
    return random.Random(f"simla-demo/{seed}/{name}")


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon outline of a non-circular shape (or the circle's bounding corners)."""
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        return points
    if shape == "cross":
        t = 0.33 * r
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _bbox(points: Sequence[tuple[float, float]], image_size: int) -> tuple[float, float, float, float]:
    """Bounding box ``(x, y, w, h)`` of ``points`` clipped to the image, rounded to 0.01 px."""
    x0 = max(0.0, min(p[0] for p in points))
    y0 = max(0.0, min(p[1] for p in points))
    x1 = min(float(image_size), max(p[0] for p in points))
    y1 = min(float(image_size), max(p[1] for p in points))
    return (round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2))


def _make_scenes(rng: random.Random, split: str, count: int, first_id: int, image_size: int) -> list[Scene]:
    """Lay out ``count`` scenes (1-3 shapes each, counts balanced) for one split."""
    shape_counts = ([1, 2, 3] * (count // 3 + 1))[:count]
    rng.shuffle(shape_counts)
    cell = image_size / 3.0
    scenes = []
    for index, n in enumerate(shape_counts):
        positions = rng.sample(list(POSITIONS), n)
        used: set[tuple[str, str]] = set()
        shapes = []
        for position in positions:
            while True:
                shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
                if (shape, color) not in used:
                    used.add((shape, color))
                    break
            size = rng.choice(SIZES)
            radius = SIZE_RADIUS[size] * image_size
            row, col = POSITIONS[position]
            slack = max(0.0, cell / 2 - radius - 1.0)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            bbox = _bbox(_outline(shape, cx, cy, radius), image_size)
            shapes.append(Shape(shape, color, size, position, cx, cy, radius, bbox))
        name = f"{split}_{index:05d}"
        scenes.append(Scene(split, name, first_id + index, tuple(shapes)))
    return scenes


def _render(scene: Scene, rng: random.Random, image_size: int, supersample: int = 4) -> Image.Image:
    """Draw a scene: grey (optionally noisy) background, then anti-aliased shapes."""
    np_rng = np.random.default_rng(rng.getrandbits(64))
    level = rng.randint(150, 200)
    tint = np.array([level + rng.randint(-6, 6) for _ in range(3)], dtype=np.float64)
    canvas = np.broadcast_to(tint, (image_size, image_size, 3)).copy()
    if rng.random() < 0.5:
        canvas += np_rng.normal(0.0, 6.0, size=canvas.shape)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    big = image_size * supersample
    for item in scene.shapes:
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        points = [
            (x * supersample, y * supersample) for x, y in _outline(item.shape, item.cx, item.cy, item.radius)
        ]
        if item.shape == "circle":
            draw.ellipse([points[0], points[1]], fill=255)
        else:
            draw.polygon(points, fill=255)
        mask = mask.resize((image_size, image_size), Image.Resampling.BOX)
        image.paste(Image.new("RGB", (image_size, image_size), COLORS[item.color]), (0, 0), mask)
    return image


# --------------------------------------------------------------------------------------------
# text building blocks
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    """Indefinite article for ``word``."""
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
    """Whether the scene has a shape matching the given colour and/or shape name."""
    return any(
        (color is None or s.color == color) and (shape is None or s.shape == shape) for s in scene.shapes
    )


def _absent_combo(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (colour, shape) pair that is not in the scene."""
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if not _present(scene, color, shape):
            return color, shape


# --------------------------------------------------------------------------------------------
# captions (pretraining and retrieval)
# --------------------------------------------------------------------------------------------


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


def _captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
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


# --------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------

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


def _vqa(
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


# --------------------------------------------------------------------------------------------
# NLVR2
# --------------------------------------------------------------------------------------------


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


def _nlvr(scenes: Sequence[Scene], num_pairs: int, rng: random.Random) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------
# SNLI-VE
# --------------------------------------------------------------------------------------------


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


def _ve(scenes: Sequence[Scene], rng: random.Random) -> list[dict[str, Any]]:
    """One hypothesis per label per image (exactly balanced labels)."""
    entries = []
    for scene in scenes:
        labels = list(VE_LABELS)
        rng.shuffle(labels)
        for label in labels:
            entries.append({"image": scene.name, "sentence": _hypothesis(scene, label, rng), "label": label})
    return entries


# --------------------------------------------------------------------------------------------
# grounding (RefCOCO+-style)
# --------------------------------------------------------------------------------------------


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


def _grounding(
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
    """Detector-like copy of a true box: each side moved by up to 5% of the box (at most one pixel).

    The copy always overlaps the true box with IoU above 0.5, the grounding hit threshold.
    """
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


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def demo_paths(out_dir: str | Path) -> dict[str, str]:
    """Absolute paths of everything :func:`generate_demo_data` writes (and the roots configs need)."""
    root = Path(out_dir).resolve()
    refcoco = root / "refcoco"
    files = {
        "root": root,
        "image_root": root,
        "vqa_root": root,
        "vg_root": root,
        "ve_image_root": root / "images_ve",
        "refcoco_data": refcoco,
        "manifest": root / "manifest.json",
        "pretrain": root / "pretrain.json",
        "re_train": root / "re_train.json",
        "re_val": root / "re_val.json",
        "re_test": root / "re_test.json",
        "re_test2": root / "re_test2.json",
        "vqa_train": root / "vqa_train.json",
        "vqa_test": root / "vqa_test.json",
        "answer_list": root / "answer_list.json",
        "nlvr_train": root / "nlvr_train.json",
        "nlvr_val": root / "nlvr_val.json",
        "nlvr_test": root / "nlvr_test.json",
        "ve_train": root / "ve_train.json",
        "ve_val": root / "ve_val.json",
        "ve_test": root / "ve_test.json",
        "grounding_train": root / "grounding_train.json",
        "grounding_test": root / "grounding_test.json",
        "refs": refcoco / "refcoco+" / "refs(unc).p",
        "instances": refcoco / "refcoco+" / "instances.json",
        "det_file": refcoco / "refcoco+" / "dets.json",
        "coco_file": refcoco / "refcoco+" / "cocos.json",
        "dvae": root / "dvae",
        "dvae_encoder": root / "dvae" / "encoder.pkl",
    }
    return {key: str(path) for key, path in files.items()}


def _write_json(path: Path, obj: Any) -> None:
    """Write compact JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _manifest_args(root: Path, seed: int, num_train: int, num_test: int, image_size: int) -> dict[str, Any]:
    """Arguments recorded in the manifest; a dataset is reused only if they match."""
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_train_images": num_train,
        "num_test_images": num_test,
        "image_size": image_size,
        "out_dir": str(root),
    }


def _is_complete(root: Path, args: dict[str, Any]) -> bool:
    """Whether ``root`` holds a finished dataset generated with ``args``."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if recorded.get("arguments") != args:
        return False
    return all((root / rel).is_file() for rel in recorded.get("files", []))


def generate_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    num_train_images: int = DEFAULT_NUM_TRAIN,
    num_test_images: int = DEFAULT_NUM_TEST,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
) -> dict[str, str]:
    """Write the demo dataset to ``out_dir`` and return :func:`demo_paths` for it.

    Splits: ``train`` (``num_train_images``), ``test`` and ``test2`` (``num_test_images`` each;
    ``test2`` is drawn from a different stream, for zero-shot evaluation).  Validation files use the
    first half of ``test`` and test files the second half (retrieval, NLVR2, SNLI-VE); VQA tests on
    all of ``test``; grounding refs of ``test`` images cycle through ``val``/``testA``/``testB``.
    Nothing is rewritten when ``out_dir`` already holds the same dataset, unless ``force``.
    """
    if num_train_images < MIN_NUM_TRAIN or num_test_images < MIN_NUM_TEST:
        raise ValueError(f"need at least {MIN_NUM_TRAIN} train and {MIN_NUM_TEST} test images")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    root = Path(out_dir).resolve()
    paths = demo_paths(root)
    args = _manifest_args(root, seed, num_train_images, num_test_images, image_size)
    if not force and _is_complete(root, args):
        return paths
    manifest = root / "manifest.json"
    if manifest.exists():
        manifest.unlink()
        for sub in ("images", "images_ve", "refcoco"):
            if (root / sub).is_dir():
                shutil.rmtree(root / sub)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write_json(key: str, obj: Any) -> None:
        path = Path(paths[key])
        _write_json(path, obj)
        written.append(path)

    # images
    split_sizes = {"train": num_train_images, "test": num_test_images, "test2": num_test_images}
    scenes: dict[str, list[Scene]] = {}
    first_id = 0
    for split, count in split_sizes.items():
        rng = _stream(seed, f"images/{split}")
        scenes[split] = _make_scenes(rng, split, count, first_id, image_size)
        first_id += count
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for scene in scenes[split]:
            image = _render(scene, rng, image_size)
            path = root / scene.rel_path
            image.save(path, format="PNG")
            written.append(path)
            if split != "test2":
                ve_path = Path(paths["ve_image_root"]) / f"{scene.name}.jpg"
                ve_path.parent.mkdir(parents=True, exist_ok=True)
                image.save(ve_path, format="JPEG", quality=95)
                written.append(ve_path)
    train, test, test2 = scenes["train"], scenes["test"], scenes["test2"]
    half = len(test) // 2
    test_val, test_test = test[:half], test[half:]

    # captions: pretraining and retrieval
    rng = _stream(seed, "captions")
    captions = {scene.name: _captions(scene, rng) for scene in train + test + test2}
    pretrain: list[dict[str, Any]] = []
    for index, scene in enumerate(train):
        # even entries carry every paraphrase (a list), odd ones a single string: both forms occur
        texts = captions[scene.name]
        caption = texts if index % 2 == 0 else rng.choice(texts)
        pretrain.append({"image": str(root / scene.rel_path), "caption": caption})
    write_json("pretrain", pretrain)
    write_json(
        "re_train",
        [
            {"image": scene.rel_path, "caption": text, "image_id": scene.image_id}
            for scene in train
            for text in captions[scene.name]
        ],
    )
    for key, split_scenes in (("re_val", test_val), ("re_test", test_test), ("re_test2", test2)):
        write_json(
            key, [{"image": scene.rel_path, "caption": captions[scene.name]} for scene in split_scenes]
        )

    # VQA
    vqa_train, vqa_test = _vqa(train, test, _stream(seed, "vqa"))
    write_json("vqa_train", vqa_train)
    write_json("vqa_test", vqa_test)
    write_json("answer_list", list(ANSWER_LIST))

    # NLVR2
    rng = _stream(seed, "nlvr")
    write_json("nlvr_train", _nlvr(train, len(train), rng))
    write_json("nlvr_val", _nlvr(test_val, len(test_val), rng))
    write_json("nlvr_test", _nlvr(test_test, len(test_test), rng))

    # SNLI-VE
    rng = _stream(seed, "ve")
    write_json("ve_train", _ve(train, rng))
    write_json("ve_val", _ve(test_val, rng))
    write_json("ve_test", _ve(test_test, rng))

    # grounding
    grounding = _grounding(train, test, image_size, _stream(seed, "grounding"))
    write_json("grounding_train", grounding["grounding_train"])
    write_json("grounding_test", grounding["grounding_test"])
    write_json("instances", grounding["instances"])
    write_json("det_file", grounding["dets"])
    write_json("coco_file", grounding["cocos"])
    refs_path = Path(paths["refs"])
    refs_path.write_bytes(pickle.dumps(grounding["refs"], protocol=4))
    written.append(refs_path)

    # a small randomly initialised d-VAE encoder in the official encoder.pkl format (MIM targets)
    from models.dvae import DalleVAE

    DalleVAE.random(n_hid=64, n_blk_per_group=1, seed=seed).save(paths["dvae"])
    written.append(Path(paths["dvae_encoder"]))

    files = sorted(path.relative_to(root).as_posix() for path in written)
    manifest.write_text(json.dumps({"arguments": args, "files": files}, indent=2) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes demo dataset.")
    parser.add_argument("--out_dir", default="demo_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num_test", type=int, default=DEFAULT_NUM_TEST)
    parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")
    parser.add_argument(
        "--write_vocab", default=None, metavar="PATH", help="also write the demo vocabulary to PATH"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate_demo_data(
        args.out_dir, args.seed, args.num_train, args.num_test, args.image_size, args.force
    )
    if args.write_vocab:
        tokens = build_demo_vocab(args.write_vocab)
        print(f"vocabulary: {args.write_vocab} ({len(tokens)} tokens)")
    print(f"demo data in {paths['root']} ({time.perf_counter() - start:.1f} s)")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
