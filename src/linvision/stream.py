"""Streaming inference: classify an image far larger than fits as one tensor by feeding it to a recurrent model
one row of patches at a time — :func:`forward_stream` (``linvision.stream.forward_stream(model, source)``).

This module owns streaming: the row sources (file I/O), the per-row patch embedding and the loops over the
model's blocks, final norm and head, for ViR (1D retention, chunked token sequence) and ViR-2D (row-recurrent 2D
retention). The models import no I/O module; they provide the pure-tensor step the loops call,
:meth:`~linvision.models.vir.VisionRetention.forward_blocks` (one piece of the sequence through all blocks, one
retention state per block).

A *row source* hands out horizontal strips of pixels on demand, so the whole image never exists in memory:

- :class:`NpySource` — a ``.npy`` file ``[H, W, C]`` (uint8/uint16/float), rows read with ``pread`` (no mmap,
  so the process's resident memory does not grow with the file);
- :class:`PILSource` — an image file opened lazily with PIL. Uncompressed layouts (PPM/PGM, BMP, uncompressed
  TIFF strips) are decoded strip by strip straight from the file; compressed formats (JPEG, PNG, ...) cannot be
  decoded partially by PIL and are decoded once as 8-bit RGB (H·W·3 bytes — still far less than a float tensor
  and the model's activations), with a warning;
- :class:`ArraySource` — an in-memory (or memory-mapped) NumPy array ``[H, W, C]`` or a torch tensor
  ``[1, C, H, W]`` / ``[C, H, W]``;
- :class:`StripSource` — any iterator of strips ``[h_i, W, C]`` (heights may vary) plus the image's height.

Integer pixels are scaled to [0, 1] (by 255, or 65535 for 16-bit) and normalized with the model's mean/std;
floating-point pixels (e.g. a torch tensor) are taken as already-normalized model input. Grayscale is repeated to
3 channels; a 4th (alpha) channel is dropped.

:class:`PatchRowEmbed` turns strips into patch tokens with the model's own ``patch_embed`` and adds the pos-embed
row by row, each row interpolated exactly as for the full grid (bicubic, separable: one ``[rows, grid_h]`` and one
``[cols, grid_w]`` interpolation matrix, never the full ``[rows·cols, C]`` pos-embed).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import LinvisionError
from .models.vir import VisionRetention, VisionRetention2D
from .ops.retention import op_chunk_size

__all__ = ["RowSource", "NpySource", "PILSource", "ArraySource", "StripSource", "open_row_source",
           "PatchRowEmbed", "interpolation_matrix", "can_stream", "row_embed", "forward_stream", "predict_stream",
           "peak_rss_mib"]

_log = logging.getLogger("linvision")


class RowSource:
    """An image read by horizontal strips: ``height``, ``width`` (pixels) and ``read_rows(r0, r1)`` returning the
    pixel rows ``[r0, r1)`` as ``[r1 - r0, width, C]`` (NumPy array or torch tensor). Reads come in increasing
    order; a source need not support going back."""

    height: int
    width: int

    def read_rows(self, r0: int, r1: int):  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class ArraySource(RowSource):
    """A NumPy array (or ``np.memmap``) ``[H, W]``/``[H, W, C]``, or a torch tensor ``[1, C, H, W]``/``[C, H, W]``
    (already-normalized model input). A memmap's pages stay resident once read: use :class:`NpySource` for
    files larger than memory."""

    def __init__(self, array: Union[np.ndarray, torch.Tensor]):
        if isinstance(array, torch.Tensor):
            if array.dim() == 4:
                if array.shape[0] != 1:
                    raise ValueError(f"streaming takes one image; got a batch of {array.shape[0]}")
                array = array[0]
            if array.dim() != 3:
                raise ValueError(f"expected a tensor [1, C, H, W] or [C, H, W], got {tuple(array.shape)}")
            array = array.permute(1, 2, 0)  # [H, W, C] view
        elif array.ndim not in (2, 3):
            raise ValueError(f"expected an array [H, W] or [H, W, C], got shape {array.shape}")
        self.array = array
        self.height, self.width = int(array.shape[0]), int(array.shape[1])

    def read_rows(self, r0: int, r1: int):
        return self.array[r0:r1]


class NpySource(RowSource):
    """A ``.npy`` file ``[H, W]`` or ``[H, W, C]`` (C-order), read row range by row range with ``os.pread``.

    Raises:
        LinvisionError: the file is not a readable C-order 2D/3D ``.npy``.
    """

    def __init__(self, path: Union[str, Path]):
        self.path, self._fd = Path(path), None
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as e:
            raise LinvisionError(f"cannot read {self.path} as a .npy array: {e}") from None
        if fortran or len(shape) not in (2, 3) or dtype.hasobject:
            raise LinvisionError(f"{self.path}: expected a C-order [H, W] or [H, W, C] array, got shape {shape} "
                                 f"{'(Fortran order) ' if fortran else ''}dtype {dtype}")
        if dtype.str.lstrip("<|=") not in _NPY_DTYPES:
            raise LinvisionError(f"{self.path}: unsupported dtype {dtype} (streamable: uint8, uint16 [0, 255] / "
                                 "[0, 65535] pixels, or float16/32/64 already-normalized input; native byte order)")
        if len(shape) == 3 and shape[2] not in (1, 3, 4):
            raise LinvisionError(f"{self.path}: {shape[2]} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
        self.shape, self.dtype = tuple(int(x) for x in shape), dtype
        self.height, self.width = self.shape[0], self.shape[1]
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        size = os.path.getsize(self.path)
        if min(self.height, self.width) < 1 or self.offset + self.height * self.row_bytes > size:
            dims = "x".join(map(str, self.shape))
            raise LinvisionError(f"{self.path}: header declares {dims} {dtype} "
                                 f"({self.height * self.row_bytes} bytes) but the file holds {size - self.offset}; "
                                 "truncated or a lying header")
        _check_aspect(self.width, self.height, self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        n = (r1 - r0) * self.row_bytes
        buf = bytearray(n)  # writable, so torch can wrap it without a copy
        if os.preadv(self._fd, [buf], self.offset + r0 * self.row_bytes) != n:
            raise LinvisionError(f"{self.path}: file is truncated (rows {r0}..{r1} of {self.height})")
        return np.frombuffer(buf, dtype=self.dtype).reshape((r1 - r0,) + self.shape[1:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.close()


_NPY_DTYPES = ("u1", "u2", "f2", "f4", "f8")


def _check_aspect(w: int, h: int, path) -> None:
    from .decode_limits import MAX_ASPECT
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise LinvisionError(f"{path}: {w}x{h} px is an extreme aspect ratio ({max(w, h) / min(w, h):.0f}:1, more "
                             f"than {MAX_ASPECT}:1); refused")


_RAW_BYTES = {"L": 1, "P": 1, "I;8": 1, "RGB": 3, "BGR": 3, "YCbCr": 3, "RGBA": 4, "RGBX": 4, "BGRX": 4,
              "RGBa": 4, "CMYK": 4, "LA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


class PILSource(RowSource):
    """An image file opened lazily with PIL, converted to 8-bit RGB strip by strip (as ``linvision.data.to_rgb``).

    Files whose pixel data PIL describes as uncompressed ``raw`` strips spanning the full width (PPM/PGM, BMP,
    uncompressed TIFF) are read strip by strip from the file (palette and palette transparency kept); anything
    else, and any file with an EXIF orientation, is decoded whole once exactly as ``linvision predict`` decodes it
    (:func:`linvision.data.load_rgb`: EXIF orientation applied; a warning says so) — PIL cannot decode JPEG/PNG
    partially. Declared sizes are checked before anything is allocated: strips against the file size, whole
    decodes with :func:`linvision.data.check_declared_size` (pixel cap, file size); extreme aspect ratios are
    refused. PIL's own pixel limit stays on (it is lifted only while opening the file).

    Raises:
        LinvisionError: the file is missing or not an image, or its declared size is refused (the reason).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise LinvisionError(f"image not found: {self.path}")
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only for opening: the header is checked
        try:  # below, and strip-read files never hold more than one strip in memory
            self.image = Image.open(self.path)
        except (OSError, SyntaxError, ValueError) as e:
            raise LinvisionError(f"cannot decode image {self.path}: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        self.width, self.height = self.image.size
        _check_aspect(self.width, self.height, self.path)
        self.tiles = self._raw_strips(self.image)
        self._decoded: Optional[np.ndarray] = None
        if self.tiles is not None:
            size = self.path.stat().st_size
            if any(off + (y1 - y0) * stride > size for y0, y1, off, _, stride, _ in self.tiles):
                raise LinvisionError(f"cannot decode image {self.path}: its header declares {self.width}x"
                                     f"{self.height} px that the file ({size} bytes) does not hold (truncated or a "
                                     "lying header)")
        oriented = False
        if self.tiles is None or self.image.format == "TIFF":
            from .data import check_declared_size
            try:
                # before getexif, which may decode (PNG); strips need no pixel cap (one strip at a time)
                check_declared_size(self.image, self.path, 0 if self.tiles else None)
                oriented = self.image.getexif().get(0x0112, 1) not in (1, None)  # then decode as predict does
                if oriented and self.tiles:  # decoded whole after all
                    check_declared_size(self.image, self.path)
            except (ValueError, OSError, SyntaxError) as e:
                raise LinvisionError(f"cannot decode image {self.path}: {e}") from None
        if oriented or self.tiles is None:
            self.tiles = None
            _log.warning("%s: %s cannot be decoded by strips%s; decoding it whole (%.0f MiB as 8-bit RGB)",
                         self.path, self.image.format, " (EXIF orientation)" if oriented else "",
                         self.width * self.height * 3 / 2 ** 20)
            if oriented:  # predict's decode: rotated / flipped, so width and height may swap
                self._decode()
                self.height, self.width = self._decoded.shape[:2]

    def _decode(self) -> np.ndarray:
        from PIL import ImageOps

        from .data import to_rgb
        if self._decoded is None:
            try:
                self.image.load()
                self._decoded = np.asarray(to_rgb(ImageOps.exif_transpose(self.image)))
            except (OSError, SyntaxError, ValueError, MemoryError) as e:
                raise LinvisionError(f"cannot decode image {self.path}: {e or type(e).__name__}") from None
        return self._decoded

    @staticmethod
    def _raw_strips(im: Image.Image):
        """``[(y0, y1, offset, rawmode, stride, orientation)]`` if every tile is a full-width raw strip."""
        out = []
        for t in im.tile:
            name, (x0, y0, x1, y1), offset, args = t[0], t[1], t[2], t[3]
            rawmode, stride, orient = (args, 0, 1) if isinstance(args, str) else (tuple(args) + (0, 1))[:3]
            if name != "raw" or x0 != 0 or x1 != im.size[0] or rawmode not in _RAW_BYTES:
                return None
            stride = stride or _RAW_BYTES[rawmode] * im.size[0]
            out.append((y0, y1, offset, rawmode, stride, orient or 1))
        return out or None

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        from .data import to_rgb
        if self.tiles is None:
            return self._decode()[r0:r1]
        parts = []
        with open(self.path, "rb") as f:
            for y0, y1, offset, rawmode, stride, orient in self.tiles:
                a, b = max(r0, y0), min(r1, y1)
                if a >= b:
                    continue
                first = (a - y0) if orient > 0 else (y1 - b)  # stored row index of the first row to read
                f.seek(offset + first * stride)
                data = f.read((b - a) * stride)
                if len(data) != (b - a) * stride:
                    raise LinvisionError(f"cannot decode image {self.path}: file is truncated")
                strip = Image.frombuffer(self.image.mode, (self.width, b - a), data, "raw", rawmode, stride, orient)
                if self.image.mode in ("P", "PA"):  # the palette (and its transparency) travel with the strip
                    strip.putpalette(self.image.getpalette(), self.image.palette.mode)
                    if "transparency" in self.image.info:
                        strip.info["transparency"] = self.image.info["transparency"]
                parts.append(np.asarray(to_rgb(strip)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


class StripSource(RowSource):
    """An iterator of pixel strips ``[h_i, W, C]`` (any heights) covering an image of known ``height``."""

    def __init__(self, strips: Iterable, height: int, width: Optional[int] = None):
        self._it: Iterator = iter(strips)
        self.height = int(height)
        self._buf, self._pos = None, 0  # buffered rows start at image row _pos
        first = self._next()
        self.width = int(first.shape[1]) if width is None else int(width)
        if first.shape[1] != self.width:
            raise ValueError(f"strip width {first.shape[1]} != width {self.width}")
        self._buf = first

    def _next(self):
        try:
            s = next(self._it)
        except StopIteration:
            raise ValueError("the strip iterator ended before the image's height was reached") from None
        return s if isinstance(s, (np.ndarray, torch.Tensor)) else np.asarray(s)

    def read_rows(self, r0: int, r1: int):
        if r0 < self._pos:
            raise ValueError("StripSource reads forward only")
        cat = torch.cat if isinstance(self._buf, torch.Tensor) else np.concatenate
        while self._pos + len(self._buf) < r1:
            self._buf = cat([self._buf, self._next()])
        out = self._buf[r0 - self._pos:r1 - self._pos]
        self._buf, self._pos = self._buf[r1 - self._pos:], r1
        return out


def open_row_source(source, height: Optional[int] = None) -> RowSource:
    """A :class:`RowSource` for ``source``: a RowSource (returned as is), a path (``.npy`` → :class:`NpySource`,
    else :class:`PILSource`), a PIL image (decoded whole), a NumPy array or torch tensor (:class:`ArraySource`),
    or an iterable of strips (:class:`StripSource`, needs ``height``).

    Raises:
        LinvisionError: missing/unreadable file; ValueError: an unsupported object or shape.
    """
    if isinstance(source, RowSource):
        return source
    if isinstance(source, (str, Path)):
        return NpySource(source) if str(source).lower().endswith(".npy") else PILSource(source)
    if isinstance(source, Image.Image):
        from .data import to_rgb
        return ArraySource(np.asarray(to_rgb(source)))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ArraySource(source)
    if isinstance(source, Iterable):
        if height is None:
            raise ValueError("streaming from an iterator of strips needs the image height (height=...)")
        return StripSource(source, height)
    raise ValueError(f"cannot stream from a {type(source).__name__}")


def interpolation_matrix(n_in: int, n_out: int, dtype=torch.float32) -> torch.Tensor:
    """``M [n_out, n_in]`` with ``M @ x`` = 1D bicubic resize of x (align_corners=False, no antialias) — the
    operator ``F.interpolate`` applies along one axis, read off by resizing the identity. Bicubic resize is
    separable, so a 2D resize is ``M_h X M_wᵀ`` per channel."""
    eye = torch.eye(n_in, dtype=torch.float32).view(1, n_in, n_in, 1)  # n_in signals of length n_in
    m = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)  # [1, n_in, n_out, 1]
    return m[0, :, :, 0].t().to(dtype)


class PatchRowEmbed:
    """Patch tokens of one row of patches at a time, plus their pos-embed row, for streaming.

    Args:
        patch_embed: the model's timm ``PatchEmbed`` (its ``proj`` and ``norm`` are applied to each strip).
        pos_embed: ``[1, gh * gw, C]`` learned patch pos-embed of grid ``grid = (gh, gw)``.
        source: a :class:`RowSource`.
        mean, std: per-channel normalization for integer pixels (ignored for float pixels).

    ``rows`` = ceil(height / patch) and ``cols`` = ceil(width / patch): sides not divisible by the patch are
    zero-padded bottom/right after normalization, as ``PatchEmbed(dynamic_img_pad=True)`` does on a whole image.
    ``row(r, c0, c1)`` → tokens ``[1, c1 - c0, C]`` of patch row r, columns [c0, c1), pos-embed added.
    """

    def __init__(self, patch_embed, pos_embed: torch.Tensor, grid: Tuple[int, int], source: RowSource,
                 mean: Sequence[float], std: Sequence[float]):
        self.pe, self.src = patch_embed, source
        self.p = patch_embed.patch_size
        self.rows, self.cols = math.ceil(source.height / self.p[0]), math.ceil(source.width / self.p[1])
        gh, gw = grid
        C = pos_embed.shape[-1]
        self.P = pos_embed.reshape(gh, gw, C)
        self.Mh = interpolation_matrix(gh, self.rows, pos_embed.dtype)  # [rows, gh]
        self.Mw = interpolation_matrix(gw, self.cols, pos_embed.dtype)  # [cols, gw]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._strip_row, self._strip = -1, None

    def _pixels(self, r: int) -> torch.Tensor:
        """Patch row r as a model-ready float tensor ``[1, 3, ph, W]`` (uint8 until sliced by columns)."""
        if self._strip_row != r:
            a = self.src.read_rows(r * self.p[0], min(self.src.height, (r + 1) * self.p[0]))
            if isinstance(a, torch.Tensor):
                t = a
            else:
                a = np.ascontiguousarray(a)
                t = torch.from_numpy(a if a.flags.writeable else a.copy())  # one strip; torch wants writable
            if t.dim() == 2:
                t = t[:, :, None]
            if t.shape[1] != self.src.width:
                raise ValueError(f"row source returned width {t.shape[1]}, expected {self.src.width}")
            self._strip_row, self._strip = r, t  # [h, W, C], raw dtype
        return self._strip

    def row(self, r: int, c0: int = 0, c1: Optional[int] = None) -> torch.Tensor:
        c1 = self.cols if c1 is None else c1
        ph, pw = self.p
        t = self._pixels(r)[:, c0 * pw:c1 * pw]  # [h, w, Cin] raw pixels of these columns only
        if t.dtype == torch.uint16 or t.dtype == torch.int32:
            t = t.to(torch.float32) / 65535.
        elif not t.is_floating_point():
            t = t.to(torch.float32) / 255.
        else:
            t = t.to(torch.float32)
        x = t.permute(2, 0, 1)[None]  # [1, Cin, h, w]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:
            x = x[:, :3]
        if not self._strip.is_floating_point():
            x = (x - self.mean) / self.std
        x = F.pad(x, (0, (c1 - c0) * pw - x.shape[-1], 0, ph - x.shape[-2]))  # bottom/right zero padding
        tok = self.pe.norm(self.pe.proj(x).flatten(2).transpose(1, 2))  # [1, c1 - c0, C]
        pos = self.Mw[c0:c1] @ torch.einsum("i,ijc->jc", self.Mh[r], self.P)  # [c1 - c0, C]
        return tok + pos[None]


def can_stream(model) -> bool:
    """Whether :func:`forward_stream` takes ``model``: a ViR (:class:`~linvision.models.vir.VisionRetention`, 1D)
    or ViR-2D (:class:`~linvision.models.vir.VisionRetention2D`) classifier."""
    return isinstance(model, VisionRetention)


def row_embed(model: VisionRetention, source, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None, height: Optional[int] = None) -> PatchRowEmbed:
    """A :class:`PatchRowEmbed` of ``model``'s patch embed and pos-embed over ``source`` (see
    :func:`open_row_source`); ``mean``/``std`` default to the model's ``pretrained_cfg`` (ImageNet's without one)."""
    src = open_row_source(source, height=height)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406)) if mean is None else mean
    std = cfg.get("std", (0.229, 0.224, 0.225)) if std is None else std
    return PatchRowEmbed(model.patch_embed, model.pos_embed, model.patch_embed.grid_size, src, mean, std)


