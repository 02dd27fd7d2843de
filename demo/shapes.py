"""Shapes of the demo data: vocabulary of colours, shapes, sizes and positions, scene layout, drawing."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
ANSWER_SYNONYMS: dict[str, str] = {
    "0": "zero",
    "1": "one",
    "2": "two",
    "3": "three",
    "center": "middle",
    "large": "big",
    "small": "little",
}
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
        return f"images/{self.split}/{self.name}.png"


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
    """Build the demo WordPiece vocabulary (BERT special ids kept), written to ``path`` unless ``None``."""
    base = Path(base_vocab).read_text(encoding="utf-8").splitlines()
    known = set(base)
    tokens = base + [word for word in demo_words() if word not in known]
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


def random_stream(seed: int, name: str) -> random.Random:
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


def make_scenes(rng: random.Random, split: str, count: int, first_id: int, image_size: int) -> list[Scene]:
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


def render_scene(scene: Scene, rng: random.Random, image_size: int, supersample: int = 4) -> Image.Image:
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
