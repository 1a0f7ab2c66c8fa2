#!/bin/bash
# scan.py, ProFeat_s (h afresh and h carried over) and ProFeat_e (E=2) on Fashion-MNIST with the same CPU budget
# (docs: README, "profeat.py" section). Same data (8000-image train subset, full test split), backbone (smallcnn,
# width 16), batch sizes and learning rates; the same number of epochs of each kind: 30 representation epochs
# (ProFeat: 20 SimCLR + 2 x 5 refinement), 15 SCAN epochs (ProFeat: 3 x 5), 6 self-labelling epochs (ProFeat: 3 x 2).
# Thresholds 0.9 instead of the paper's 0.99: with this short budget few predictions reach 0.99. One thread per run.
# Usage: bash bench/profeat_fmnist.sh [OUT_ROOT] [SEED]   (about 35 min on one idle CPU core)
#   EXTRA_ARGS="--subset 500 ..." appends flags to every run (the last value of a flag wins): a small check run.
#   DRY_RUN=1 prints the four commands instead of running them (tests/test_bench.py parses their flags).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs}
SEED=${2:-0}
EXTRA=${EXTRA_ARGS:-}
COMMON="--dataset fashion-mnist --arch smallcnn --width 16 --subset 8000 --threads 1 --num-heads 5 --seed $SEED
    --log-every 120"
PF="--iterations 3 --pretext-epochs 20 --refine-epochs 5 --pretext-batch-size 256 --pretext-lr 0.2
    --pretext-lr-min 0.0002 --scan-epochs 5 --scan-lr 1e-3 --selflabel-epochs 2 --selflabel-lr 1e-3 --t-s 0.9
    --confidence-threshold 0.9"

run() {  # run NAME SCRIPT ARGS...: SCRIPT's output to $OUT/NAME.out (DRY_RUN: the command line to stdout)
    local name=$1
    shift
    if [ -n "${DRY_RUN:-}" ]; then
        echo "$@"
    else
        python3 "$@" > "$OUT/$name.out" 2>&1
    fi
}

[ -n "${DRY_RUN:-}" ] || mkdir -p "$OUT"
run scan-budget scan.py $COMMON --pretext-epochs 30 --pretext-batch-size 256 --pretext-lr 0.2 --scan-epochs 15 \
    --scan-lr 1e-3 --selflabel-epochs 6 --selflabel-lr 1e-3 --confidence-threshold 0.9 --out-dir $OUT/scan-budget $EXTRA
run s-fresh profeat.py $COMMON $PF --no-carry-h --out-dir $OUT/s-fresh $EXTRA
run s-carry profeat.py $COMMON $PF --carry-h --out-dir $OUT/s-carry $EXTRA
run e2-carry profeat.py $COMMON $PF --carry-h --ensemble 2 --out-dir $OUT/e2-carry $EXTRA
[ -z "${DRY_RUN:-}" ] || exit 0
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for r in json.load(open(f"{out}/scan-budget/results.json"))["rows"]:
    stage = r["stage"] + (f" ({r['features']})" if "features" in r else "")
    print(f"{'scan.py':10s} {stage:28s}: acc {r['acc']:.4f} nmi {r['nmi']:.4f} ari {r['ari']:.4f} K {r['K']}")
for name in ["s-fresh", "s-carry", "e2-carry"]:
    for r in json.load(open(f"{out}/{name}/results.json"))["rows"]:
        print(f"{name:10s} iteration {r['epoch']}: acc {r['acc']:.4f} nmi {r['nmi']:.4f} ari {r['ari']:.4f} "
              f"K {r['K']} kept/batch {r['kept_images'] or 0:.1f} pos pairs/batch {r['positive_pairs'] or 0:.0f} "
              f"neighbour acc {r.get('neighbor_acc', 0):.4f}"
              + (f" member acc {r['member_acc']}" if "member_acc" in r else ""))
PY
