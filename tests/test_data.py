"""Data sets: embedded subset, archives and their cache, folder layouts, image modes, bad files, errors."""
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset
from linvision import data as D
from linvision.errors import LinvisionError

CFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0, "interpolation": "bicubic",
       "small_images": True}


def test_embedded_subset():
    root = D.resolve_data_root(None)
    train, test = D.ImageFolder(D.split_dir(root, "train")), D.ImageFolder(D.split_dir(root, "eval"))
    assert len(train.classes) == 10 and train.classes == test.classes and "airplane" in train.classes
    assert (len(train), len(test)) == (5000, 1000)
    assert np.bincount(train.targets).tolist() == [500] * 10
    assert D.is_small_image_dataset(root)
    x, y = D.build_eval_loader(root, CFG, 16, num_workers=0).dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0


def _tar(src, dest, arcname, mode="w:gz"):
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=arcname)
    return dest


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_archive_is_extracted_once_into_cache(tiny_data, tmp_path, suffix, mode, monkeypatch):
    archive = _tar(tiny_data, tmp_path / f"tiny{suffix}", "tiny", mode)  # top-level folder, like cifar10/
    root = D.resolve_data_root(archive)
    assert root.name == "tiny" and root.parent.parent == D.cache_dir()
    assert D.ImageFolder(root / "train").classes == ["blue", "red"]
    assert not list(D.cache_dir().glob(".*.partial"))
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("archive extracted twice"))
    assert D.resolve_data_root(str(archive)) == root


def test_archive_without_top_folder(tiny_data, tmp_path):
    assert (D.resolve_data_root(_tar(tiny_data, tmp_path / "flat.tar.gz", ".")) / "test" / "red").is_dir()


def test_corrupt_archive_leaves_no_cache(tiny_data, tmp_path):
    good = _tar(tiny_data, tmp_path / "good.tar.gz", "tiny").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(LinvisionError, match="bad.tar.gz"):
        D.resolve_data_root(bad)
    assert not [p for p in D.cache_dir().iterdir() if p.name.startswith(("bad", ".bad"))]


def test_directory_layouts(tmp_path):
    direct = make_dataset(tmp_path / "a" / "ds")
    assert D.resolve_data_root(direct) == direct
    assert D.resolve_data_root(tmp_path / "a") == direct  # a folder holding exactly one data set
    make_dataset(tmp_path / "a" / "other")
    with pytest.raises(LinvisionError, match="no train/ or test/"):
        D.resolve_data_root(tmp_path / "a")
    (direct / "test").rename(direct / "val")
    assert D.split_dir(direct, "eval") == direct / "val"
    _, ev, classes = D.build_loaders(direct, CFG, 4, num_workers=0)
    assert classes == ["blue", "red"] and len(ev.dataset) == 8


def test_errors_name_the_path(tmp_path):
    with pytest.raises(LinvisionError, match="does not exist: .*nowhere"):
        D.resolve_data_root(tmp_path / "nowhere")
    with pytest.raises(LinvisionError, match="no train/ or test/"):
        D.resolve_data_root(tmp_path)  # empty folder
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LinvisionError, match="neither a folder nor"):
        D.resolve_data_root(tmp_path / "notes.txt")
    (tmp_path / "train").mkdir()
    with pytest.raises(LinvisionError, match="no class folders in .*train"):
        D.ImageFolder(D.split_dir(tmp_path, "train"))
    with pytest.raises(LinvisionError, match="no test/ or val/"):
        D.split_dir(tmp_path, "eval")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "readme.md").write_text("x")
    with pytest.warns(UserWarning, match="non-image"), pytest.raises(LinvisionError, match="no images"):
        D.ImageFolder(tmp_path / "train")


def test_unknown_class_folder_is_an_error(tiny_data):
    with pytest.raises(LinvisionError, match=r"\['red'\]"):
        D.ImageFolder(tiny_data / "test", classes=["blue", "cat"])
    assert D.ImageFolder(tiny_data / "test", classes=["blue", "green", "red"]).targets[-1] == 2


