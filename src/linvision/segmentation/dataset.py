"""Semantic-segmentation data: ``{train,val,test}/images/<name>.<ext>`` + ``{train,val,test}/masks/<name>.png``.

A data set is such a folder, a folder holding exactly one, or a ``.tar``/``.tar.gz`` archive of either (located and
extracted once by :func:`linvision.data.resolve_data_root`). A mask pixel is the class index of its image pixel;
an optional ``classes.json`` at the data-set root gives ``classes`` (names, K of them), ``palette`` (K ``[r, g, b]``
colours), ``ignore_index`` (default 255) and ``ignore_color`` (the colour of ignored pixels in colour masks).
Colour (RGB) masks are mapped to indices through the palette.

Checks (all raise a one-line :class:`~linvision.errors.LinvisionError` naming the file and the value):

- when the data set is built (file names and PNG/JPEG headers only, no pixel decoding): a missing or empty split,
  an image without a mask or a mask without an image, a mask whose size differs from its image's, a colour mask
  without a palette, a bad ``classes.json``;
- when a sample is loaded (a full scan of every mask would cost a data set's worth of decoding; call
  :meth:`SegmentationDataset.check_masks` for one): a mask value ≥ K that is not ``ignore_index``, a mask colour
  not in the palette.

Files that cannot be decoded at load time are skipped with one warning (the sample is ``None``, dropped by
:func:`linvision.data.collate_skip_none`), as in :class:`linvision.data.ImageFolder`.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data import IMAGE_ERRORS, IMG_EXTENSIONS, _seeded, load_rgb, resolve_data_root
from ..errors import LinvisionError

__all__ = ["SegMeta", "SegmentationDataset", "load_meta", "resolve_seg_root", "seg_split_dir", "read_mask",
           "META_FILE", "DEFAULT_IGNORE_INDEX"]

META_FILE = "classes.json"
DEFAULT_IGNORE_INDEX = 255
INDEX_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")  # pixel value = class index
COLOR_MODES = ("RGB", "RGBA")  # pixel colour → class index through the palette
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",),
               "eval": ("test", "val", "validation", "valid")}


@dataclass
class SegMeta:
    """Label set of a data set: ``classes`` (K names), ``palette`` (K RGB triples or ``None``), ``ignore_index``
    (label of pixels left out of loss and metrics; not in ``[0, K)``) and ``ignore_color`` (its colour in colour
    masks, or ``None``)."""
    classes: list[str]
    palette: list[tuple[int, int, int]] | None = None
    ignore_index: int = DEFAULT_IGNORE_INDEX
    ignore_color: tuple[int, int, int] | None = None
    source: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (e.g. for a checkpoint's config); :meth:`from_dict` inverts it."""
        return {"classes": list(self.classes),
                "palette": [list(c) for c in self.palette] if self.palette else None,
                "ignore_index": self.ignore_index,
                "ignore_color": list(self.ignore_color) if self.ignore_color else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "meta") -> "SegMeta":
        """Validated :class:`SegMeta` from a ``classes.json``-style dict.

        Raises:
            LinvisionError: names ``source`` and the bad key/value.
        """
        classes = d.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise LinvisionError(f"{source}: 'classes' must be a non-empty list of names, got {classes!r:.80}")
        k = len(classes)
        ignore = d.get("ignore_index", DEFAULT_IGNORE_INDEX)
        if not isinstance(ignore, int) or isinstance(ignore, bool) or 0 <= ignore < k:
            raise LinvisionError(f"{source}: 'ignore_index' must be an integer outside [0, {k}) "
                                 f"(the {k} class indices), got {ignore!r}")
        palette = d.get("palette")
        if palette is not None:
            if not isinstance(palette, list) or len(palette) != k:
                raise LinvisionError(f"{source}: 'palette' must list {k} [r, g, b] colours (one per class), "
                                     f"got {len(palette) if isinstance(palette, list) else palette!r:.80}")
            palette = [_color(c, f"{source}: palette[{i}]") for i, c in enumerate(palette)]
            if len(set(palette)) != k:
                raise LinvisionError(f"{source}: 'palette' has repeated colours")
        ignore_color = d.get("ignore_color")
        if ignore_color is not None:
            ignore_color = _color(ignore_color, f"{source}: ignore_color")
            if palette and ignore_color in palette:
                raise LinvisionError(f"{source}: ignore_color {list(ignore_color)} is also a class colour")
        return cls(list(classes), palette, ignore, ignore_color, source)


