"""Images from chat requests: `data:` URLs (base64 PNG/JPEG/WebP) or local paths under --image-root.

Every refusal is a `RequestError` (a 4xx with the OpenAI error body) that names the fix. http(s) URLs are refused:
the device may be offline, and a server that fetches URLs for clients is an SSRF hole.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from PIL import Image

from vzedge.serve.errors import RequestError

FORMATS = {"PNG", "JPEG", "WEBP"}
_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp"}


@dataclass
class DecodedImage:
    image: Image.Image  # RGB
    sha256: str  # of the decoded RGB pixels and the size: the image-cache key's content part
    nbytes: int  # bytes of the encoded image as sent


def _open(data: bytes, max_pixels: int, param: str) -> DecodedImage:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in FORMATS:
                raise RequestError(
                    f"image format {fmt} is not accepted; send PNG, JPEG or WebP", param=param, code="invalid_image"
                )
            w, h = im.size
            if w * h > max_pixels:  # checked from the header, before any pixel is decoded (decompression bombs)
                raise RequestError(
                    f"image is {w}x{h} = {w * h} pixels, more than the server's limit of {max_pixels}; "
                    "downscale it before sending",
                    param=param,
                    code="image_too_large",
                )
            rgb = im.convert("RGB")  # decodes everything: truncated or corrupt data fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, RequestError):
            raise
        raise RequestError(
            f"the image data cannot be decoded ({type(err).__name__}: {err}); send a valid PNG, JPEG or WebP",
            param=param,
            code="invalid_image",
        ) from None
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode() + rgb.tobytes()).hexdigest()
    return DecodedImage(rgb, digest, len(data))


def _data_url(url: str, max_pixels: int, param: str) -> DecodedImage:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(
            "a data: image URL must be base64, like data:image/png;base64,<data>", param=param, code="invalid_image"
        )
    mime = head[len("data:") : -len(";base64")].lower()
    if mime and mime not in _MIME:
        raise RequestError(
            f"data: URL of type {mime!r}; send image/png, image/jpeg or image/webp", param=param, code="invalid_image"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            "the data: URL's payload is not valid base64; encode the image bytes with base64",
            param=param,
            code="invalid_image",
        ) from None
    return _open(data, max_pixels, param)


def _local(url: str, image_root: str | None, max_pixels: int, param: str) -> DecodedImage:
    if image_root is None:
        raise RequestError(
            "local image paths are off; send the image as a data: URL, or start the server with --image-root DIR",
            param=param,
            code="invalid_image_url",
        )
    path = unquote(urlparse(url).path) if url.startswith("file:") else url
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise RequestError(
            f"image path {url!r} is outside --image-root; pass a path under {image_root!r}",
            param=param,
            code="invalid_image_url",
        )
    if not os.path.isfile(full):
        raise RequestError(
            f"image path {url!r} does not exist under --image-root", param=param, code="invalid_image_url"
        )
    with open(full, "rb") as f:
        return _open(f.read(), max_pixels, param)


def decode_image_url(url: str, image_root: str | None, max_pixels: int, param: str) -> DecodedImage:
    """An `image_url.url` -> the decoded RGB image and its content hash."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, max_pixels, param)
    if scheme in ("http", "https"):
        raise RequestError(
            "http(s) image URLs are not fetched (the device may be offline); send the image inline as a "
            "data:image/png;base64,... URL",
            param=param,
            code="invalid_image_url",
        )
    if scheme in ("file", "") or os.path.isabs(url):
        return _local(url, image_root, max_pixels, param)
    raise RequestError(
        f"image URL scheme {scheme!r} is not supported; send a data: URL (or a path under --image-root)",
        param=param,
        code="invalid_image_url",
    )


__all__ = ["DecodedImage", "decode_image_url"]
