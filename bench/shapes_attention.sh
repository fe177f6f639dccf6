#!/usr/bin/env bash
# Soft against hard attention on the shapes set: the demo's training twice on the same prepared data, then
# how often the attended location lies inside the box of the shape being named (bench/shapes_demo.py).
#   bash bench/shapes_attention.sh            # about 8 minutes on 2 CPU cores; add --device cuda on a GPU
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
for kind in soft hard; do
    start=$(date +%s)
    python "$ROOT/train.py" --attention $kind --out-dir runs/shapes_$kind "$@" > $kind.log 2>&1 \
        || { tail -n 20 $kind.log; exit 1; }
    echo "== $kind attention: trained in $(( $(date +%s) - start )) s"
    python "$ROOT/bench/shapes_demo.py" --run-dir "$WORK" --checkpoint runs/shapes_$kind/best.pt
done
python "$ROOT/bench/shapes_demo.py" --run-dir "$WORK" --checkpoint runs/shapes_hard/best.pt --hard-inference argmax