def _color(c: Any, what: str) -> tuple[int, int, int]:
    if (not isinstance(c, (list, tuple)) or len(c) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)):
        raise LinvisionError(f"{what} must be [r, g, b] with integers 0-255, got {c!r:.40}")
    return tuple(c)


def resolve_seg_root(path: str | Path) -> Path:
    """Data-set root (folder with ``train/``, ``val/`` or ``test/``) of a folder or archive; see
    :func:`linvision.data.resolve_data_root`.

    Raises:
        LinvisionError: ``path`` is missing, not a folder/archive, or holds no split folder.
    """
    if path is None:
        raise LinvisionError("segmentation needs --data: a folder or .tar.gz with {train,val,test}/{images,masks}/")
    return resolve_data_root(path)


def seg_split_dir(root: str | Path, split: str) -> Path:
    """Folder of a split: ``"train"``, ``"val"`` (or ``validation``/``valid``), ``"test"``, or ``"eval"`` (``test``,
    else ``val``).

    Raises:
        LinvisionError: unknown split name or no such folder.
    """
    if split not in SPLIT_NAMES:
        raise LinvisionError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_NAMES)}")
    for n in SPLIT_NAMES[split]:
        if (Path(root) / n).is_dir():
            return Path(root) / n
    raise LinvisionError(f"no {' or '.join(n + '/' for n in SPLIT_NAMES[split])} split folder in {root}")


def _files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(os.listdir(folder)):
        p = folder / f
        if f.startswith(".") or not f.lower().endswith(exts) or not p.is_file():
            continue
        stem = os.path.splitext(f)[0]
        if stem in out:
            raise LinvisionError(f"two files named {stem}.* in {folder}: {out[stem].name} and {f}")
        out[stem] = p
    return out


