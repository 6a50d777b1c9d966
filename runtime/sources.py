"""Frame sources: an image, a folder, a video file, a camera index, or synthetic frames.

A source is an iterator of `Frame`s. Video files and cameras need OpenCV (`pip install
opencv-python-headless`), imported only when such a source is opened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vzedge.images import ImageLimits, open_image_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass
class Frame:
    index: int
    image: Image.Image
    captured_at: float  # time.perf_counter() when the frame was read
    capture_ms: float
    origin: str = ""
    meta: dict = field(default_factory=dict)
    error: Exception | None = None  # the frame could not be read (image is None); its first stage reports it


class Source:
    """Base: iterate frames; `close()` releases devices. `length` is None for unbounded sources."""

    name = "source"
    length: int | None = None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        return None


def _timed(index: int, load, origin: str) -> Frame:
    t0 = time.perf_counter()
    image = load()
    t1 = time.perf_counter()
    return Frame(index=index, image=image, captured_at=t1, capture_ms=(t1 - t0) * 1e3, origin=origin)


def _open_image(path: Path, limits: ImageLimits | None = None) -> Image.Image:
    return open_image_file(path, limits)


class ImageSource(Source):
    """One image file, optionally repeated `repeat` times (a static scene for a perception loop)."""

    def __init__(self, path: str, repeat: int = 1, limits: ImageLimits | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"image {path!r} does not exist; pass an image file, a folder, a video or 'synthetic'")
        self.image = _open_image(self.path, limits)
        self.length = repeat
        self.name = f"image:{self.path.name}"

    def __iter__(self) -> Iterator[Frame]:
        for i in range(self.length or 1):
            yield _timed(i, self.image.copy, str(self.path))


class FolderSource(Source):
    """Every image file of a folder, in name order."""

    def __init__(self, path: str, limits: ImageLimits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.length = len(self.files)
        self.name = f"folder:{self.path.name}"

    def __iter__(self) -> Iterator[Frame]:
        for i, p in enumerate(self.files):
            try:
                yield _timed(i, lambda p=p: _open_image(p, self.limits), str(p))
            except ValueError as err:  # one unreadable file is that frame's failure, not the end of the run
                yield Frame(
                    index=i, image=None, captured_at=time.perf_counter(), capture_ms=0.0, origin=str(p), error=err
                )  # type: ignore[arg-type]


class SyntheticSource(Source):
    """Generated scenes (vzedge.images.demo_image with a per-frame seed): no files, no devices."""

    def __init__(self, frames: int, size: int = 336, distinct: int | None = None) -> None:
        if frames < 1:
            raise ValueError(f"synthetic source needs frames >= 1, got {frames}")
        self.length, self.size = frames, size
        self.distinct = distinct
        self.name = f"synthetic:{frames}"

    def __iter__(self) -> Iterator[Frame]:
        from vzedge.images import demo_image

        for i in range(self.length or 0):
            seed = i % self.distinct if self.distinct else i
            yield _timed(i, lambda seed=seed: demo_image(self.size, seed), f"synthetic:{seed}")


class VideoSource(Source):
    """A video file or a camera index, read with OpenCV."""

    def __init__(self, spec: str | int, max_frames: int | None = None) -> None:
        from vzedge._deps import require

        self.cv2 = require("cv2", "video and camera sources")
        self.spec = spec
        self.cap = self.cv2.VideoCapture(spec)
        if not self.cap.isOpened():
            what = f"camera {spec}" if isinstance(spec, int) else f"video {spec!r}"
            raise ValueError(f"cannot open {what}: it is not there or not readable")
        count = int(self.cap.get(self.cv2.CAP_PROP_FRAME_COUNT)) if isinstance(spec, str) else 0
        self.length = min(count, max_frames) if count > 0 and max_frames else (count or max_frames)
        self.name = f"camera:{spec}" if isinstance(spec, int) else f"video:{Path(str(spec)).name}"

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while self.length is None or i < self.length:
            t0 = time.perf_counter()
            ok, bgr = self.cap.read()
            if not ok:
                return
            image = Image.fromarray(self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB))
            t1 = time.perf_counter()
            yield Frame(index=i, image=image, captured_at=t1, capture_ms=(t1 - t0) * 1e3, origin=self.name)
            i += 1

    def close(self) -> None:
        self.cap.release()


def open_source(spec: str, frames: int | None = None, limits: ImageLimits | None = None) -> Source:
    """`synthetic` / `synthetic:N`, `camera:K` (or a bare integer), a folder, a video file, or an image."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        tail = spec.split(":", 1)[1] if ":" in spec else None
        if tail is not None and not tail.isdigit():
            raise ValueError(f"--source {spec!r}: use synthetic or synthetic:N with N a whole number of frames")
        n = int(tail) if tail is not None else (frames or 100)
        return SyntheticSource(frames if frames is not None else n)
    if spec.startswith("camera:") or spec.isdigit():
        index = spec.split(":", 1)[-1]
        if not index.isdigit():
            raise ValueError(f"--source {spec!r}: use camera:K with K a camera index such as 0")
        return VideoSource(int(index), max_frames=frames)
    if spec == "demo":  # the built-in scene (demo_image seed 0), repeated
        return SyntheticSource(frames or 1, distinct=1)
    if os.path.isdir(spec):
        return FolderSource(spec, limits)
    suffix = Path(spec).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if not os.path.isfile(spec):
            raise ValueError(f"video {spec!r} does not exist")
        return VideoSource(spec, max_frames=frames)
    return ImageSource(spec, repeat=frames or 1, limits=limits)
