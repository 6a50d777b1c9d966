"""Synthetic VQA: simple scenes with questions and short answers, generated deterministically from a seed.

A scene is 1-5 shapes (circle, square, triangle) in 6 colours and 2 sizes on a light background, and
sometimes one rendered word. Each sample is one image, one question of one *kind* and a short answer:

| kind   | question (example)                              | answers                    |
|--------|-------------------------------------------------|----------------------------|
| colour | What colour is the circle?                      | 6 colours                  |
| shape  | What shape is red?                              | circle, square, triangle   |
| size   | Is the red circle big or small?                 | big, small                 |
| count  | How many squares are there?                     | 0-5                        |
| left   | Is the red circle left of the blue square?      | yes, no                    |
| word   | What word is written?                           | 8 words                    |

Questions are only asked when they have one answer (e.g. "the circle" only when there is one circle).
Splits are disjoint by construction: scene `i` of split `s` is drawn from `sha256(seed, s, i)`.
The same scene drawn at another image size is the same scene, scaled.

Variant `small` (`--data synth-small`): only questions whose answer sits in one small region among
distractors: the colour of a *small* shape ("What colour is the square?", the square being one of the
trained "small" radii, 2-3 of the 256 patches of a 224-px image) or the kind of a small shape ("What shape
is red?"), both only in scenes with at least one other object, and the written word (about 3 x 1 patches)
in scenes with at least one shape: kinds colour, shape, word. Scenes are drawn exactly like the standard
split's (so the built-in model reads them without retraining) from their own seeds
(`sha256("vzedge-synth-small", ...)`), disjoint from the standard splits.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
WORDS = ("cat", "dog", "sun", "car", "box", "cup", "hat", "pen")
KINDS = ("colour", "shape", "size", "count", "left", "word")
MAX_OBJECTS = 5
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "count": tuple(str(i) for i in range(MAX_OBJECTS + 1)),
    "left": ("yes", "no"),
    "word": WORDS,
}
SPLITS = ("train", "test")
VARIANTS = ("standard", "small")
SMALL_KINDS = ("colour", "shape", "word")
DEFAULT_SIZE = 224
_REF = 224.0  # geometry below is in pixels of a 224-px image, scaled to the requested size
_RADIUS = {"small": (10, 14), "big": (21, 28)}
_FONT_PX = 30
_MIN_DX = 16  # "left of" is only asked when the centres are this far apart


def chance(kind: str) -> float:
    """Accuracy of a uniform guess over the kind's answers."""
    return 1.0 / len(ANSWERS[kind])


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    x: float  # centre, in 224-px units
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    word: str | None
    word_xy: tuple[float, float]  # top-left of the word, 224-px units
    background: tuple[int, int, int]
    seed: int


@dataclass(frozen=True)
class Sample:
    """One question about one scene. `image` is rendered on demand (`render(sample.scene, size)`)."""

    id: str
    kind: str
    question: str
    answer: str
    scene: Scene = field(repr=False)


def scene_seed(seed: int, split: str, index: int, variant: str = "standard") -> int:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    _check_variant(variant)
    tag = "vzedge-synth" if variant == "standard" else f"vzedge-synth-{variant}"
    digest = hashlib.sha256(f"{tag}:{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS} (--data synth or synth-small)")


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _word_box(word: str, xy: tuple[float, float]) -> tuple[float, float, float, float]:
    left, top, right, bottom = _font(_FONT_PX).getbbox(word)
    return (xy[0] + left, xy[1] + top, xy[0] + right, xy[1] + bottom)


def small_questions(scene: Scene, rng: random.Random) -> dict[str, tuple[str, str]]:
    """The `small` variant's questions: each answer sits in one small region with at least one distractor
    object in the image (a small shape's colour or kind, or the word)."""
    out: dict[str, tuple[str, str]] = {}
    shapes = scene.shapes
    if shapes:
        by_shape = {k: [s for s in shapes if s.shape == k] for k in SHAPES}
        by_colour = {c: [s for s in shapes if s.colour == c] for c in COLOURS}
        small_kind = [k for k in SHAPES if len(by_shape[k]) == 1 and by_shape[k][0].size == "small"]
        if small_kind:
            k = rng.choice(small_kind)
            out["colour"] = (f"What colour is the {k}?", by_shape[k][0].colour)
        small_colour = [c for c in COLOURS if len(by_colour[c]) == 1 and by_colour[c][0].size == "small"]
        if small_colour:
            c = rng.choice(small_colour)
            out["shape"] = (f"What shape is {c}?", by_colour[c][0].shape)
    if scene.word is not None and shapes:
        out["word"] = ("What word is written?", scene.word)
    return out