def _pairs(split: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` path pairs of one split folder, matched by file name without extension."""
    img_dir, mask_dir = split / "images", split / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise LinvisionError(f"no {d.name}/ folder in {split}; expected {split}/images/<name>.<ext> + "
                                 f"{split}/masks/<name>.png")
    images, masks = _files(img_dir, IMG_EXTENSIONS), _files(mask_dir, (".png",))
    if not images and not masks:
        raise LinvisionError(f"empty split {split}: no images in {img_dir} and no .png masks in {mask_dir}")
    if extra := sorted(set(images) - set(masks)):
        raise LinvisionError(f"image {images[extra[0]]} has no mask {mask_dir / (extra[0] + '.png')}"
                             + (f" ({len(extra) - 1} more images without masks)" if len(extra) > 1 else ""))
    if extra := sorted(set(masks) - set(images)):
        raise LinvisionError(f"mask {masks[extra[0]]} has no image {img_dir / (extra[0] + '.*')}"
                             + (f" ({len(extra) - 1} more masks without images)" if len(extra) > 1 else ""))
    return [(images[k], masks[k]) for k in sorted(images)]


def load_meta(root: str | Path, num_classes: int | None = None, ignore_index: int | None = None) -> SegMeta:
    """Label set of a data-set root: ``root/classes.json`` if present; else ``num_classes`` classes named
    ``class0``...; else K = 1 + the largest label other than ``ignore_index`` (default 255) found in the train
    split's masks (a full decode of them). ``ignore_index`` overrides the file's.

    Raises:
        LinvisionError: unreadable/bad ``classes.json``, or ``num_classes`` that disagrees with it.
    """
    f = Path(root) / META_FILE
    if f.is_file():
        try:
            d = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LinvisionError(f"cannot read {f}: {e}") from None
        if not isinstance(d, dict):
            raise LinvisionError(f"{f}: expected a JSON object with 'classes', got {type(d).__name__}")
        if ignore_index is not None:
            d = {**d, "ignore_index": ignore_index}
        meta = SegMeta.from_dict(d, str(f))
        if num_classes is not None and num_classes != meta.num_classes:
            raise LinvisionError(f"num_classes {num_classes} disagrees with the {meta.num_classes} classes of {f}")
        return meta
    ignore = DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index
    if num_classes is None:
        top = -1
        for _, m in _pairs(seg_split_dir(root, "train")):
            a = read_mask(m)
            a = a[a != ignore]
            top = max(top, int(a.max()) if a.size else -1)
        if top < 0:
            raise LinvisionError(f"no labelled pixel in the train masks of {root}: all are ignore_index {ignore}")
        num_classes = top + 1
    return SegMeta.from_dict({"classes": [f"class{i}" for i in range(num_classes)], "ignore_index": ignore},
                             f"{root} (no {META_FILE})")


def read_mask(path: str | Path, meta: SegMeta | None = None) -> np.ndarray:
    """Decode a mask PNG into class indices ``[H, W]`` (uint8 or int32). Index masks (L, P, I, I;16) are taken
    as they are; colour masks (RGB/RGBA, alpha dropped) are mapped through ``meta.palette`` (and
    ``meta.ignore_color`` → ``meta.ignore_index``).

    Raises:
        LinvisionError: a colour mask without a palette, a colour not in the palette, an unsupported mode.
        OSError / ValueError / SyntaxError: the file cannot be decoded.
    """
    with Image.open(path) as im:
        mode = im.mode
        if mode not in INDEX_MODES + COLOR_MODES:
            raise LinvisionError(f"mask {path} has unsupported image mode {mode}; expected 8/16-bit grayscale or "
                                 "palette PNG (pixel = class index) or RGB with a palette in classes.json")
        a = np.array(im.convert("RGB") if mode == "RGBA" else im)  # a writable copy
    if mode in INDEX_MODES:
        return a.astype(np.int32) if a.dtype.itemsize > 1 or a.dtype == bool else a
    if meta is None or not meta.palette:
        raise LinvisionError(f"mask {path} is an RGB colour mask but no palette maps colours to classes; add "
                             f"'palette' to {META_FILE} or save masks as 8-bit class indices")
    colours = list(meta.palette) + ([meta.ignore_color] if meta.ignore_color else [])
    labels = np.array(list(range(len(meta.palette))) + ([meta.ignore_index] if meta.ignore_color else []), np.int32)
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
    order = np.argsort(codes)
    codes, labels = codes[order], labels[order]
    px = (a[..., 0].astype(np.int64) << 16) | (a[..., 1].astype(np.int64) << 8) | a[..., 2]
    pos = np.clip(np.searchsorted(codes, px), 0, len(codes) - 1)
    if not (hit := codes[pos] == px).all():
        y, x = np.argwhere(~hit)[0]
        raise LinvisionError(f"mask {path} has colour {a[y, x].tolist()} at (y={y}, x={x}) that is not in the "
                             f"palette of {meta.source or META_FILE}")
    out = labels[pos]
    return out.astype(np.uint8) if out.max(initial=0) <= 255 else out


def _check_values(a: np.ndarray, path: Path, meta: SegMeta) -> None:
    bad = ((a >= meta.num_classes) & (a != meta.ignore_index)) | (a < 0)
    if bad.any():
        vals = np.unique(a[bad])
        more = f" (and {len(vals) - 1} more)" if len(vals) > 1 else ""
        raise LinvisionError(f"mask {path} has value {int(vals[0])}{more} outside the {meta.num_classes} classes [0, {meta.num_classes}) and not the "
                             f"ignore_index {meta.ignore_index}")


class SegmentationDataset(Dataset):
    """Image/mask pairs of one split: ``root/<split>/images/<name>.<ext>`` with ``root/<split>/masks/<name>.png``.

    ``dataset[i]`` → ``transform(image, mask)``: with a transform from
    :func:`linvision.segmentation.build_seg_transform`, ``(image [3, H, W] float32 normalized, mask [H, W] int64)``;
    without one, ``(PIL RGB image, mask [H, W] int64 tensor)``. ``dataset[(i, seed)]`` runs the transform with all
    RNGs seeded by ``seed`` (the pairs :class:`linvision.data.SeededSampler` yields), so augmentation does not
    depend on the number of workers or on resuming. An undecodable image or mask gives ``None`` (one warning).

    Args:
        root: data-set folder or archive (see :func:`resolve_seg_root`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"eval"`` (test, else val).
        transform: callable ``(PIL image, Mask tensor [H, W]) -> (image, mask)``.
        meta: label set (e.g. the train split's or a checkpoint's); default :func:`load_meta` of the root.

    Attributes: ``root``, ``split_dir``, ``samples`` (list of ``(image_path, mask_path)``), ``meta``, ``classes``,
    ``num_classes``, ``ignore_index``, ``palette``.

    Raises:
        LinvisionError: see the module docstring (checks at build time).
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None, *,
                 meta: SegMeta | None = None):
        self.root = resolve_seg_root(root)
        self.split_dir = seg_split_dir(self.root, split)
        self.meta = meta or load_meta(self.root)
        self.samples = _pairs(self.split_dir)
        self.transform = transform
        self._reported: set[str] = set()
        for img, mask in self.samples:
            self._check_header(img, mask)

    def _check_header(self, img: Path, mask: Path) -> None:
        try:
            with Image.open(img) as im:
                isize = im.size
                # EXIF orientation from headers only (a PNG's eXIf chunk may follow the pixels: checked at load)
                orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP") else 1
            with Image.open(mask) as m:
                msize, mmode = m.size, m.mode
        except IMAGE_ERRORS:
            return  # reported (and skipped) when loaded
        if orientation in (5, 6, 7, 8):  # load_rgb applies EXIF rotation: width and height swap
            isize = isize[::-1]
        if msize != isize:
            raise LinvisionError(f"mask {mask} is {msize[0]}x{msize[1]} (WxH) but its image {img} is "
                                 f"{isize[0]}x{isize[1]}")
        if mmode in COLOR_MODES and not self.meta.palette:
            raise LinvisionError(f"mask {mask} is an {mmode} colour mask but no palette maps colours to classes; "
                                 f"add 'palette' to {self.root / META_FILE} or save masks as 8-bit class indices")

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def ignore_index(self) -> int:
        return self.meta.ignore_index

    @property
    def palette(self) -> list[tuple[int, int, int]] | None:
        return self.meta.palette

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, torch.Tensor] | None:
        """Raw sample: ``(PIL RGB image, mask [H, W] uint8/int32 tensor)``, value-checked; ``None`` if undecodable."""
        img_path, mask_path = self.samples[index]
        try:
            img, mask = load_rgb(img_path), read_mask(mask_path, self.meta)
        except IMAGE_ERRORS as e:
            if str(img_path) not in self._reported:
                self._reported.add(str(img_path))
                warnings.warn(f"skipping unreadable sample {img_path} / {mask_path}: {e}", stacklevel=2)
            return None
        _check_values(mask, mask_path, self.meta)
        if mask.shape != (img.height, img.width):  # e.g. EXIF orientation the header check could not see
            raise LinvisionError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                                 f"{img_path} is {img.width}x{img.height}")
        return img, torch.from_numpy(mask)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, Any] | None:
        index, seed = index if isinstance(index, tuple) else (index, None)
        sample = self.load(index)
        if sample is None:
            return None
        if self.transform is None:
            return sample[0], sample[1].long()
        if seed is None:
            return self.transform(*sample)
        with _seeded(seed):
            return self.transform(*sample)

    def check_masks(self) -> None:
        """Decode every mask and check its values (full scan; :meth:`load` checks one sample at a time).

        Raises:
            LinvisionError: the first bad mask, naming it and the value.
        """
        for _, mask_path in self.samples:
            try:
                a = read_mask(mask_path, self.meta)
            except IMAGE_ERRORS:
                continue
            _check_values(a, mask_path, self.meta)
