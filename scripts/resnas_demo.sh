#!/usr/bin/env bash
# ViT-ResNAS end to end on real images, sized for a 2-core CPU (target: <= 40 minutes):
#   1. super-network of the scaled-down `demo` space on CIFAR-10 (upsampled to 56x56), a few epochs, with
#      multi-architecture sampling, progressive warm-up and rewiring; 2000 training images held out;
#   2. evolutionary search under a MACs budget, fitness = held-out top-1 of the sliced sub-networks, plus
#      RANDOM_ARCHS random sub-networks of the same MACs window evaluated the same way;
#   3. the winner retrained briefly from scratch (`linvision train --arch best.json`) and tested;
#      with RETRAIN_RANDOM=1 the random sub-networks are retrained the same way (longer than 40 min on 2 cores).
# Every setting can be overridden from the environment, e.g. SN_EPOCHS=1 POPULATION=20 scripts/resnas_demo.sh
# The tests run this script with tiny settings (tests/test_nas_cli.py::test_demo_script_smoke).
set -euo pipefail

LINVISION=${LINVISION:-"python -m linvision"}
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${OUT:-runs/resnas-demo}
SPACE=${SPACE:-demo}
IMG=${IMG:-56}
SN_EPOCHS=${SN_EPOCHS:-3}
SN_BATCH=${SN_BATCH:-128}
ARCHS_PER_STEP=${ARCHS_PER_STEP:-4}
CHOICE_WARMUP=${CHOICE_WARMUP:-1}
HOLDOUT=${HOLDOUT:-2000}
MACS=${MACS:-9M}
POPULATION=${POPULATION:-40}
ITERATIONS=${ITERATIONS:-4}
TOP_K=${TOP_K:-10}
CHILDREN=${CHILDREN:-10}
HOLDOUT_LIMIT=${HOLDOUT_LIMIT:-1000}
RANDOM_ARCHS=${RANDOM_ARCHS:-5}
RT_EPOCHS=${RT_EPOCHS:-3}
RT_BATCH=${RT_BATCH:-128}
RETRAIN_RANDOM=${RETRAIN_RANDOM:-0}
EXTRA=${EXTRA:-}            # extra options for every command, e.g. "--workers 0 --threads 1"
RT_EXTRA=${RT_EXTRA:-}      # extra options for the retraining runs, e.g. "--max-steps 2"

start=$(date +%s)
mkdir -p "$OUT"
echo "== 1/3 super-network ($SPACE space, $SN_EPOCHS epochs) -> $OUT/supernet"
if [ -f "$OUT/supernet/train_state.pt" ]; then sn=(--resume "$OUT/supernet"); else sn=(--output "$OUT/supernet"); fi
$LINVISION supernet train "${sn[@]}" --space "$SPACE" --data "$DATA" --img-size "$IMG" --epochs "$SN_EPOCHS" \
    --batch-size "$SN_BATCH" --archs-per-step "$ARCHS_PER_STEP" --choice-warmup-epochs "$CHOICE_WARMUP" \
    --holdout "$HOLDOUT" $EXTRA

echo "== 2/3 evolutionary search under $MACS MACs -> $OUT/search"
if [ -f "$OUT/search/search.json" ]; then se=(--resume "$OUT/search"); else se=(--output "$OUT/search"); fi
$LINVISION search "${se[@]}" --supernet "$OUT/supernet" --macs "$MACS" --population "$POPULATION" \
    --iterations "$ITERATIONS" --top-k "$TOP_K" --mutations "$CHILDREN" --crossovers "$CHILDREN" \
    --holdout-limit "$HOLDOUT_LIMIT" --random-archs "$RANDOM_ARCHS" $EXTRA

echo "== 3/3 retrain the winner ($RT_EPOCHS epochs) -> $OUT/winner"
rt() {  # rt ARCH_JSON OUTPUT_DIR
    if [ -f "$2/train_state.pt" ]; then return 0; fi
    $LINVISION train --arch "$1" --data "$DATA" --img-size "$IMG" --epochs "$RT_EPOCHS" --batch-size "$RT_BATCH" \
        --warmup-epochs 0.5 --output "$2" $EXTRA $RT_EXTRA
}
rt "$OUT/search/best.json" "$OUT/winner"
if [ "$RETRAIN_RANDOM" = 1 ]; then
    python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
(out / "random").mkdir(exist_ok=True)
for i, r in enumerate(json.loads((out / "search" / "random_archs.json").read_text())):
    (out / "random" / f"arch_{i}.json").write_text(json.dumps({**r, "model": "vit_resnas_tiny"}))
EOF
    for f in "$OUT"/random/arch_*.json; do
        name=$(basename "$f" .json)
        rt "$f" "$OUT/random_${name#arch_}"
    done
fi

python - "$OUT" "$(( $(date +%s) - start ))" <<'EOF' | tee "$OUT/summary.md"
import json, statistics, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
best = json.loads((out / "search" / "best.json").read_text())
rand = json.loads((out / "search" / "random_archs.json").read_text())
sn = json.loads((out / "supernet" / "config.json").read_text())
test = lambda d: json.loads((d / "config.json").read_text())["metrics"]["top1"] if (d / "config.json").exists() else None
print(f"| sub-network | MACs (M) | held-out top-1, super-network weights (%) | test top-1 after retraining (%) |")
print(f"|---|---|---|---|")
t = test(out / "winner")
print(f"| searched winner | {best['macs'] / 1e6:.2f} | {best['holdout_top1']:.2f} | {'-' if t is None else f'{t:.2f}'} |")
for i, r in enumerate(rand):
    t = test(out / f"random_{i}")
    print(f"| random {i} | {r['macs'] / 1e6:.2f} | {r['holdout_top1']:.2f} | {'-' if t is None else f'{t:.2f}'} |")
if rand:
    h = [r["holdout_top1"] for r in rand]
    print(f"\nwinner {best['holdout_top1']:.2f}% vs {len(h)} random sub-networks of the same MACs window: mean "
          f"{statistics.mean(h):.2f}%, best {max(h):.2f}% (held-out split: {sn['holdout']['n']} training images the "
          f"super-network never saw). Super-network: {sn['epoch']} epochs; {best['evaluated']} sub-networks "
          f"evaluated; total {seconds // 60} min {seconds % 60} s.")
EOF
