"""Segmentation metrics (hand-computed confusion matrices, DDP sum), whole/slide inference, mask pictures."""
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from linvision.segmentation import (SegmentationMetrics, colorize, default_palette, metrics_from_confusion,
                                    predict_slide, predict_whole, read_mask, save_color_mask, save_side_by_side,
                                    window_starts)
from linvision.segmentation.visualize import GAP
from torchmetrics.classification import MulticlassJaccardIndex  # after linvision (its torchvision shim)

# ----------------------------------------------------------------------------------------------- metrics
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
# pairs (t, p) without the ignored pixel: (0,0) (0,1) (1,1) (1,2) (2,2) → C = [[1,1,0],[0,1,1],[0,0,1]]
CONF = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_metrics_match_a_hand_computed_confusion_matrix():
    m = SegmentationMetrics(3, ignore_index=255)
    m.update(PRED, TARGET)
    assert torch.equal(m.confusion(), CONF)
    r = m.compute()
    assert r["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2])  # 1/(2+2-1) etc.
    assert r["miou"] == r["score"] == pytest.approx(4 / 9)
    assert r["acc"] == pytest.approx(3 / 5)
    assert r["class_acc"] == pytest.approx([1 / 2, 1 / 2, 1]) and r["macc"] == pytest.approx(2 / 3)
    ref = MulticlassJaccardIndex(3, average=None, ignore_index=255)(PRED, TARGET)
    assert r["iou"] == pytest.approx(ref.tolist())


def test_metrics_from_logits_accumulate_over_batches_and_skip_absent_classes():
    logits = torch.nn.functional.one_hot(PRED, 4).permute(0, 3, 1, 2).float() * 5  # [1, 4, 2, 3]; class 3 unused
    m = SegmentationMetrics(4, ignore_index=255)
    m.update(logits, TARGET)
    m.update(logits[..., :1], TARGET[..., :1])  # pixels (0,0)=(t0,p0) and (1,0)=(t1,p2) again
    conf = torch.zeros(4, 4, dtype=torch.long)
    conf[:3, :3] = CONF
    conf[0, 0] += 1
    conf[1, 2] += 1
    assert torch.equal(m.confusion(), conf)
    r = m.compute()
    assert math.isnan(r["iou"][3]) and math.isnan(r["class_acc"][3])  # neither in target nor prediction
    # conf rows [2,1,0,0] [0,1,2,0] [0,0,1,0]: IoU = 2/(3+2-2), 1/(3+2-1), 1/(1+3-1)
    assert r["iou"][:3] == pytest.approx([2 / 3, 1 / 4, 1 / 3])
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 4 + 1 / 3) / 3)
    assert r["acc"] == pytest.approx(4 / 7)
    m.reset()
    assert math.isnan(m.compute()["miou"])


def test_class_only_predicted_has_iou_zero_and_undefined_accuracy():
    r = metrics_from_confusion(torch.tensor([[2, 1], [0, 0]]))
    assert r["iou"] == pytest.approx([2 / 3, 0.0]) and r["miou"] == pytest.approx(1 / 3)
    assert r["class_acc"][0] == pytest.approx(2 / 3) and math.isnan(r["class_acc"][1])


def test_metrics_reject_mismatched_shapes():
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="logits have 4 channels"):
        m.update(torch.zeros(1, 4, 2, 3), TARGET)
    with pytest.raises(ValueError, match="differs from target shape"):
        m.update(torch.zeros(1, 2, 2), TARGET)


def _ddp_worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        target, pred = torch.randint(0, 4, (4, 5, 6), generator=g), torch.randint(0, 3, (4, 5, 6), generator=g)
        target[target == 3] = 255
        m = SegmentationMetrics(3, ignore_index=255)
        m.update(pred[rank::world], target[rank::world])  # each rank sees half the images
        conf = m.confusion()
        lone = SegmentationMetrics(3, ignore_index=255)  # a rank without any batch still joins the sum
        if rank == 0:
            lone.update(pred, target)
        lone_conf = lone.confusion()
        if rank == 0:
            torch.save({"conf": conf, "lone": lone_conf, "pred": pred, "target": target}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch, timm, torchvision and torchmetrics (~1 min here)
def test_metrics_sum_over_ddp_ranks(tmp_path):
    out = tmp_path / "r.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    single = SegmentationMetrics(3, ignore_index=255)
    single.update(r["pred"], r["target"])
    assert torch.equal(r["conf"], single.confusion()) and r["conf"].sum() == (r["target"] != 255).sum()
    assert torch.equal(r["lone"], single.confusion())


# ----------------------------------------------------------------------------------------------- inference
@pytest.fixture
def conv1x1():
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 5, 1).double().eval()