def make_scene(scene_seed_value: int) -> Scene:
    """A random scene from one integer seed (no global random state is touched)."""
    rng = random.Random(scene_seed_value)
    background = tuple(rng.randint(215, 245) for _ in range(3))
    word = rng.choice(WORDS) if rng.random() < 0.6 else None
    boxes: list[tuple[float, float, float, float]] = []
    word_xy = (0.0, 0.0)
    if word is not None:
        w = _word_box(word, (0, 0))
        word_xy = (rng.uniform(4 - w[0], _REF - 4 - w[2]), rng.uniform(4 - w[1], _REF - 4 - w[3]))
        boxes.append(_word_box(word, word_xy))
    shapes: list[Shape] = []
    n = rng.randint(1, MAX_OBJECTS)
    for _ in range(60):
        if len(shapes) == n:
            break
        size = rng.choice(SIZES)
        r = rng.uniform(*_RADIUS[size])
        x, y = rng.uniform(r + 2, _REF - r - 2), rng.uniform(r + 2, _REF - r - 2)
        if any(x + r + 4 > b[0] and x - r - 4 < b[2] and y + r + 4 > b[1] and y - r - 4 < b[3] for b in boxes):
            continue
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), size, x, y, r))
        boxes.append((x - r, y - r, x + r, y + r))
    return Scene(tuple(shapes), word, word_xy, background, scene_seed_value)  # type: ignore[arg-type]


