"""Image-folder data: locating/extracting data sets, a PIL-based data set class, transforms and loaders.

A data set is a folder ``ROOT/train/<class>/<image>`` plus ``ROOT/test/<class>/<image>`` (or ``val/``), a folder
holding exactly one such ``ROOT``, or a ``.tar``/``.tar.gz``/``.tgz`` archive of either (extracted once into a
cache). ``None`` means the CIFAR-10 subset embedded in the package (500 train + 100 test images per class).

Determinism: the training sampler hands the data set ``(index, seed)`` pairs drawn from ``(seed, epoch)``, and each
sample's augmentation runs under its own seed, so an epoch's batches do not depend on the number of workers or on
whether training was resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import tarfile
import tempfile
import time
import warnings
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from .errors import LinvisionError
from .decode_limits import DeclaredSizeError, check_declared_size, set_max_pixels  # noqa: E402,F401

__all__ = [
    "IMG_EXTENSIONS", "IMAGE_ERRORS", "EMBEDDED_ARCHIVE", "ImageFolder", "SeededSampler", "resolve_data_root",
    "split_dir", "extract_archive", "cache_dir", "load_rgb", "to_rgb", "check_declared_size", "set_max_pixels",
    "DeclaredSizeError", "is_small_image_dataset", "build_transforms",
    "build_train_loader", "build_eval_loader", "build_loaders", "collate_skip_none", "default_workers",
    "stratified_subset", "holdout_split", "validation_split_dir",
]

_log = logging.getLogger("linvision")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
EVAL_SPLITS = ("test", "val", "validation", "valid")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
EMBEDDED_ARCHIVE = "cifar10_subset.tar.gz"
SMALL_IMAGE_MAX = 64  # data sets whose images are at most this many pixels a side get the CIFAR-style recipe
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # UnidentifiedImageError is OSError


# --------------------------------------------------------------------------------------------------- locating data
def cache_dir() -> Path:
    """Folder for extracted archives: ``$LINVISION_CACHE/datasets`` or ``~/.cache/linvision/datasets``
    (``$XDG_CACHE_HOME`` honoured)."""
    env = os.environ.get("LINVISION_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "linvision"
    return base.expanduser() / "datasets"


def _strip_archive_suffix(name: str) -> str:
    return next((name[: -len(s)] for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)), name)


# caps on what one archive may expand to (raise them with these environment variables)
MAX_EXTRACT_BYTES = int(float(os.environ.get("LINVISION_MAX_EXTRACT_GB", "200")) * 2 ** 30)
MAX_EXTRACT_FILES = int(os.environ.get("LINVISION_MAX_EXTRACT_FILES", "5000000"))


def archive_digest(archive: Path) -> str:
    """SHA-256 of the archive's bytes (the cache key). Memoized in ``cache_dir()/.digests.json`` under the file's
    path, size, mtime, ctime and inode: replacing the file (even with the same size and mtime) changes its ctime
    or inode, so its content is hashed again."""
    st = archive.stat()
    ident = f"{archive}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_dev}|{st.st_ino}"
    memo_file = cache_dir() / ".digests.json"
    try:
        memo = json.loads(memo_file.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(ident), str):
        return memo[ident]
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{archive}|")}  # one entry per path
    memo[ident] = digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests.", dir=memo_file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_file)
    except OSError:
        pass  # only a memo
    return digest


def _check_members(tf: tarfile.TarFile, archive: Path) -> None:
    size = count = 0
    for m in tf:
        count += 1
        size += max(m.size, 0) if m.isfile() else 0
        if count > MAX_EXTRACT_FILES or size > MAX_EXTRACT_BYTES:
            what = (f"more than {MAX_EXTRACT_FILES} files" if count > MAX_EXTRACT_FILES else
                    f"more than {MAX_EXTRACT_BYTES / 2 ** 30:.4g} GiB")
            raise LinvisionError(f"archive {archive} expands to {what}; refused (raise LINVISION_MAX_EXTRACT_FILES / "
                                 "LINVISION_MAX_EXTRACT_GB if this is intended, or extract it yourself)")


def extract_archive(archive: str | Path) -> Path:
    """Extract a tar archive once into ``cache_dir()/<name>-<hash>`` and return that folder.

    The hash is the SHA-256 of the archive's content (:func:`archive_digest`), so an archive replaced by another
    is extracted afresh even with the same path, size and mtime. The members are listed first: an archive
    expanding to more than ``MAX_EXTRACT_FILES`` files or ``MAX_EXTRACT_BYTES`` bytes is refused
    (``$LINVISION_MAX_EXTRACT_FILES`` / ``$LINVISION_MAX_EXTRACT_GB``). Extraction goes to a temporary sibling
    folder that is renamed into place only when complete, so an interrupted extraction never leaves a half-filled
    cache. Members are extracted with tarfile's ``data`` filter (no absolute paths, no ``..``, no device files).

    Raises:
        LinvisionError: the archive is missing, corrupt, over the caps or cannot be extracted.
    """
    archive = Path(archive).expanduser().resolve()
    try:
        key = archive_digest(archive)[:16]
    except OSError as e:
        raise LinvisionError(f"cannot read archive {archive}: {e.strerror or e}") from None
    dest = cache_dir() / f"{_strip_archive_suffix(archive.name)}-{key}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*.partial"):  # left by a killed extraction over an hour ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    _log.info("extracting %s to %s (once)", archive, dest)
    try:
        with tarfile.open(archive, "r:*") as tf:
            _check_members(tf, archive)
            tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a lost race with a concurrent extraction of the same archive
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise LinvisionError(f"cannot extract archive {archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _has_split(d: Path) -> bool:
    return any((d / s).is_dir() for s in ("train",) + EVAL_SPLITS)


def resolve_data_root(path: str | Path | None) -> Path:
    """Return the folder holding the ``train/`` and ``test/`` (or ``val/``) splits of a data set.

    Args:
        path: ``None`` for the embedded CIFAR-10 subset; a data-set folder; a folder containing exactly one
            data-set folder (e.g. an archive's top-level ``cifar10/``); or a ``.tar``/``.tar.gz``/``.tgz``
            archive of either, extracted once into :func:`cache_dir`.

    Raises:
        LinvisionError: the path does not exist, is not a folder or archive, or holds no split folder.
    """
    p = Path(str(resources.files("linvision") / "data" / EMBEDDED_ARCHIVE)) if path is None else Path(path).expanduser()
    if not p.exists():
        raise LinvisionError(f"data path does not exist: {p}")
    if p.is_file():
        if not p.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise LinvisionError(f"data path {p} is neither a folder nor a .tar/.tar.gz/.tgz archive")
        p = extract_archive(p)
    if _has_split(p):
        return p
    subs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
    if len(subs) == 1 and _has_split(subs[0]):
        return subs[0]
    raise LinvisionError(f"no train/ or test/ (or val/) split folder in {p}; expected {p}/train/<class>/<image>")


def split_dir(root: str | Path, split: str) -> Path:
    """Folder of one split: ``split="train"`` → ``root/train``; ``split="eval"`` → ``root/test`` (else ``val``);
    any other name → that folder (e.g. ``"val"`` when a data set has both ``test/`` and ``val/``).

    Raises:
        LinvisionError: no such folder.
    """
    names = ("train",) if split == "train" else EVAL_SPLITS if split == "eval" else (split,)
    for n in names:
        if (Path(root) / n).is_dir():
            return Path(root) / n
    raise LinvisionError(f"no {' or '.join(n + '/' for n in names)} split folder in {root}")


# --------------------------------------------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float images are rescaled (not clipped), images with alpha
    or palette transparency are composited onto white, CMYK/grayscale/palette/1-bit are converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        peak = 255.0 if img.mode == "F" and a.max(initial=0) > 1 else (1.0 if img.mode == "F" else 255.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            peak = 65535.0
        return Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully (EXIF orientation applied) and return it as 8-bit RGB.

    Raises:
        OSError / ValueError / SyntaxError / PIL.Image.DecompressionBombError: the file cannot be decoded
        (truncated, corrupt, not an image); :class:`DeclaredSizeError` (a ValueError): its declared size is refused
        before decoding (see :func:`check_declared_size`).
    """
    with Image.open(path) as im:
        check_declared_size(im, path)
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under fixed python/numpy/torch RNG seeds, restoring the caller's RNG states afterwards."""
    gen = torch.default_generator  # its methods skip the (slow) bookkeeping of torch.manual_seed
    states = random.getstate(), np.random.get_state(), gen.get_state()
    random.seed(seed), np.random.seed(seed % 2**32), gen.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0]), np.random.set_state(states[1]), gen.set_state(states[2])


