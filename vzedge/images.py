"""Images the project makes itself, so every command has something real to look at offline."""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw

# The synthetic-VQA palette: the demo scene looks like what the built-in model was trained on.
from vzedge.synth import COLOURS


def demo_image(size: int = 336, seed: int = 0) -> Image.Image:
    """A deterministic scene: a plain background with a few coloured shapes and a word."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    names = list(COLOURS)
    for _ in range(4):
        colour = COLOURS[rng.choice(names)]
        r = rng.randint(size // 12, size // 6)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (x - r, y - r, x + r, y + r)
        shape = rng.choice(("circle", "square", "triangle"))
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    draw.text((size // 20, size - size // 8), "vzedge", fill=(20, 20, 20))
    return img


def load_image(spec: str) -> Image.Image:
    """`demo` (or `demo:SEED`) for the built-in scene, else a path to an image file."""
    if spec == "demo" or spec.startswith("demo:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return demo_image(seed=seed)
    if not os.path.exists(spec):
        raise ValueError(f"image {spec!r} does not exist; pass an image file or 'demo' for the built-in scene")
    try:
        with Image.open(spec) as im:
            return im.convert("RGB")
    except OSError as err:
        raise ValueError(f"cannot read image {spec!r}: {err}") from err
