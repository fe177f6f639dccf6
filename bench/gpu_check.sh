#!/usr/bin/env bash
# The GPU check: everything this project claims about CUDA, in one run of under 8 minutes on one modern GPU.
#   bash bench/gpu_check.sh             # on a machine with a CUDA GPU; prints one table
#   bash bench/gpu_check.sh --dry-run   # every step for one batch on the CPU: proves the steps parse and start
# Steps: the shapes main job with --amp (wall time, TEST BLEU-4); training images/s for Lite0 with cached
# features, ResNet-50 frozen and ResNet-50 fine-tuned, fp32 and AMP; beam-5 decoding, batched against one
# image at a time; hard attention and --fine-tune-top for 20 steps each; a one-process torchrun run (NCCL on
# a GPU); peak GPU memory of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${1:-}" ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    SHAPES=(--epochs 1 --max-steps 1 --workers 0)  # the main job for one batch, on a tiny shapes set
    SPEED=(--batch-size 2 --image-size 64 --iterations 1)
    DECODE=(--images 4 --batch-size 2)
    # prepare a tiny shapes set where `python train.py` looks for it, so it skips the full preparation
    (cd "$WORK" && python "$ROOT/create_input_files.py" --dataset shapes --shapes-sizes 16 8 8 --image-size 224 \
        --output-folder data/shapes --image-folder data/shapes_raw --workers 1 > prepare.log)
else
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: use --dry-run')"
    DEVICE=cuda
    SHAPES=()
    SPEED=(--batch-size 64 --iterations 10)
    DECODE=(--images 1000 --batch-size 100)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

step() {  # step NAME COMMAND...: run one step, its output in $WORK/NAME.log, its wall time in $WORK/NAME.seconds
    local name=$1; shift
    echo "== $name"
    local start; start=$(date +%s.%N)
    if ! "$@" > "$WORK/$name.log" 2>&1; then
        tail -n 20 "$WORK/$name.log"; echo "step $name failed" >&2; exit 1
    fi
    python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$start" "$(date +%s.%N)" > "$WORK/$name.seconds"
}

step shapes bash -c "cd '$WORK' && python '$ROOT/train.py' --amp --device $DEVICE ${SHAPES[*]:-}"
for amp in "" "--amp"; do
    tag=${amp:+amp}; tag=${tag:-fp32}
    step "lite0_$tag" python bench/train_speed.py --device $DEVICE --encoder efficientnet_lite0 --image-size 224 \
        --encoded-size 0 --modes cached $amp "${SPEED[@]}" --json "$WORK/lite0_$tag.json"
    step "resnet50_$tag" python bench/train_speed.py --device $DEVICE --encoder resnet50 --modes frozen fine-tune \
        $amp "${SPEED[@]}" --json "$WORK/resnet50_$tag.json"
done
step decode python bench/decode_speed.py --device $DEVICE --beams 5 "${DECODE[@]}" --json "$WORK/decode.json"
for extra in "--attention hard" "--fine-tune-top 2"; do  # hard attention's sampling; the cached-bottom top
    name=$(echo "$extra" | tr -d '-' | tr ' ' '_')
    step "$name" python train.py --data-folder "$WORK/data/shapes" --encoder efficientnet_lite0 --encoded-size 0 \
        --feature-stride 16 --epochs 1 --max-steps 20 --device $DEVICE --out-dir "$WORK/$name" --workers 0 $extra
done
step torchrun python -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29517 \
    train.py --data-folder "$WORK/data/shapes" --encoder efficientnet_lite0 --encoded-size 0 --epochs 1 \
    --max-steps 20 --device $DEVICE --out-dir "$WORK/torchrun" --workers 0

python - "$WORK" "$DRY" <<'EOF'
import json, os, sys

work, dry = sys.argv[1], sys.argv[2] == "1"
def read(name):
    return json.load(open(os.path.join(work, name)))
def seconds(name):
    return float(open(os.path.join(work, name + ".seconds")).read())
def gpu(mib):
    return f"{mib:,.0f} MiB" if mib is not None else "-"

rows = []
shapes_log = [json.loads(line) for line in open(os.path.join(work, "runs", "shapes", "log.jsonl"))]
test = read(os.path.join("runs", "shapes", "test_results.json"))["results"][0]
rows.append(("shapes main job, --amp", f"{seconds('shapes') / 60:.2f} min, TEST BLEU-4 (beam {test['beam_size']}) "
             f"{test['scores']['Bleu_4']:.4f}", gpu(max((r.get('peak_gpu_mb') for r in shapes_log), default=None))))
for name, mode, label in (("lite0", "cached", "Lite0 224 px, cached features"),
                          ("resnet50", "frozen", "ResNet-50 256 px, frozen"),
                          ("resnet50", "fine-tune", "ResNet-50 256 px, fine-tuned")):
    for tag in ("fp32", "amp"):
        row = next(r for r in read(f"{name}_{tag}.json")["rows"] if r["mode"] == mode)
        mem = gpu(row["peak_mem_mib"]) if row["memory"] == "GPU" else "-"
        rows.append((f"training, {label}, {tag}", f"{row['images_per_s']:.1f} img/s", mem))
decode = read("decode.json")
beam5 = decode["rows"][0]
rows.append(("beam-5 decoding, random 512-d model", f"{beam5['batched']:.1f} img/s batched, "
             f"{beam5['one_by_one']:.1f} one at a time", gpu(decode["peak_gpu_mib"])))
for name, label in (("attention_hard", "hard attention, 20 steps"), ("finetunetop_2", "--fine-tune-top 2, 20 steps")):
    log = [json.loads(line) for line in open(os.path.join(work, name, "log.jsonl"))]
    rows.append((label, f"loss {log[0]['loss']:.3f}, {log[0]['img_per_s']:.0f} img/s, {seconds(name):.0f} s",
                 gpu(log[0].get("peak_gpu_mb"))))
ddp_log = [json.loads(line) for line in open(os.path.join(work, "torchrun", "log.jsonl"))]
rows.append(("torchrun, 1 process (NCCL on CUDA, gloo on CPU)", f"epoch 0 loss {ddp_log[0]['loss']:.3f}, "
             f"{seconds('torchrun'):.0f} s", gpu(ddp_log[0].get("peak_gpu_mb"))))
print(f"\nGPU check{' (DRY RUN: one batch per step on the CPU; the numbers mean nothing)' if dry else ''}")
width = max(len(r[0]) for r in rows)
print(f"{'step':{width}s}  {'result':60s}  peak GPU memory")
for step, result, mem in rows:
    print(f"{step:{width}s}  {result:60s}  {mem}")
EOF
