"""Images: the ones the project makes itself (so every command has something to look at offline), and the
one careful reader of image files that every verb uses.

`load_image` checks a file's header against `ImageLimits` before decoding it (a 157-byte PNG can declare
1 x 20000 pixels, which an image processor that scales the short side to 224 turns into gigabytes), scales
16-bit and float images to 8 bits instead of clipping them, and refuses NaN/inf pixels.
"""

from __future__ import annotations

import math
import os
import random
import threading
import warnings
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be, checked from its header before any pixel is decoded.

    max_pixels: width x height (default 50 MP: a 50 MP photo decodes to 150 MB of RGB).
    max_aspect: longer side / shorter side (default 20). Processors scale the short side to the model's size,
    so a 1 x 20000 image would become 224 x 4.5 M pixels.
    The CLI flags --max-image-pixels and --max-aspect-ratio raise them.
    """

    max_pixels: int = 50_000_000
    max_aspect: float = 20.0

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"--max-image-pixels {self.max_pixels!r}: pass a whole number >= 1")
        if not (isinstance(self.max_aspect, (int, float)) and math.isfinite(self.max_aspect) and self.max_aspect >= 1):
            raise ValueError(f"--max-aspect-ratio {self.max_aspect!r}: pass a finite number >= 1")

    def check(self, width: int, height: int, what: str) -> None:
        """ValueError naming the limit and its flag if a width x height image is out of bounds."""
        if width < 1 or height < 1:
            raise ValueError(f"{what} is {width}x{height} pixels: an image needs at least one pixel each way")
        if width * height > self.max_pixels:
            raise ValueError(
                f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {self.max_pixels:,}; "
                "downscale it, or raise the limit with --max-image-pixels"
            )
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect:
            raise ValueError(
                f"{what} is {width}x{height}, aspect ratio {aspect:,.1f}:1, over the limit of {self.max_aspect:g}:1 "
                "(the processor scales the short side to the model's size); crop it, or raise the limit with "
                "--max-aspect-ratio"
            )


DEFAULT_LIMITS = ImageLimits()


def load_image(spec: str, limits: ImageLimits | None = None) -> Image.Image:
    """`demo` (or `demo:SEED`) for the built-in scene, else a path to an image file (see `open_image_file`)."""
    if spec == "demo" or spec.startswith("demo:"):
        try:
            seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        except ValueError:
            raise ValueError(f"image {spec!r}: use 'demo' or 'demo:SEED' with a whole-number seed") from None
        return demo_image(seed=seed)
    if not os.path.exists(spec):
        raise ValueError(f"image {spec!r} does not exist; pass an image file or 'demo' for the built-in scene")
    return open_image_file(spec, limits)


def open_image_file(path: str | os.PathLike[str], limits: ImageLimits | None = None) -> Image.Image:
    """An image file as 8-bit RGB: size checked from the header first, high bit depths scaled, not clipped."""
    limits = limits or DEFAULT_LIMITS
    if os.path.isdir(path):
        raise ValueError(f"image {str(path)!r} is a folder; pass an image file")
    try:
        with _open_header_only(path) as im:
            limits.check(im.width, im.height, f"image {str(path)!r}")
            im.load()
            return to_rgb8(im, f"image {str(path)!r}")
    except (OSError, SyntaxError, EOFError) as err:  # PIL raises SyntaxError for some malformed headers
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None


_PIL_GUARD = threading.Lock()


def _open_header_only(path: str | os.PathLike[str]) -> Image.Image:
    """Image.open (which reads only the header) with Pillow's own bomb check off: ours, with its flag, runs next.

    Pillow's limit is a module global, so it is lifted under a lock and only for the header read.
    """
    with _PIL_GUARD, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb8(im: Image.Image, what: str = "image") -> Image.Image:
    """RGB with 8 bits per channel. 16-bit images are scaled by 255/65535 and float images ('F') from [0, 1]
    (PIL's convert() would clip both to white); NaN/inf pixels are refused."""
    mode = im.mode
    if mode in _16BIT_MODES or mode in ("I", "F"):
        x = np.asarray(im)
        if mode == "F" or x.dtype.kind == "f":
            x = x.astype(np.float64)
            if not np.isfinite(x).all():
                raise ValueError(f"{what} has NaN or infinite pixels; fix the file (vzedge cannot guess them)")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"{what} is a float image with values in [{lo:g}, {hi:g}]; vzedge reads float images as "
                    "[0, 1]: rescale it or save it as 8/16-bit"
                )
            x8 = np.round(x * 255.0)
        else:
            x = x.astype(np.int64)
            if mode == "I" and (x.min() < 0 or x.max() > 65535):
                raise ValueError(
                    f"{what} is a 32-bit integer image with values in [{x.min()}, {x.max()}]; save it as 8/16-bit"
                )
            x8 = np.round(x * (255.0 / 65535.0))
        grey = Image.fromarray(x8.astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return im.convert("RGB")  # a new image in every case, independent of the (closed) file
