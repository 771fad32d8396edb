"""Segmentation data: the image/mask layout, classes.json, bad-input errors, joint augmentation, loaders, CamVid."""
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from linvision.errors import LinvisionError
from linvision.segmentation import (SegCollate, SegMeta, SegmentationDataset, build_seg_loaders, build_seg_transform,
                                    load_meta, read_mask)

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid.tar.gz"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def write_pair(split: Path, name: str, mask: np.ndarray, img_size=None, seed=0, ext=".png", mode=None):
    """An image (random RGB, lossless PNG unless ``ext``) and its mask ``mask`` (uint8 [H, W] or RGB [H, W, 3])."""
    (split / "images").mkdir(parents=True, exist_ok=True)
    (split / "masks").mkdir(parents=True, exist_ok=True)
    h, w = img_size or mask.shape[:2]
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(split / "images" / f"{name}{ext}")
    Image.fromarray(mask, mode).save(split / "masks" / f"{name}.png")


def make_seg(root: Path, n=(3, 2, 2), size=(12, 16), k=3, ignore=255, meta=True, seed=0, **meta_extra) -> Path:
    """``root/{train,val,test}`` with n[i] random masks of ``k`` classes (+ a few ignore pixels)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), n):
        for i in range(count):
            m = rng.integers(0, k, size, dtype=np.uint8)
            m[0, :3] = ignore
            m[-1, -1] = k - 1  # every class present in the train split's maximum
            write_pair(root / split, f"{split}{i:02d}", m, seed=i)
    if meta:
        (root / "classes.json").write_text(json.dumps(
            {"classes": [f"c{j}" for j in range(k)], "ignore_index": ignore, **meta_extra}))
    return root


@pytest.fixture
def seg_root(tmp_path):
    return make_seg(tmp_path / "seg")


# ----------------------------------------------------------------------------------------------- valid data sets
def test_dataset_reads_pairs_and_eval_transform_only_normalizes(seg_root):
    ds = SegmentationDataset(seg_root, "val", build_seg_transform(False))
    assert len(ds) == 2 and ds.num_classes == 3 and ds.ignore_index == 255 and ds.classes == ["c0", "c1", "c2"]
    img, mask = ds[1]
    assert img.shape == (3, 12, 16) and img.dtype == torch.float32 and mask.shape == (12, 16)
    assert mask.dtype == torch.int64
    ref_mask = torch.from_numpy(np.array(Image.open(seg_root / "val/masks/val01.png"))).long()
    ref_img = torch.from_numpy(np.array(Image.open(seg_root / "val/images/val01.png"))).permute(2, 0, 1) / 255
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(img, (ref_img - MEAN) / STD)
    raw_img, raw_mask = SegmentationDataset(seg_root, "val")[1]  # no transform: PIL image + int64 mask
    assert raw_img.size == (16, 12) and torch.equal(raw_mask, ref_mask)


def test_split_names_and_archive(seg_root, tmp_path):
    assert SegmentationDataset(seg_root, "eval").split_dir.name == "test"
    arc = tmp_path / "seg.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(seg_root, arcname="seg")
    ds = SegmentationDataset(arc, "train")
    assert len(ds) == 3 and ds.classes == ["c0", "c1", "c2"]
    with pytest.raises(LinvisionError, match="unknown split 'dev'"):
        SegmentationDataset(seg_root, "dev")


def test_num_classes_inferred_from_train_masks_without_classes_json(tmp_path):
    root = make_seg(tmp_path / "s", k=5, meta=False)
    meta = load_meta(root)
    assert meta.num_classes == 5 and meta.ignore_index == 255 and meta.classes[4] == "class4"
    assert load_meta(root, num_classes=7).num_classes == 7
    assert SegMeta.from_dict(meta.to_dict()) == meta


def test_jpeg_images_and_palette_png_masks(tmp_path):
    root = tmp_path / "s"
    m = np.array([[0, 1], [2, 255]], np.uint8).repeat(4, 0).repeat(4, 1)
    p = Image.fromarray(m, "P")
    p.putpalette([10, 20, 30] * 256)
    (root / "train/images").mkdir(parents=True), (root / "train/masks").mkdir(parents=True)
    p.save(root / "train/masks/a.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "train/images/a.jpg")
    (root / "classes.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    assert torch.equal(SegmentationDataset(root, "train")[0][1], torch.from_numpy(m).long())


# ----------------------------------------------------------------------------------------------- bad input
def test_mask_size_differs_from_image_fails_at_build(seg_root):
    write_pair(seg_root / "train", "odd", np.zeros((12, 16), np.uint8), img_size=(12, 17))
    with pytest.raises(LinvisionError, match=r"mask .*odd\.png is 16x12 \(WxH\) but its image .*odd\.png is 17x12"):
        SegmentationDataset(seg_root, "train")


def test_mask_value_out_of_range_fails_at_load(seg_root):
    m = np.zeros((12, 16), np.uint8)
    m[3, 4], m[5, 5] = 7, 255  # 7 ≥ 3 classes; 255 is the ignore index (fine)
    write_pair(seg_root / "train", "zz_bad", m)
    ds = SegmentationDataset(seg_root, "train")  # headers only: builds
    ds[0]
    msg = r"mask .*zz_bad\.png has value 7 outside the 3 classes \[0, 3\) and not the ignore_index 255"
    with pytest.raises(LinvisionError, match=msg):
        ds[len(ds) - 1]
    with pytest.raises(LinvisionError, match=msg):
        ds.check_masks()
    assert str(pytest.raises(LinvisionError, ds.check_masks).value).count("\n") == 0


def test_image_without_mask_and_mask_without_image(seg_root):
    Image.new("RGB", (16, 12)).save(seg_root / "val/images/lonely.jpg")
    with pytest.raises(LinvisionError, match=r"image .*val/images/lonely\.jpg has no mask .*val/masks/lonely\.png"):
        SegmentationDataset(seg_root, "val")
    (seg_root / "val/images/lonely.jpg").unlink()
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(seg_root / "val/masks/orphan.png")
    with pytest.raises(LinvisionError, match=r"mask .*val/masks/orphan\.png has no image"):
        SegmentationDataset(seg_root, "val")


def test_empty_or_missing_split(seg_root):
    for f in (seg_root / "test/images").iterdir():
        f.unlink()
    for f in (seg_root / "test/masks").iterdir():
        f.unlink()
    with pytest.raises(LinvisionError, match=r"empty split .*test"):
        SegmentationDataset(seg_root, "test")
    (seg_root / "val/masks").rename(seg_root / "val/labels")
    with pytest.raises(LinvisionError, match=r"no masks/ folder in .*val"):
        SegmentationDataset(seg_root, "val")


def test_rgb_mask_needs_a_palette_and_is_mapped_through_it(tmp_path):
    root = make_seg(tmp_path / "s", n=(1, 0, 0))
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    rgb = np.zeros((12, 16, 3), np.uint8)
    labels = np.zeros((12, 16), np.int64)
    for k, c in enumerate(palette):
        rgb[:, 4 * k:4 * k + 4] = c
        labels[:, 4 * k:4 * k + 4] = k
    rgb[:, 12:] = (7, 7, 7)  # ignore colour
    labels[:, 12:] = 255
    write_pair(root / "train", "rgb", rgb)
    with pytest.raises(LinvisionError, match=r"mask .*rgb\.png is an RGB colour mask but no palette"):
        SegmentationDataset(root, "train")
    (root / "classes.json").write_text(json.dumps(
        {"classes": ["r", "g", "b"], "palette": palette, "ignore_color": [7, 7, 7]}))
    ds = SegmentationDataset(root, "train")
    i = [p[1].name for p in ds.samples].index("rgb.png")
    assert torch.equal(ds[i][1], torch.from_numpy(labels))
    rgb[2, 13] = (1, 2, 3)
    write_pair(root / "train", "rgb", rgb)
    with pytest.raises(LinvisionError, match=r"mask .*rgb\.png has colour \[1, 2, 3\] at \(y=2, x=13\) that is not "
                                             r"in the palette"):
        ds[i]


@pytest.mark.parametrize("meta, match", [
    ({"classes": ["a", "b"], "palette": [[0, 0, 0]]}, "'palette' must list 2"),
    ({"classes": ["a", "b"], "ignore_index": 1}, r"'ignore_index' must be an integer outside \[0, 2\)"),
    ({"classes": []}, "'classes' must be a non-empty list"),
    ({"classes": ["a"], "palette": [[0, 0, 300]]}, r"palette\[0\] must be \[r, g, b\]"),
])
def test_bad_classes_json(tmp_path, meta, match):
    root = make_seg(tmp_path / "s", n=(1, 0, 0), meta=False)
    (root / "classes.json").write_text(json.dumps(meta))
    with pytest.raises(LinvisionError, match=r"classes\.json: " + match):
        SegmentationDataset(root, "train")


def test_unreadable_sample_is_skipped_with_a_warning(seg_root):
    (seg_root / "val/images/val00.png").write_bytes(b"not a png")
    ds = SegmentationDataset(seg_root, "val", build_seg_transform(False))
    with pytest.warns(UserWarning, match="skipping unreadable sample"):
        assert ds[0] is None
    img, mask = SegCollate(255)([ds[0], ds[1]])
    assert img.shape == (1, 3, 12, 16) and mask.shape == (1, 12, 16)


# ----------------------------------------------------------------------------------------------- augmentation
def blocky(h=40, w=60):
    """Mask of big blocks (labels 0, 3, 7: not consecutive) and an image whose red channel encodes the label."""
    m = np.zeros((h, w), np.uint8)
    m[:, w // 3:] = 3
    m[h // 2:, 2 * w // 3:] = 7
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = m * 30
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None]  # makes a flip visible
    return Image.fromarray(img), torch.from_numpy(m)


def test_train_transform_keeps_image_and_mask_aligned_and_labels_intact():
    img, mask = blocky(50, 75)
    tf = build_seg_transform(True, (32, 48), scale_range=(0.5, 2.0), ignore_index=255)
    flips = 0
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = tf(img, mask)
        assert x.shape == (3, 32, 48) and y.shape == (32, 48) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 3, 7, 255}  # nearest: no blended labels after resize
        red = ((x * STD + MEAN)[0] * 255).round()
        valid = y != 255
        # away from block edges (where the bilinear image blends and the nearest mask cannot) they must agree
        yf = y[None, None].float()
        interior = (F.max_pool2d(yf, 5, 1, 2) == -F.max_pool2d(-yf, 5, 1, 2))[0, 0] & valid
        assert interior.sum() > 0.3 * valid.sum()
        assert ((red[interior] - y[interior] * 30).abs() <= 2).all()
        # padding: image 0 (i.e. -mean/std after normalization), mask ignore_index
        pad = ~valid
        torch.testing.assert_close(x[:, pad], (-MEAN / STD).expand(3, 32, 48)[:, pad])
        green = (x * STD + MEAN)[1]  # grows left to right in the original: falls after a flip
        both = valid[:, 1:] & valid[:, :-1]
        flips += int((green[:, 1:] - green[:, :-1])[both].mean() < 0)
    assert 0 < flips < 12


def test_rescale_range_and_padding_with_large_crop():
    img, mask = blocky(20, 30)
    tf = build_seg_transform(True, (64, 64), scale_range=(1.0, 1.0), base_size=10, hflip=0.0, ignore_index=99)
    x, y = tf(img, mask)
    # shorter side 20 → 10: 10x15 of labels inside a 64x64 crop, the rest ignore (99) and image 0
    assert (y != 99).sum() == 10 * 15 and x.shape == (3, 64, 64)
    assert set(y.unique().tolist()) <= {0, 3, 7, 99}


def test_ignore_index_beyond_uint8_pads_correctly():
    img, mask = blocky(8, 8)
    _, y = build_seg_transform(True, 12, scale_range=(1, 1), ignore_index=300)(img, mask)
    assert (y == 300).sum() == 12 * 12 - 64


def test_eval_transform_keeps_any_size():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8))
    x, y = build_seg_transform(False)(img, torch.zeros(13, 17, dtype=torch.uint8))
    assert x.shape == (3, 13, 17) and y.shape == (13, 17)


def test_seeded_samples_are_reproducible_and_leave_global_rngs_alone(seg_root):
    ds = SegmentationDataset(seg_root, "train", build_seg_transform(True, 8, scale_range=(0.5, 1.5)))
    torch.manual_seed(123)
    random.seed(5)
    before = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(5)
    a, b = ds[(1, 42)], ds[(1, 42)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (torch.rand(1), random.random()) == before
    outs = [ds[(1, s)][0] for s in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ----------------------------------------------------------------------------------------------- loaders
def test_loaders_batch_shapes_and_seeded_sampler(seg_root):
    train, ev, meta = build_seg_loaders(seg_root, 2, (8, 8), num_workers=0, seed=3)
    assert meta.num_classes == 3 and ev.dataset.split_dir.name == "val"
    train.sampler.set_epoch(0)
    (x, y), = list(train)  # 3 images, batch 2: the incomplete last batch is dropped
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 8, 8)
    train.sampler.set_epoch(0)
    (x2, y2), = list(train)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = next(iter(ev))
    assert x.shape == (1, 3, 12, 16)


def test_worker_processes_give_the_same_batches(seg_root):
    def batches(workers):
        train, _, _ = build_seg_loaders(seg_root, 1, (8, 8), num_workers=workers, seed=1)
        train.sampler.set_epoch(2)
        return list(train)
    for (x0, y0), (x1, y1) in zip(batches(0), batches(1), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_collate_pads_mixed_sizes_with_ignore_index():
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long))
    x, y = SegCollate(255)([a, None, b])
    assert x.shape == (2, 3, 6, 5) and y.shape == (2, 6, 5)
    assert (y[0, 4:] == 255).all() and (y[1, :, 3:] == 255).all() and (x[0, :, 4:] == 0).all()
    assert SegCollate(255)([None]) is None


# ----------------------------------------------------------------------------------------------- CamVid
@pytest.mark.skipif(not CAMVID.exists(), reason="../shared/data/camvid.tar.gz not present on this machine")
def test_camvid_archive():
    splits = {s: SegmentationDataset(CAMVID, s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 367, "val": 101, "test": 233}
    ds = splits["test"]
    assert ds.num_classes == 11 and ds.ignore_index == 11 and ds.classes[0] == "sky" and len(ds.palette) == 11
    ds.transform = build_seg_transform(False)
    img, mask = ds[0]
    assert img.shape == (3, 360, 480) and mask.shape == (360, 480) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(range(12))
    assert read_mask(ds.samples[0][1]).shape == (360, 480)


def test_exif_rotated_jpeg_matches_its_rotated_mask(tmp_path):
    root = make_seg(tmp_path / "s", n=(1, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: the 16x12 stored image is shown 12x16
    Image.new("RGB", (16, 12)).save(root / "train/images/rot.jpg", exif=exif)
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(root / "train/masks/rot.png")
    ds = SegmentationDataset(root, "train")
    i = [p[1].name for p in ds.samples].index("rot.png")
    img, mask = ds[i]
    assert img.size == (12, 16) and mask.shape == (16, 12)