def _scaled(v: float, size: int) -> float:
    return v * size / _REF


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels."""
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x, y, r = _scaled(s.x, size), _scaled(s.y, size), _scaled(s.r, size)
        colour = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif s.shape == "square":
            q = r * 0.88  # same area feel as the circle
            draw.rectangle((x - q, y - q, x + q, y + q), fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=colour)
    if scene.word is not None:
        font = _font(round(_FONT_PX * size / _REF))
        xy = (_scaled(scene.word_xy[0], size), _scaled(scene.word_xy[1], size))
        draw.text(xy, scene.word, fill=(25, 25, 25), font=font)
    return img


def _describe(s: Shape) -> str:
    return f"{s.colour} {s.shape}"


def questions(scene: Scene, rng: random.Random) -> dict[str, tuple[str, str]]:
    """At most one (question, answer) per kind that has a unique answer for this scene."""
    out: dict[str, tuple[str, str]] = {}
    shapes = scene.shapes
    by_shape = {k: [s for s in shapes if s.shape == k] for k in SHAPES}
    by_colour = {c: [s for s in shapes if s.colour == c] for c in COLOURS}
    unique_shape = [k for k in SHAPES if len(by_shape[k]) == 1]
    if unique_shape:
        k = rng.choice(unique_shape)
        out["colour"] = (f"What colour is the {k}?", by_shape[k][0].colour)
    unique_colour = [c for c in COLOURS if len(by_colour[c]) == 1]
    if unique_colour:
        c = rng.choice(unique_colour)
        out["shape"] = (f"What shape is {c}?", by_colour[c][0].shape)
    counts = {_describe(s): sum(_describe(t) == _describe(s) for t in shapes) for s in shapes}
    unique = [s for s in shapes if counts[_describe(s)] == 1]
    if unique:
        s = rng.choice(unique)
        out["size"] = (f"Is the {_describe(s)} big or small?", s.size)
    k = rng.choice(SHAPES)
    out["count"] = (f"How many {k}s are there?", str(len(by_shape[k])))
    pairs = [(a, b) for a in unique for b in unique if a is not b and abs(a.x - b.x) >= _MIN_DX]
    if pairs:
        a, b = rng.choice(pairs)
        out["left"] = (f"Is the {_describe(a)} left of the {_describe(b)}?", "yes" if a.x < b.x else "no")
    if scene.word is not None:
        out["word"] = ("What word is written?", scene.word)
    return out


def samples(
    split: str, n: int, seed: int = 0, kinds: tuple[str, ...] | None = None, variant: str = "standard"
) -> list[Sample]:
    """`n` samples of `split`, kinds in round-robin order (balanced), one question per scene.

    Scene indices are consumed in order, skipping scenes where the wanted kind has no unique answer,
    so the first `m` samples of a call with `n > m` are the `m` samples of a call with `n = m`.
    kinds: default all KINDS (standard) or SMALL_KINDS (small).
    """
    if n < 0:
        raise ValueError(f"n={n} is negative")
    _check_variant(variant)
    if kinds is None:
        kinds = KINDS if variant == "standard" else SMALL_KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds={kinds!r}: use a non-empty subset of {KINDS}")
    out: list[Sample] = []
    index = 0
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        s = scene_seed(seed, split, index, variant)
        scene = make_scene(s)
        ask = questions if variant == "standard" else small_questions
        qa = ask(scene, random.Random(s ^ 0x5EED))
        index += 1
        if kind in qa:
            q, a = qa[kind]
            prefix = split if variant == "standard" else f"{variant}-{split}"
            out.append(Sample(f"{prefix}-{seed}-{index - 1}-{kind}", kind, q, a, scene))
    return out


def scene_questions(split: str, index: int, seed: int = 0) -> tuple[Scene, dict[str, tuple[str, str]]]:
    """Scene `index` of `split` with every question it supports (what training uses)."""
    s = scene_seed(seed, split, index)
    scene = make_scene(s)
    return scene, questions(scene, random.Random(s ^ 0x5EED))


CAPTION_QUESTION = "Describe the image."


def caption(scene: Scene) -> str:
    """Every object, left to right, as "size colour shape", then the word: the training caption.

    Like LLaVA's caption pre-training, a turn that names everything in the image makes the LLM read all
    image tokens (and their order), not just what one question needs.
    """
    objects = ", ".join(f"{s.size} {s.colour} {s.shape}" for s in sorted(scene.shapes, key=lambda s: s.x))
    word = f"; the word {scene.word}" if scene.word is not None else ""
    return f"{objects}{word}"


# --- dense labels, for the vision encoder's training objectives -------------------------------------------


def patch_labels(scene: Scene, size: int, patch: int) -> dict[str, np.ndarray]:
    """Per-patch labels on the `size // patch` grid (row-major, like the ViT's token order).

    shape: 0 background, 1..3 SHAPES, 4 text; colour: 0 none, 1..6; size: 0 none, 1 small, 2 big;
    word: 0 none, 1..8 WORDS. A patch takes the label of what covers most of it, if that covers
    at least a quarter of the patch.
    """
    ids = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ids)
    for i, s in enumerate(scene.shapes, start=1):
        x, y, r = _scaled(s.x, size), _scaled(s.y, size), _scaled(s.r, size)
        if s.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=i)
        elif s.shape == "square":
            q = r * 0.88
            draw.rectangle((x - q, y - q, x + q, y + q), fill=i)
        else:
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=i)
    text_id = len(scene.shapes) + 1
    if scene.word is not None:
        box = _word_box(scene.word, scene.word_xy)
        draw.rectangle(tuple(_scaled(v, size) for v in box), fill=text_id)
    g = size // patch
    arr = np.asarray(ids)[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3)
    arr = arr.reshape(g * g, patch * patch)
    counts = (arr[:, :, None] == np.arange(text_id + 1, dtype=np.uint8)).sum(1)  # [P, objects + 2]
    counts[:, 0] = 0
    owner = counts.argmax(1)
    owner[counts.max(1) < patch * patch // 4] = 0
    shape = np.zeros(g * g, np.int64)
    colour = np.zeros(g * g, np.int64)
    size_l = np.zeros(g * g, np.int64)
    word = np.zeros(g * g, np.int64)
    colours = list(COLOURS)
    for i, s in enumerate(scene.shapes, start=1):
        m = owner == i
        shape[m] = SHAPES.index(s.shape) + 1
        colour[m] = colours.index(s.colour) + 1
        size_l[m] = SIZES.index(s.size) + 1
    if scene.word is not None:
        m = owner == text_id
        shape[m] = len(SHAPES) + 1
        word[m] = WORDS.index(scene.word) + 1
    return {"shape": shape, "colour": colour, "size": size_l, "word": word}


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Whole-scene labels for the CLS objective: which (shape, colour) pairs are present (18, multi-hot),
    how many of each shape (3 counts, 0..MAX_OBJECTS) and the word (0 none, 1..8)."""
    present = np.zeros(len(SHAPES) * len(COLOURS), np.float32)
    colours = list(COLOURS)
    for s in scene.shapes:
        present[SHAPES.index(s.shape) * len(COLOURS) + colours.index(s.colour)] = 1.0
    counts = np.array([sum(s.shape == k for s in scene.shapes) for k in SHAPES], np.int64)
    word = np.array(0 if scene.word is None else WORDS.index(scene.word) + 1, np.int64)
    return {"present": present, "counts": counts, "word": word}


# --- LLaVA-format export ----------------------------------------------------------------------------------


def export_llava(
    out: str, split: str = "test", n: int = 300, seed: int = 0, size: int = DEFAULT_SIZE, variant: str = "standard"
) -> str:
    """Write `n` samples as `out/data.json` (LLaVA conversations, plus "kind") and `out/images/*.png`.

    The folder appears whole or not at all. Returns the JSON path; `vzedge eval --data out/data.json
    --images out` reads it back (PNG is lossless, so the pixels are those of `--data synth`).
    """
    import json
    from pathlib import Path

    from vzedge.io import atomic_dir

    records = []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for s in samples(split, n, seed=seed, variant=variant):
            name = f"images/{s.id}.png"
            render(s.scene, size).save(tmp / name)
            records.append(
                {
                    "id": s.id,
                    "image": name,
                    "kind": s.kind,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{s.question}"},
                        {"from": "gpt", "value": s.answer},
                    ],
                }
            )
        (tmp / "data.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return str(Path(out) / "data.json")
