#!/usr/bin/env bash
# Short real-data smoke test on Flickr8k (about 200 images): prepare, train 1 epoch, eval, caption.
#   bash .ci/flickr8k_smoke.sh ../shared/data/flickr8k   (from the repository's root; .ci/run calls it)
set -euo pipefail
FLICKR=${1:-../shared/data/flickr8k}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "== Flickr8k smoke test in $WORK"
python create_input_files.py --dataset flickr8k --karpathy-json "$FLICKR/dataset_flickr8k.json" \
    --image-folder "$FLICKR/images" --output-folder "$WORK/data" --image-size 224 --limit 100 \
    > "$WORK/prepare.log"
grep -v "images:" "$WORK/prepare.log" | tail -n 10
python train.py --data-folder "$WORK/data" --encoder efficientnet_lite0 --encoded-size 0 \
    --emb-dim 64 --attention-dim 64 --decoder-dim 128 --epochs 1 --out-dir "$WORK/run" 2>/dev/null
python eval.py --checkpoint "$WORK/run/best.pt" --split VAL --beam-size 1 3 --out "$WORK/val.json" 2>/dev/null
python caption.py --checkpoint "$WORK/run/best.pt" --img-dir "$FLICKR/images_fullres" --out "$WORK/figs" \
    > "$WORK/captions.txt"
head -n 4 "$WORK/captions.txt"
test "$(ls "$WORK/figs" | wc -l)" -ge 1
echo "== Flickr8k smoke test passed"
