"""Shared test setup: offline hub, few threads, a private dataset cache, tiny generated image data sets."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)  # 2 OpenMP threads on 2 busy cores can run 10x slower than 1

# Small models the CLI tests train, with the extra `linvision train` options each needs. Add/switch entries here.
TEST_MODELS = {
    "test_vrwkv": ["--img-size", "32", "--patch-size", "8"],
    "test_vir": ["--img-size", "32", "--patch-size", "8"],
    "test_resnas": ["--img-size", "56"],  # sides must be multiples of 56; fixed patch 14
}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Extract archives into a per-session cache instead of ~/.cache (inherited by subprocesses)."""
    old = os.environ.get("LINVISION_CACHE")
    os.environ["LINVISION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("LINVISION_CACHE", None)
    else:
        os.environ["LINVISION_CACHE"] = old


@pytest.fixture(params=list(TEST_MODELS))
def test_model(request):
    """``(model_name, extra_cli_args)`` for each entry of ``TEST_MODELS``."""
    return request.param, TEST_MODELS[request.param]


def write_images(folder: Path, n: int, color: tuple[int, int, int], size: int = 32, seed: int = 0) -> None:
    """``n`` noisy JPEGs of roughly ``color`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.clip(np.array(color) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:03d}.jpg", quality=90)


def make_dataset(root: Path, classes=("blue", "red"), n_train: int = 8, n_test: int = 4, size: int = 32) -> Path:
    """ImageFolder-style ``root/{train,test}/<class>/*.jpg`` with easily separable colours; returns ``root``."""
    colors = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 200, 40)}
    for k, c in enumerate(classes):
        write_images(root / "train" / c, n_train, colors.get(c, (120, 120, 120)), size, seed=k)
        write_images(root / "test" / c, n_test, colors.get(c, (120, 120, 120)), size, seed=100 + k)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 classes x (8 train + 4 test) 32x32 JPEGs."""
    return make_dataset(tmp_path_factory.mktemp("tiny") / "tiny")


def rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = 1.0) -> float:
    """RMS error relative to the reference's RMS; a reference that is exactly zero (e.g. d/du at T = 1) is
    compared in absolute terms against ``floor`` (the unit RMS of the inputs and upstream gradients)."""
    a, b = a.double(), b.double()
    ref = b.pow(2).mean().sqrt().item()
    return (a - b).pow(2).mean().sqrt().item() / (ref if ref > 0 else floor)


def run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``linvision *argv`` run in-process."""
    from linvision.cli import main
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err