class ImageFolder(Dataset):
    """Images in ``root/<class>/**/<image>``; classes are the sorted sub-folder names (or ``classes``).

    Files without an image extension (``IMG_EXTENSIONS``) are skipped with one warning and listed in
    ``skipped``; hidden files and folders are ignored. Images are decoded with PIL and converted to RGB
    (:func:`to_rgb`). An image that fails to decode at load time is reported once with a warning and yields
    ``None`` instead of a sample; :func:`collate_skip_none` drops those from the batch.

    ``dataset[i]`` → ``(transform(img), class_index)``; ``dataset[(i, seed)]`` runs the transform with all RNGs
    seeded by ``seed`` (see :class:`SeededSampler`).

    Args:
        root: split folder, e.g. ``ROOT/train``.
        transform: callable on a PIL RGB image, e.g. from :func:`build_transforms`; ``None`` returns the image.
        classes: fixed class list (e.g. a checkpoint's); folders not in it are an error, missing ones are fine.

    Raises:
        LinvisionError: root missing, no class folders, folders not in ``classes``, or no image files.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, classes: Sequence[str] | None = None):
        self.root = root = Path(root)
        if not root.is_dir():
            raise LinvisionError(f"image folder does not exist: {root}")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if classes is None:
            if not found:
                raise LinvisionError(f"no class folders in {root}; expected {root}/<class>/<image>")
            classes = found
        elif unknown := sorted(set(found) - set(classes)):
            raise LinvisionError(f"class folders {unknown} in {root} are not among the {len(classes)} known "
                                 f"classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        self.skipped: list[str] = []
        self.repeated: list[str] = []
        seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every folder walked: links cannot loop
        for c in found:
            for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in seen:  # a link back up (loop) or to a folder already walked
                    dirnames[:] = []
                    self.repeated.append(dirpath)
                    continue
                seen.add((st.st_dev, st.st_ino))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(f for f in filenames if not f.startswith(".")):
                    p = os.path.join(dirpath, f)
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((p, self.class_to_idx[c]))
                    else:
                        self.skipped.append(p)
        if self.repeated:
            warnings.warn(f"skipped {len(self.repeated)} folder(s) reached again through symbolic links (a loop or "
                          f"a second link to the same folder), e.g. {self.repeated[0]}", stacklevel=2)
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} non-image file(s) in {root}, e.g. {self.skipped[0]}",
                          stacklevel=2)
        if not self.samples:
            raise LinvisionError(f"no images ({'/'.join(e[1:] for e in IMG_EXTENSIONS[:4])}/...) in the "
                                 f"{len(found)} class folder(s) of {root}")
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, int] | None:
        index, seed = index if isinstance(index, tuple) else (index, None)
        path, target = self.samples[index]
        try:
            img = load_rgb(path)
        except IMAGE_ERRORS as e:
            if path not in self._reported:
                self._reported.add(path)
                warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None
        if self.transform is None:
            return img, target
        if seed is None:
            return self.transform(img), target
        with _seeded(seed):
            return self.transform(img), target


def collate_skip_none(batch: list) -> Any:
    """``default_collate`` after dropping ``None`` (unreadable) samples; ``None`` if nothing is left."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)`` for ``indices``, shuffled (optionally) by a generator seeded from
    ``(seed, epoch)``; call :meth:`set_epoch` before each epoch. Runs in the main process, so it works with
    persistent workers.

    Distributed (``num_replicas`` > 1), it follows ``torch.utils.data.DistributedSampler``: the epoch's list is
    padded by repeating its start to a multiple of ``num_replicas`` and rank ``r`` takes every
    ``num_replicas``-th pair from position ``r``. The order and the per-sample seeds do not depend on the number
    of replicas, so batch ``k`` of the ranks together holds exactly batch ``k`` of a single process whose batch is
    ``num_replicas`` times larger. ``set_epoch(epoch, start)`` skips the first ``start`` pairs of this rank's
    share (resuming inside an epoch); ``len()`` counts what is left.
    """

    def __init__(self, indices: Sequence[int], seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.indices, self.seed, self.shuffle, self.epoch = list(indices), seed, shuffle, 0
        self.num_replicas, self.rank, self.start = num_replicas, rank, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def num_samples(self) -> int:
        """Pairs per replica in a whole epoch (padding included)."""
        return -(-len(self.indices) // self.num_replicas)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.indices)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else range(n)
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()
        pairs = [(self.indices[i], s) for i, s in zip(order, seeds)]
        if self.num_replicas > 1 and pairs:
            total = self.num_samples * self.num_replicas
            pairs = (pairs * -(-total // n))[:total][self.rank::self.num_replicas]
        return iter(pairs[self.start:])


def stratified_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` samples spread as evenly as possible over classes (seeded choice within each class)."""
    rng, by_class = random.Random(seed), defaultdict(list)
    for i, t in enumerate(targets):
        by_class[t].append(i)
    for v in by_class.values():
        rng.shuffle(v)
    interleaved = [i for group in itertools.zip_longest(*by_class.values()) for i in group if i is not None]
    return sorted(interleaved[:n])


