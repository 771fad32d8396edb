"""Issue 16, data sets: symbolic-link loops cannot hang the walk or count images twice; the archive cache is keyed
by content; archive expansion is capped."""
import io
import os
import tarfile

import pytest

from conftest import make_dataset
from linvision import data as D
from linvision.errors import LinvisionError


def test_symlink_loops_and_repeated_links_are_walked_once(tmp_path):
    root = make_dataset(tmp_path / "ds", n_train=3, n_test=1)
    red = root / "train" / "red"
    (red / "sub").mkdir()
    os.symlink(red, red / "sub" / "loop")          # red/sub/loop -> red: a loop
    os.symlink(red, red / "again")                 # a second way to the same folder
    os.symlink(root / "train", red / "sub" / "up")  # up into the split (blue/ and red/ again)
    with pytest.warns(UserWarning, match="folder\\(s\\) reached again through symbolic links"):
        ds = D.ImageFolder(root / "train")
    assert len(ds) == 6 and sorted(ds.targets) == [0, 0, 0, 1, 1, 1]
    assert len({os.path.realpath(p) for p, _ in ds.samples}) == 6


def _tar_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_archive_replaced_with_same_path_size_and_mtime_is_extracted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LINVISION_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar_bytes({"x/f.txt": b"first"}))
    st = archive.stat()
    first = D.extract_archive(archive)
    assert (first / "x" / "f.txt").read_bytes() == b"first"
    archive.write_bytes(_tar_bytes({"x/f.txt": b"other"}))  # same length, so the same tar size
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert archive.stat().st_size == st.st_size and archive.stat().st_mtime_ns == st.st_mtime_ns
    second = D.extract_archive(archive)
    assert second != first and (second / "x" / "f.txt").read_bytes() == b"other"
    assert D.extract_archive(archive) == second  # and the same content is not extracted twice


@pytest.mark.parametrize("cap,value,needle", [("MAX_EXTRACT_FILES", 2, "expands to more than 2 files"),
                                              ("MAX_EXTRACT_BYTES", 10, "expands to more than 9.313e-09 GiB")])
def test_archive_expansion_caps(tmp_path, monkeypatch, cap, value, needle):
    monkeypatch.setenv("LINVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, cap, value)
    archive = tmp_path / "big.tar"
    archive.write_bytes(_tar_bytes({"x/a": b"123456", "x/b": b"123456", "x/c": b"1"}))
    with pytest.raises(LinvisionError, match="big.tar " + needle.replace("(", "\\(")) as e:
        D.extract_archive(archive)
    assert "LINVISION_MAX_EXTRACT" in str(e.value)
    assert not [p for p in (tmp_path / "cache" / "datasets").iterdir() if not p.name.startswith(".digests")]
