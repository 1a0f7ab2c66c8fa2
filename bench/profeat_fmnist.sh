#!/bin/bash
# scan.py, ProFeat_s (h afresh and h carried over) and ProFeat_e (E=2) on Fashion-MNIST with the same CPU budget
# (docs: README, "profeat.py" section). Same data (8000-image train subset, full test split), backbone (smallcnn,
# width 16), batch sizes and learning rates; the same number of epochs of each kind: 30 representation epochs
# (ProFeat: 20 SimCLR + 2 x 5 refinement), 15 SCAN epochs (ProFeat: 3 x 5), 6 self-labelling epochs (ProFeat: 3 x 2).
# Thresholds 0.9 instead of the paper's 0.99: with this short budget few predictions reach 0.99. One thread per run.
# Usage: bash bench/profeat_fmnist.sh [OUT_ROOT] [SEED]   (about 35 min on one idle CPU core)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs}
SEED=${2:-0}
mkdir -p "$OUT"
COMMON="--dataset fashion-mnist --arch smallcnn --width 16 --subset 8000 --threads 1 --num-heads 5 --seed $SEED --log-every 120"
PF="--iterations 3 --pretext-epochs 20 --refine-epochs 5 --batch-size 256 --lr 0.2 --lr-min 0.0002 --scan-epochs 5
    --scan-lr 1e-3 --finetune-epochs 2 --finetune-lr 1e-3 --t-s 0.9 --t-f 0.9"
python3 scan.py $COMMON --pretext-epochs 30 --pretext-batch-size 256 --pretext-lr 0.2 --scan-epochs 15 --scan-lr 1e-3 \
    --selflabel-epochs 6 --selflabel-lr 1e-3 --confidence-threshold 0.9 --out-dir $OUT/scan-budget > $OUT/scan-budget.out 2>&1
python3 profeat.py $COMMON $PF --no-carry-h --out-dir $OUT/s-fresh > $OUT/s-fresh.out 2>&1
python3 profeat.py $COMMON $PF --carry-h --out-dir $OUT/s-carry > $OUT/s-carry.out 2>&1
python3 profeat.py $COMMON $PF --carry-h --ensemble 2 --out-dir $OUT/e2-carry > $OUT/e2-carry.out 2>&1
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for r in json.load(open(f"{out}/scan-budget/results.json"))["rows"]:
    print(f"{'scan.py':10s} {r['stage']:15s}: acc {r['acc']:.4f} nmi {r['nmi']:.4f} ari {r['ari']:.4f} K {r['K']}")
for name in ["s-fresh", "s-carry", "e2-carry"]:
    for r in json.load(open(f"{out}/{name}/results.json"))["rows"]:
        print(f"{name:10s} iteration {r['iteration']}: acc {r['acc']:.4f} nmi {r['nmi']:.4f} ari {r['ari']:.4f} K {r['K']} "
              f"kept/batch {r['kept_images']:.1f} pos pairs/batch {r['positive_pairs']:.0f} neighbour acc {r.get('neighbor_acc', 0):.4f}"
              + (f" member acc {r['member_acc']}" if "member_acc" in r else ""))
PY