def validation_split_dir(root: str | Path) -> Path | None:
    """``root/val`` (or ``validation/``, ``valid/``) when the data set also has a ``test/`` split (which then stays
    the reported evaluation split), else ``None``."""
    if not (Path(root) / "test").is_dir():
        return None
    return next((Path(root) / n for n in EVAL_SPLITS[1:] if (Path(root) / n).is_dir()), None)


def holdout_split(targets: Sequence[int], holdout: float, seed: int = 0, *, what: str = "--holdout",
                  min_per_class: bool = False) -> tuple[list[int], list[int]]:
    """``(kept_indices, held_out_indices)`` of a training split: a class-balanced seeded hold-out of ``holdout``
    images (a fraction if < 1, else a count), the rest kept. With ``min_per_class`` a fraction holds out at least
    one image per class where every class keeps one for training. Used for the super-network's search split and
    for ``linvision train --val-split`` (model choice).

    Raises:
        LinvisionError: the hold-out would be empty or take every image (``what`` names the option).
    """
    n = int(round(holdout * len(targets))) if holdout < 1 else int(holdout)
    if min_per_class and holdout < 1:
        counts = [c for c in np.bincount(np.asarray(targets, dtype=np.int64)) if c > 0] if len(targets) else []
        if counts and min(counts) >= 2:
            n = max(n, len(counts))
    if not 0 < n < len(targets):
        raise LinvisionError(f"{what} {holdout} gives {n} of {len(targets)} training images; it must leave "
                             "both a held-out and a training part")
    held = stratified_subset(targets, n, seed)
    hs = set(held)
    return [i for i in range(len(targets)) if i not in hs], held


