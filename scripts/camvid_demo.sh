#!/usr/bin/env bash
# CamVid semantic segmentation end to end, sized for a 2-core CPU: measured 313 s (5 min 13 s) with the defaults on
# this 2-core EPYC VM, nothing else running (4 epochs of 47–56 s with validation; the rest: resize, test eval,
# predictions, start-up):
# test mIoU 24.8 % (pixel acc 67.4 %). 12 epochs give 29.2 % (README, "CamVid from scratch ...").
# vrwkv_tiny + UPerNet-64 costs 6.8 GMACs per 360x480 image (1.8 at 180x240), so on 2 cores the demo works at
# half resolution (SIZE=180x240; SIZE=full keeps 360x480, ~4x the time):
#   0. a copy of CamVid resized to SIZE (images bilinear, masks nearest) -> OUT/data;
#   1. `linvision segment train`: vrwkv_tiny + UPerNet (64 channels) from scratch (or from a classification run
#      with BACKBONE_CKPT=runs/...) on random CROP crops of the 367 training images, model choice on the 101 val
#      images (mIoU each epoch), --no-test (the test split is evaluated once, in step 2);
#   2. `linvision segment eval` on the 233 test images (mIoU over the 11 classes, void ignored) ->
#      OUT/test_metrics.json;
#   3. `linvision segment predict` on a few test images -> OUT/predictions/ (colour masks + overlays).
# Every setting can be overridden from the environment, e.g. EPOCHS=2 CROP="120 160" scripts/camvid_demo.sh
# Re-running continues an unfinished run (--resume). The tests run this script with tiny settings
# (tests/test_segment_cli.py::test_camvid_demo_script_smoke).
set -euo pipefail

LINVISION=${LINVISION:-"python -m linvision"}
DATA=${DATA:-../shared/data/camvid.tar.gz}
OUT=${OUT:-runs/camvid-demo}
BACKBONE=${BACKBONE:-vrwkv_tiny}
BACKBONE_ARGS=${BACKBONE_ARGS:-}        # e.g. "--patch-size 8"
BACKBONE_CKPT=${BACKBONE_CKPT:-}        # a `linvision train` run of the same backbone (its weights start the encoder)
DECODER=${DECODER:-upernet}
CHANNELS=${CHANNELS:-64}
SIZE=${SIZE:-180x240}                   # HxW the data set is resized to first, or "full" (360x480 as shipped)
CROP=${CROP:-"128 160"}
SCALES=${SCALES:-"0.75 1.5"}
EPOCHS=${EPOCHS:-4}
BATCH=${BATCH:-8}
LR=${LR:-1e-3}
PREDICT=${PREDICT:-4}                   # test images to write predictions for
EXTRA=${EXTRA:-}                        # extra options for every command, e.g. "--workers 0 --threads 1"
TRAIN_EXTRA=${TRAIN_EXTRA:-}            # extra options for training, e.g. "--max-steps 2"

start=$(date +%s)
mkdir -p "$OUT"
if [ "$SIZE" != full ]; then
    echo "== 0/3 CamVid resized to $SIZE -> $OUT/data"
    python - "$DATA" "$OUT/data" "$SIZE" <<'PY'
import shutil, sys
from pathlib import Path
from PIL import Image
from linvision.segmentation import resolve_seg_root
src, dst, (h, w) = resolve_seg_root(sys.argv[1]), Path(sys.argv[2]), map(int, sys.argv[3].split("x"))
if not (dst / "classes.json").is_file():
    for f in sorted(src.glob("*/*/*")):
        if f.parent.name in ("images", "masks"):
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(f) as im:
                im.resize((w, h), Image.NEAREST if f.parent.name == "masks" else Image.BILINEAR).save(out)
    shutil.copy(src / "classes.json", dst / "classes.json")  # written last: marks a complete copy
PY
    DATA="$OUT/data"
fi
echo "== 1/3 train $BACKBONE + $DECODER-$CHANNELS, $EPOCHS epochs -> $OUT/run"
if [ -f "$OUT/run/train_state.pt" ]; then
    tr=(--resume "$OUT/run" --epochs "$EPOCHS")
else
    tr=(--output "$OUT/run" --data "$DATA" --backbone "$BACKBONE" --decoder "$DECODER" --decoder-channels "$CHANNELS"
        --crop-size $CROP --scale-range $SCALES --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --no-test)
    if [ -n "$BACKBONE_CKPT" ]; then tr+=(--backbone-checkpoint "$BACKBONE_CKPT"); fi
    tr+=($BACKBONE_ARGS)
fi
$LINVISION segment train "${tr[@]}" $EXTRA $TRAIN_EXTRA

echo "== 2/3 evaluate on test -> $OUT/test_metrics.json"
$LINVISION segment eval --checkpoint "$OUT/run" --data "$DATA" --split test --json $EXTRA > "$OUT/test_metrics.json"
python - "$OUT/test_metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"test mIoU {m['miou']:.2f}%  pixel acc {m['acc']:.2f}%  mean class acc {m['macc']:.2f}%  ({m['n']} images)")
for c, v in m["iou"].items():
    print(f"  {c:<12} IoU {'n/a' if v is None else f'{v:.2f}%'}")
PY

echo "== 3/3 predict $PREDICT test images -> $OUT/predictions"
test_dir=$(python -c "import sys; from linvision.segmentation import resolve_seg_root; print(resolve_seg_root(sys.argv[1]) / 'test' / 'images')" "$DATA")
mapfile -t images < <(ls "$test_dir" | sort | head -n "$PREDICT" | sed "s|^|$test_dir/|")
$LINVISION segment predict --checkpoint "$OUT/run" --output "$OUT/predictions" "${images[@]}" $EXTRA

echo "== done in $(( $(date +%s) - start )) s: $OUT/run (model, metrics.csv, curves.png), $OUT/test_metrics.json,"
echo "   $OUT/predictions"
