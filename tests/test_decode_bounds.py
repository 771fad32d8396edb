"""Issue 16, decoding: `predict --stream` decodes exactly like `predict` (palette, EXIF orientation, modes) on every
supported kind of file, and declared sizes are bounded (pixel cap, aspect ratio, file size) before allocating."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from linvision import data as D
from linvision import decode_limits as L
from linvision.errors import LinvisionError
from linvision.stream import NpySource, PILSource


def _image(mode, w=13, h=11):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(7)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "1":
        return rgb.convert("L").point(lambda v: 255 if v > 127 else 0).convert("1")
    return rgb.convert(mode)


def _oriented_jpeg(path):
    im = _image("RGB", 16, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    im.save(path, exif=exif, quality=95)


KINDS = {
    "png-rgb": lambda p: _image("RGB").save(p), "png-palette": lambda p: _image("P").save(p),
    "png-palette-transparency": lambda p: _image("P").save(p, transparency=2),
    "png-rgba": lambda p: _image("RGBA").save(p),
    "png-la": lambda p: _image("LA").save(p), "png-16bit": lambda p: _image("I;16").save(p),
    "jpeg": lambda p: _image("RGB").save(p), "jpeg-exif-rotated": _oriented_jpeg,
    "bmp-rgb": lambda p: _image("RGB").save(p), "bmp-palette": lambda p: _image("P").save(p),
    "bmp-gray": lambda p: _image("L").save(p), "bmp-1bit": lambda p: _image("1").save(p),
    "tiff-rgb": lambda p: _image("RGB").save(p), "tiff-palette": lambda p: _image("P").save(p),
    "tiff-gray": lambda p: _image("L").save(p), "tiff-16bit": lambda p: _image("I;16").save(p),
    "tiff-cmyk": lambda p: _image("CMYK").save(p), "tiff-rgba": lambda p: _image("RGBA").save(p),
    "tiff-rotated": lambda p: _image("RGB").save(p, exif=_exif(8)),
    "ppm": lambda p: _image("RGB").save(p), "pgm": lambda p: _image("L").save(p),
}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif", "ppm": ".ppm", "pgm": ".pgm"}


def _exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_stream_decodes_exactly_like_predict(kind, tmp_path):
    path = tmp_path / f"img{SUFFIX[kind.split('-')[0]]}"
    KINDS[kind](path)
    want = np.asarray(D.load_rgb(path))  # what `linvision predict` feeds the model (before resizing)
    src = PILSource(path)
    try:
        assert (src.height, src.width) == want.shape[:2]
        got = np.concatenate([src.read_rows(0, 4), src.read_rows(4, 9), src.read_rows(9, src.height)])
    finally:
        src.close()
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want), f"{kind}: {np.abs(got.astype(int) - want).max()} max difference"
    if kind in ("bmp-palette", "tiff-palette", "ppm", "tiff-rgb", "tiff-16bit"):
        assert src.tiles is not None  # these really are read by strips


def test_pil_pixel_limit_is_left_on(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    _image("RGB").save(tmp_path / "a.ppm")
    PILSource(tmp_path / "a.ppm").close()
    assert Image.MAX_IMAGE_PIXELS == before and before


def _png(w, h, payload=b""):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("name,content,needle", [
    ("huge.ppm", b"P6\n2000000000 2000000000\n255\n" + b"\0" * 64, "over the pixel cap|decompression bomb"),
    ("lying.ppm", b"P6\n4000 3000\n255\n" + b"\0" * 64, "but the file holds only"),
    ("lying.png", _png(6000, 5000, b"\0" * 32), "but the file holds only"),
    ("thin.png", _png(100_000, 1, b"\0" * 300_001), "extreme aspect ratio \\(100000:1, more than 200:1\\)"),
])
def test_declared_sizes_are_refused_before_decoding(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises((ValueError, Image.DecompressionBombError), match=needle):
        D.load_rgb(tmp_path / name)
    with pytest.raises(LinvisionError, match="aspect ratio|does not hold|file holds only|pixel cap"):
        PILSource(tmp_path / name)


def test_truncated_tiff_strips_are_refused_when_opened(tmp_path):
    _image("RGB", 64, 64).save(tmp_path / "a.tif")
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "a.tif").write_bytes(data[:4096])  # the header (at the start) still declares every strip
    with pytest.raises(LinvisionError, match="declares 64x64 px that the file \\(4096 bytes\\) does not hold"):
        PILSource(tmp_path / "a.tif")


def test_pixel_cap_and_its_flag(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "a.png")
    monkeypatch.setattr(L, "MAX_PIXELS", 1000)
    with pytest.raises(D.DeclaredSizeError, match="declares 40x40 = 1600 px, over the pixel cap of 1000"):
        D.load_rgb(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(L, "MAX_PIXELS", L.MAX_PIXELS)
    D.set_max_pixels(2000)
    assert D.load_rgb(tmp_path / "a.png").size == (40, 40)


@pytest.mark.parametrize("header_shape,dtype,data,needle", [
    ((2_000_000_000, 2_000_000_000, 3), "u1", b"", "header declares 2000000000x2000000000x3 uint8"),
    ((8, 8, 5), "u1", b"\0" * 320, "5 channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)"),
    ((8, 8), "c8", b"\0" * 512, "unsupported dtype complex64"),
    ((8, 8), ">u2", b"\0" * 128, "unsupported dtype >u2"),
    ((8, 8), "<U2", b"\0" * 512, "unsupported dtype <U2"),
    ((1, 1000), "u1", b"\0" * 1000, "extreme aspect ratio"),
])
def test_npy_headers_are_checked(tmp_path, header_shape, dtype, data, needle):
    p = tmp_path / "a.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                 "shape": header_shape})
        f.write(data)
    with pytest.raises(LinvisionError, match=needle.replace("(", "\\(").replace(")", "\\)")):
        NpySource(p)