def is_small_image_dataset(root: str | Path, probe: int = 20) -> bool:
    """True if the first readable images of the train split (up to ``probe``, spread over classes) are all at most
    ``SMALL_IMAGE_MAX`` pixels a side (CIFAR-like data that should not be randomly resized-cropped)."""
    with warnings.catch_warnings():  # the loader built afterwards reports skipped files
        warnings.simplefilter("ignore")
        ds = ImageFolder(split_dir(root, "train"))
    for i in stratified_subset(ds.targets, probe):
        with contextlib.suppress(*IMAGE_ERRORS), Image.open(ds.samples[i][0]) as im:
            if max(im.size) > SMALL_IMAGE_MAX:
                return False
    return True


# --------------------------------------------------------------------------------------------------- transforms
def build_transforms(
    img_size: int,
    is_training: bool,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    *,
    small_images: bool = False,
    crop_pct: float | None = None,
    interpolation: str = "bicubic",
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    scale: tuple[float, float] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image → normalized float tensor ``[3, img_size, img_size]``.

    Training, ``small_images`` (CIFAR-like, ≤64 px): resize to ``img_size`` (a no-op at native size), random crop
    with reflect padding of ``img_size // 8`` (4 px at 32), horizontal flip (on the embedded subset this beat
    timm's random-resized crop with scale (0.35, 1): 45.8% vs 42.3% top-1 after 15 epochs of deit_tiny at 32 px
    patch 8), optional timm ``auto_augment``
    (e.g. ``"rand-m9-mstd0.5"``) and random erasing. Training, larger images: timm's ``create_transform``
    (random-resized crop with ``scale``, flip, color jitter, optional auto-augment / random erasing).
    Evaluation: timm resize to ``img_size / crop_pct`` + center crop (``crop_pct`` defaults to 1.0 for small
    images, i.e. identity at native size, and 0.875 otherwise).
    """
    if not is_training:
        crop_pct = crop_pct or (1.0 if small_images else 0.875)
        return create_transform(img_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                                std=tuple(std), crop_pct=crop_pct)
    if not small_images:
        return create_transform(img_size, is_training=True, scale=scale, interpolation=interpolation,
                                auto_augment=auto_augment, re_prob=re_prob, mean=tuple(mean), std=tuple(std))
    tfs = [T.Resize(img_size, interpolation=str_to_interp_mode(interpolation)), T.CenterCrop(img_size),
           T.RandomCrop(img_size, padding=max(1, img_size // 8), padding_mode="reflect"), T.RandomHorizontalFlip()]
    if auto_augment:
        from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
        hp = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        tfs.append(rand_augment_transform(auto_augment, hp) if auto_augment.startswith("rand")
                   else auto_augment_transform(auto_augment, hp))
    tfs += [T.ToTensor(), T.Normalize(mean, std)]
    if re_prob > 0:
        from timm.data.random_erasing import RandomErasing
        tfs.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    return T.Compose(tfs)


# --------------------------------------------------------------------------------------------------- loaders
def default_workers() -> int:
    """Default loader worker processes: ``min(2, cpu_count)``."""
    return min(2, os.cpu_count() or 1)


def _loader(ds: Dataset, batch_size: int, sampler: Any, num_workers: int | None, drop_last: bool, seed: int = 0):
    workers = default_workers() if num_workers is None else num_workers
    # Own generator: creating an iterator (workers' base seed) never draws from the global torch RNG, which then
    # depends only on the training loop (see engine.train) - not on the number of workers or on resuming.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skip_none, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed))


def build_train_loader(
    root: str | Path,
    data_config: dict,
    batch_size: int | Callable[[int], int],
    *,
    classes: Sequence[str] | None = None,
    num_workers: int | None = None,
    seed: int = 0,
    subset: int | None = None,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    scale: tuple[float, float] | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """Shuffled, augmented loader over ``root/train`` yielding ``(images [B,3,H,W] float, targets [B] int64)``
    (or ``None`` for an all-unreadable batch). ``loader.sampler`` is a :class:`SeededSampler`; call its
    ``set_epoch(e)`` each epoch. ``subset`` keeps a class-balanced seeded subset of that many images. The last
    incomplete batch is dropped when at least one full batch exists. With ``num_replicas`` > 1 (distributed
    training) this rank loads its share of every epoch, ``batch_size`` images per batch (the share is padded, so
    every rank takes the same number of steps). ``indices``: train on these images of the split only (e.g. the
    split minus a held-out part; ``subset`` is then drawn from them). ``batch_size`` may be a function of the
    number of training images (after ``indices`` and ``subset``), e.g. the recipe's default batch.

    ``data_config`` keys: ``input_size`` (C,H,W), ``mean``, ``std``, ``interpolation``, ``small_images``.
    """
    tf = build_transforms(data_config["input_size"][-1], True, data_config["mean"], data_config["std"],
                          small_images=data_config.get("small_images", False),
                          interpolation=data_config.get("interpolation", "bicubic"),
                          auto_augment=auto_augment, re_prob=re_prob, scale=scale)
    ds = ImageFolder(split_dir(root, "train"), tf, classes)
    idx = list(range(len(ds)) if indices is None else indices)
    if subset:
        idx = [idx[i] for i in stratified_subset([ds.targets[i] for i in idx], subset, seed)]
    sampler = SeededSampler(idx, seed, num_replicas=num_replicas, rank=rank)
    if callable(batch_size):
        batch_size = batch_size(len(idx))
    return _loader(ds, batch_size, sampler, num_workers, drop_last=sampler.num_samples >= batch_size, seed=seed)


def build_eval_loader(
    root: str | Path,
    data_config: dict,
    batch_size: int,
    *,
    classes: Sequence[str] | None = None,
    num_workers: int | None = None,
    split: str = "eval",
    num_replicas: int = 1,
    rank: int = 0,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """Ordered, non-augmented loader over the eval split (``test/`` or ``val/``) — or ``split="train"`` — using the
    eval transform of :func:`build_transforms` (``data_config`` also needs ``crop_pct``). With ``num_replicas`` > 1
    rank ``r`` loads images ``r, r + num_replicas, ...`` (no padding: every image is evaluated exactly once over
    all ranks; reduce the sums, as :func:`linvision.engine.evaluate` does with ``dist_info``). ``indices``: only
    these images of the split (e.g. a held-out part of ``train``)."""
    tf = build_transforms(data_config["input_size"][-1], False, data_config["mean"], data_config["std"],
                          small_images=data_config.get("small_images", False), crop_pct=data_config.get("crop_pct"),
                          interpolation=data_config.get("interpolation", "bicubic"))
    ds = ImageFolder(split_dir(root, split), tf, classes)
    if indices is None:
        sampler = range(rank, len(ds), num_replicas) if num_replicas > 1 else None
    else:
        sampler = list(indices)[rank::num_replicas]
    return _loader(ds, batch_size, sampler, num_workers, drop_last=False)


def build_loaders(
    root: str | Path,
    data_config: dict,
    batch_size: int,
    *,
    num_workers: int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    eval_batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    **train_kwargs,
) -> tuple[DataLoader, DataLoader, list[str]]:
    """``(train_loader, eval_loader, class_names)`` for a data-set root from :func:`resolve_data_root`; the eval
    split uses the train split's class list. Extra keyword arguments go to :func:`build_train_loader`;
    ``num_replicas``/``rank`` shard both loaders (distributed training)."""
    train = build_train_loader(root, data_config, batch_size, num_workers=num_workers, seed=seed,
                               subset=train_subset, num_replicas=num_replicas, rank=rank, **train_kwargs)
    classes = train.dataset.classes
    ev = build_eval_loader(root, data_config, eval_batch_size or batch_size, classes=classes, num_workers=num_workers,
                           num_replicas=num_replicas, rank=rank)
    return train, ev, classes