@pytest.mark.parametrize("window, stride", [((8, 12), (5, 7)), ((8, 12), (8, 12)), (7, 3), ((40, 50), (20, 20))])
def test_slide_equals_whole_for_a_pointwise_model(conv1x1, window, stride):
    x = torch.randn(2, 3, 23, 37, dtype=torch.float64)
    whole = predict_whole(conv1x1, x)
    slide = predict_slide(conv1x1, x, window, stride, 5, batch_windows=3)
    assert slide.shape == whole.shape == (2, 5, 23, 37)
    torch.testing.assert_close(slide, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(predict_slide(conv1x1, x[0], window, stride, 5), whole[0], rtol=1e-12, atol=1e-12)


def test_slide_averages_overlapping_windows():
    calls = []

    def window_id(x):  # every window predicts its own call number: the result is the mean over covering windows
        calls.append(x.shape[-2:])
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(len(calls)))

    out = predict_slide(window_id, torch.zeros(1, 3, 4, 6), (4, 4), (4, 2), 1, batch_windows=1)
    # windows at x = 0, 2 (ids 1, 2): columns 0-1 → 1, 2-3 → (1 + 2) / 2, 4-5 → 2
    assert window_starts(6, 4, 2) == [0, 2] and len(calls) == 2
    assert out[0, 0, 0].tolist() == [1, 1, 1.5, 1.5, 2, 2]


def test_window_starts_cover_the_axis():
    for size in range(1, 30):
        for window in (1, 4, 7, 40):
            for stride in range(1, window + 1):
                w = min(window, size)
                starts = window_starts(size, w, stride)
                covered = set().union(*(range(s, s + w) for s in starts))
                assert covered == set(range(size)) and starts[-1] + w == size


def test_whole_upsamples_low_resolution_logits_and_checks_shapes():
    def half(x):
        return torch.nn.functional.avg_pool2d(x[:, :2], 2)
    assert predict_whole(half, torch.randn(1, 3, 8, 10)).shape == (1, 2, 8, 10)
    with pytest.raises(ValueError, match=r"map \[B, 3, H, W\] to logits"):
        predict_whole(lambda x: x[:, 0], torch.randn(1, 3, 8, 10))
    with pytest.raises(ValueError, match="stride .* larger than window"):
        predict_slide(half, torch.randn(1, 3, 8, 10), 4, 5, 2)
    with pytest.raises(ValueError, match="expected num_classes=3"):
        predict_slide(half, torch.randn(1, 3, 8, 10), 4, 4, 3)


# ----------------------------------------------------------------------------------------------- pictures
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_colorize_uses_the_palette_and_black_for_ignored():
    mask = torch.tensor([[0, 1], [2, 255]])
    c = colorize(mask, PALETTE)
    assert c.dtype == np.uint8 and c.shape == (2, 2, 3)
    assert c.reshape(-1, 3).tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]
    pal = default_palette(40)
    assert len(set(pal)) == 40 and (0, 0, 0) not in pal
    assert colorize(mask, num_classes=3).reshape(-1, 3).tolist()[:3] == [list(p) for p in pal[:3]]


def test_save_color_mask_png_round_trips_indices(tmp_path):
    mask = np.array([[0, 1, 2], [2, 11, 0]])
    p = save_color_mask(tmp_path / "sub" / "m.png", mask, PALETTE)
    with Image.open(p) as im:
        assert im.size == (3, 2) and im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb == colorize(mask, PALETTE)).all() and rgb[1, 1].tolist() == [0, 0, 0]
    assert (read_mask(p) == mask).all()
    big = np.array([[0, 300]])  # labels beyond 8 bits: RGB
    with Image.open(save_color_mask(tmp_path / "b.png", big, num_classes=2)) as im:
        assert im.mode == "RGB" and np.asarray(im)[0, 1].tolist() == [0, 0, 0]
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_side_by_side_panels(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    pred = rng.integers(0, 3, (6, 5))
    target = pred.copy()
    target[0, 0] = 255
    p = save_side_by_side(tmp_path / "s.png", img, torch.from_numpy(pred), target, PALETTE)
    with Image.open(p) as im:
        assert im.size == (3 * 5 + 2 * GAP, 6)
        a = np.asarray(im.convert("RGB")).astype(int)
    col = np.array(PALETTE)[pred]
    assert (a[:, :5] == img).all()
    assert (np.abs(a[:, 5 + GAP:10 + GAP] - (img + col) / 2) <= 1).all()
    assert (a[0, 10 + 2 * GAP] == img[0, 0]).all()  # ignored pixel: plain image
    assert (a[:, 5:5 + GAP] == 255).all()
    with Image.open(save_side_by_side(tmp_path / "t.png", torch.from_numpy(img).permute(2, 0, 1), pred,
                                      palette=PALETTE)) as im:
        assert im.size == (2 * 5 + GAP, 6)
