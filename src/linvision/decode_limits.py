"""Bounded decoding: what an image file may declare before any pixel is decoded (:func:`check_declared_size`).

A tiny file can declare an enormous size (a lying header) or decompress to gigabytes (a decompression bomb); these
checks run on the opened, not yet decoded image: the pixel cap (PIL's ``Image.MAX_IMAGE_PIXELS``, left on;
raised with :func:`set_max_pixels` / the CLI's ``--max-pixels``), the aspect ratio, and the declared size against
the file size.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

__all__ = ["MAX_PIXELS", "MAX_ASPECT", "MAX_EXPANSION", "DeclaredSizeError", "set_max_pixels", "check_declared_size"]

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's limit (~89.5 MP), left on; see set_max_pixels
MAX_ASPECT = 200       # longest side / shortest side
MAX_EXPANSION = 2_000  # decoded bytes per file byte: deflate tops out near 1032:1, JPEG well below 2000:1
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2,
                    "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


class DeclaredSizeError(ValueError):
    """An image's declared size is refused before decoding (the message says why)."""


def set_max_pixels(n: int) -> None:
    """Raise (or lower) the pixel cap of :func:`check_declared_size` and PIL's own ``Image.MAX_IMAGE_PIXELS`` (the
    CLI's ``--max-pixels``)."""
    global MAX_PIXELS
    MAX_PIXELS = int(n)
    Image.MAX_IMAGE_PIXELS = int(n)


def check_declared_size(im: Image.Image, path: str | Path, max_pixels: int | None = None) -> None:
    """Refuse an opened (not yet decoded) image whose declared size is implausible, before any allocation.

    Raises:
        DeclaredSizeError: a side < 1, an aspect ratio over ``MAX_ASPECT``:1, more than ``max_pixels`` (default
        ``MAX_PIXELS``) pixels, or more decoded bytes than ``MAX_EXPANSION`` times the file size could hold (a
        lying header or a decompression bomb); the message gives the reason.
    """
    w, h = im.size
    if w < 1 or h < 1:
        raise DeclaredSizeError(f"declares an empty size {w}x{h}")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise DeclaredSizeError(f"declares {w}x{h} px, an extreme aspect ratio ({max(w, h) / min(w, h):.0f}:1, "
                                f"more than {MAX_ASPECT}:1); refused")
    cap = MAX_PIXELS if max_pixels is None else max_pixels
    if cap and w * h > cap:
        raise DeclaredSizeError(f"declares {w}x{h} = {w * h} px, over the pixel cap of {cap} (a decompression bomb? "
                                "raise the cap with --max-pixels)")
    try:
        size = os.fstat(im.fp.fileno()).st_size if getattr(im, "fp", None) else os.path.getsize(path)
    except (OSError, AttributeError, ValueError):
        size = os.path.getsize(path)
    need = w * h * _BYTES_PER_PIXEL.get(im.mode, 4)
    if need > MAX_EXPANSION * max(size, 1):
        raise DeclaredSizeError(f"declares {w}x{h} px ({need / 2 ** 20:.0f} MiB decoded) but the file holds only "
                                f"{size} bytes; refused (a lying header or a decompression bomb)")