def test_non_image_files_skipped_with_warning(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "train" / "red" / "labels.csv").write_text("a,b")
    (root / "train" / "blue" / "notes.txt").write_text("x")
    (root / "train" / "blue" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored silently
    with pytest.warns(UserWarning, match="skipped 2 non-image"):
        ds = D.ImageFolder(root / "train")
    assert len(ds) == 16 and len(ds.skipped) == 2


def _modes():
    g = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    rgba = np.dstack([(g * 255).astype(np.uint8)] * 3 + [np.full((32, 32), 128, np.uint8)])
    return {
        "L.png": Image.fromarray((g * 255).astype(np.uint8), "L"),
        "RGBA.png": Image.fromarray(rgba, "RGBA"),
        "LA.png": Image.fromarray(rgba, "RGBA").convert("LA"),
        "CMYK.jpg": Image.new("CMYK", (32, 32), (0, 255, 255, 0)),
        "I16.png": Image.fromarray((g * 65535).astype(np.uint16)),
        "P.gif": Image.fromarray(rgba[..., :3]).convert("P"),
        "Ptrans.png": Image.fromarray(rgba[..., :3]).convert("P"),
        "1.bmp": Image.fromarray(g > 0.5),
        "F.tif": Image.fromarray(g.astype(np.float32), "F"),
    }


def test_any_mode_becomes_rgb(tmp_path):
    for name, img in _modes().items():
        kw = {"transparency": 0} if name == "Ptrans.png" else {}
        img.save(tmp_path / name, **kw)
        out = D.load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (32, 32), name
    assert np.asarray(D.load_rgb(tmp_path / "CMYK.jpg"))[0, 0, 0] > 200  # CMYK (0,255,255,0) is red
    sixteen = np.asarray(D.load_rgb(tmp_path / "I16.png"))[..., 0]
    assert sixteen.max() == 255 and 100 < sixteen[16, 0] < 160  # rescaled from 16 bit, not clipped
    assert 100 < np.asarray(D.load_rgb(tmp_path / "F.tif"))[16, 0, 0] < 160
    white_bg = np.asarray(D.load_rgb(tmp_path / "RGBA.png"))[0, 0]  # black at alpha 0.5 over white
    assert (120 < white_bg).all() and (white_bg < 135).all()


def test_corrupt_image_skipped_at_load_time(tmp_path):
    root = make_dataset(tmp_path / "ds", n_train=3)
    jpg = root / "train" / "red" / "000.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated JPEG
    (root / "train" / "red" / "001.jpg").write_bytes(b"not really a jpeg")
    ds = D.build_train_loader(root, CFG, 4, num_workers=0).dataset
    with pytest.warns(UserWarning, match="unreadable image .*000.jpg"):
        assert ds[ds.samples.index((str(jpg), 1))] is None
    loader = D.build_train_loader(root, CFG, 6, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [b for b in loader]
    assert sum(len(b[1]) for b in batches if b is not None) == 4  # 6 images, 2 unreadable
    assert D.collate_skip_none([None, None]) is None


def test_transforms():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ev = D.build_transforms(32, False, CFG["mean"], CFG["std"], small_images=True)(img)
    ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(ev, ref, atol=1e-5)  # eval at native size is the identity + normalization
    assert D.build_transforms(32, True, small_images=True)(img).shape == (3, 32, 32)
    assert D.build_transforms(48, True)(img).shape == (3, 48, 48)
    assert D.build_transforms(48, False)(img).shape == (3, 48, 48)


def test_seeded_sampling_is_reproducible_and_isolated(tiny_data):
    ds = D.build_train_loader(tiny_data, CFG, 4, num_workers=0).dataset
    torch.manual_seed(1)
    a, after = ds[(3, 42)][0], torch.rand(1)
    torch.manual_seed(1)
    b = ds[(3, 42)][0]
    assert torch.equal(a, b) and torch.equal(after, torch.rand(1))  # global RNG untouched
    s = D.SeededSampler(range(16), seed=0)
    first = list(s)
    assert list(s) == first and sorted(i for i, _ in first) == list(range(16))
    s.set_epoch(1)
    assert list(s) != first


def test_stratified_subset_and_workers(tiny_data):
    idx = D.stratified_subset([0] * 8 + [1] * 8, 6, seed=0)
    assert len(idx) == 6 and sum(i < 8 for i in idx) == 3
    one = [b[0] for b in D.build_train_loader(tiny_data, CFG, 4, num_workers=0)]
    two = [b[0] for b in D.build_train_loader(tiny_data, CFG, 4, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(one, two))  # augmentation does not depend on workers