@torch.no_grad()
def forward_stream(model: VisionRetention, source, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, height: Optional[int] = None, pre_logits: bool = False,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Classify one image of any size with a ViR ``model``, reading ``source`` one row of patches at a time.

    **ViR (1D)**: patch tokens are made from one row's pixel strip at a time, ``chunk_size`` tokens at a time, and
    the token sequence goes through **all** blocks in chunks of exactly ``chunk_size`` tokens (a chunk may span two
    rows; the parallel form within a chunk), with one retention state ``[1, H, d, d]`` per block; then the class
    token. Equals ``model(x, mode='chunkwise')`` on the whole image ``x`` (up to float rounding).
    **ViR-2D**: each whole row of patches goes through all blocks in the recurrent form with one state
    ``[1, H, cols, d, d]`` per block, and the final-normed tokens are summed for the average pool. Equals
    ``model(x, mode='recurrent')``; ``chunk_size`` is ignored.

    Memory is constant in the image height and, apart from one strip of pixels (patch × width × channels, uint8
    for image files) and, for 2D, the per-column states, in its width; the pos-embed row is resized bicubically
    exactly as for the full grid (:class:`PatchRowEmbed`). Runs under ``torch.no_grad``.

    Args:
        model: a ViR / ViR-2D classifier (:func:`can_stream`), in ``eval()`` mode for deterministic results.
        source: see :func:`open_row_source` — a path (``.npy``, PPM/BMP/uncompressed TIFF streamed; other formats
            decoded once as 8-bit RGB), a NumPy array ``[H, W, C]``, a tensor ``[1, C, H, W]`` (already
            normalized), a :class:`RowSource`, or an iterator of strips ``[h_i, W, C]`` with ``height``.
        mean, std: normalization of integer pixels (default: the model's ``pretrained_cfg``).
        height: the image height in pixels, for an iterator of strips.
        pre_logits: return the pooled features ``[1, C]`` instead of logits.
        chunk_size: 1D: tokens per chunk (default: the model's ``chunk_size``, else
            :func:`~linvision.ops.retention.op_chunk_size`: 64 for heads of 64); larger chunks mean fewer, larger
            operations (faster on CPU) and a larger constant working set.

    Returns:
        logits ``[1, num_classes]`` (float32), or features ``[1, C]`` with ``pre_logits``.

    Raises:
        TypeError: ``model`` cannot stream; ValueError: a global pool other than the class token / average, an
        unsupported source or shape; LinvisionError: an unreadable file.
    """
    if not can_stream(model):
        raise TypeError(f"{type(model).__name__} cannot stream: forward_stream takes ViR models (vir_*, vir2d_*)")
    pools = ("avg",) if isinstance(model, VisionRetention2D) else ("token_last", "avg")
    if model.global_pool not in pools:
        raise ValueError(f"forward_stream needs global_pool {' or '.join(map(repr, pools))}, "
                         f"got {model.global_pool!r}")
    emb = row_embed(model, source, mean, std, height)
    if isinstance(model, VisionRetention2D):
        x = _stream_rows(model, emb)
    else:
        # auto: from the head size, not the token count, so that memory stays constant in the image size
        x = _stream_chunks(model, emb, chunk_size or model.chunk_size or op_chunk_size(model.head_dim))
    x = model.head_drop(x)
    return x if pre_logits else model.head(x)


def _stream_chunks(model: VisionRetention, emb: PatchRowEmbed, chunk: int) -> torch.Tensor:
    """1D ViR: the pooled final-normed features ``[1, C]`` (class token, or the mean of the patch tokens)."""
    states: list = [None] * len(model.blocks)
    pooled, pending, n_pending = None, [], 0  # pending: token segments not yet fed, fewer than chunk in total
    segments = (emb.row(r, c0, min(emb.cols, c0 + chunk)) for r in range(emb.rows) for c0 in range(0, emb.cols, chunk))
    for seg in itertools.chain(segments, [None]):
        if seg is not None:
            pending.append(seg)
            n_pending += seg.shape[1]
        while n_pending >= chunk or (seg is None and n_pending):
            # full chunks of the token sequence, across row boundaries: the working set is one chunk
            buf = torch.cat(pending, dim=1) if len(pending) > 1 else pending[0]
            h = model.norm(model.forward_blocks(buf[:, :chunk], states, "parallel"))
            if model.global_pool == "avg":
                pooled = h.sum(1) if pooled is None else pooled + h.sum(1)
            pending = [buf[:, chunk:]] if buf.shape[1] > chunk else []
            n_pending = max(0, n_pending - chunk)
    if model.global_pool == "avg":
        return pooled / (emb.rows * emb.cols)
    return model.norm(model.forward_blocks(model.cls_token, states, "parallel"))[:, 0]  # class token last


def _stream_rows(model: VisionRetention2D, emb: PatchRowEmbed) -> torch.Tensor:
    """ViR-2D: the mean ``[1, C]`` of the final-normed patch tokens, row by row (one per-column state per block)."""
    states: list = [None] * len(model.blocks)
    pooled = 0.
    for r in range(emb.rows):
        pooled = pooled + model.norm(model.forward_blocks(emb.row(r), states, "recurrent", width=emb.cols)).sum(1)
    return pooled / (emb.rows * emb.cols)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss``; Linux reports KiB)."""
    import resource
    import sys
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 2 ** 10


def predict_stream(model, config: dict, paths: Sequence[Union[str, Path]], top_k: int = 5,
                   chunk_size: Optional[int] = 256) -> list:
    """``linvision predict --stream``: classify each image file at its **native** resolution (no resize or crop)
    with :func:`forward_stream`, normalized with the checkpoint's mean/std; ``chunk_size`` tokens per chunk for
    ViR (the same logits as any other chunk size; larger is faster on CPU).

    Returns:
        One dict per image: ``{"image", "size": [W, H], "tokens", "seconds", "peak_rss_mib", "predictions":
        [{"class", "index", "prob"}, ...]}`` (``peak_rss_mib``: the process's peak RSS after this image).

    Raises:
        LinvisionError: the model cannot stream, or an image is missing/undecodable.
    """
    import time
    if not can_stream(model):
        raise LinvisionError(f"model {config.get('model')} cannot stream (--stream needs a recurrent model: "
                             "vir_*, vir2d_*)")
    dc, names = config.get("data_config", {}), config.get("class_names") or []
    model.eval()
    results = []
    for p in paths:
        src = open_row_source(p)
        t0 = time.perf_counter()
        try:
            logits = forward_stream(model, src, mean=dc.get("mean"), std=dc.get("std"), chunk_size=chunk_size)
            probs = logits.float().softmax(dim=1)[0]
        except (OSError, SyntaxError, ValueError) as e:
            raise LinvisionError(f"cannot decode image {p}: {e}") from None
        finally:
            src.close()
        top = probs.topk(min(top_k, probs.numel()))
        ph, pw = model.patch_embed.patch_size
        results.append({
            "image": str(p), "size": [src.width, src.height],
            "tokens": math.ceil(src.height / ph) * math.ceil(src.width / pw),
            "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mib": round(peak_rss_mib(), 1),
            "predictions": [{"class": names[k] if k < len(names) else str(k), "index": k, "prob": v}
                            for v, k in zip(top.values.tolist(), top.indices.tolist())]})
    return results
