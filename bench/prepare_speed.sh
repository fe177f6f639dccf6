#!/usr/bin/env bash
# Preparation speed on the shared Flickr8k copy: Karpathy JSON at 1 and 2 workers, then captions.txt.
#   bash bench/prepare_speed.sh [../shared/data/flickr8k]
# Prints each run's summary (counts, vocabulary, skipped images, time, images/s) and its peak RSS.
set -euo pipefail
FLICKR=${1:-../shared/data/flickr8k}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
run() {  # name, then create_input_files.py options
    local name=$1; shift
    echo "== $name"
    /usr/bin/time -f "  peak RSS: %M KiB (largest process)" python create_input_files.py "$@" \
        --image-folder "$FLICKR/images" --output-folder "$WORK/$name" --image-size 224 2> "$WORK/time.txt" \
        | grep -v "images:" | sed '/^$/d'
    tail -n 1 "$WORK/time.txt"
}
run karpathy-workers-1 --dataset flickr8k --karpathy-json "$FLICKR/dataset_flickr8k.json" --workers 1
run karpathy-workers-2 --dataset flickr8k --karpathy-json "$FLICKR/dataset_flickr8k.json" --workers 2
run captions-csv --dataset flickr8k --captions-csv "$FLICKR/captions.txt" --workers 2 \
    --split-lists "$FLICKR/Flickr_8k.trainImages.txt" "$FLICKR/Flickr_8k.devImages.txt" "$FLICKR/Flickr_8k.testImages.txt"
run token-file --dataset flickr8k --token-file "$FLICKR/Flickr8k.token.txt" --workers 2 \
    --split-lists "$FLICKR/Flickr_8k.trainImages.txt" "$FLICKR/Flickr_8k.devImages.txt" "$FLICKR/Flickr_8k.testImages.txt"
