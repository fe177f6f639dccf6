"""This code against an earlier revision of it, side by side in one run: end-to-end eval.py and cache building.

    python bench/revision_speed.py --lite0-checkpoint runs/lite0/best.pt          # against adc01df
    python bench/revision_speed.py --revision HEAD~3 --lite0-checkpoint CKPT --repeats 3

The earlier revision is unpacked with `git archive` into a temporary folder. Both trees then run the
same jobs on the same prepared files and the same weights, alternating, each job in a fresh process:

  eval lite0   eval.py --beam-size 5 on every VAL photo, EfficientNet-Lite0 at 224 px (a trained model)
  eval r101    eval.py --beam-size 5 --max-len 16 on 200 VAL photos, ResNet-101 at 256 px: random
               weights (ImageNet's cannot be downloaded here) and an untrained 512/512/512 decoder,
               so every caption runs to 16 words
  eval r101 bf16  the same, with --encoder-precision bf16 for the current code (the earlier one ran fp32 only)
  cache lite0  the in-memory TRAIN + VAL feature cache that train.py builds, Lite0 at 224 px

Both trees get the same checkpoint files, written in the earlier revision's format (the current code
reads it too). Each row reports the best of --repeats runs, and the 1-minute load average beside it:
a load well above the 2 cores means something else competed, and the row is not to be trusted.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_NAME = "flickr8k_5_cap_per_img_5_min_word_freq"
JOBS = ["eval_lite0", "eval_r101", "eval_r101_bf16", "cache_lite0"]

# Runs inside either tree (cwd), so it imports that tree's own modules: time the TRAIN + VAL feature cache.
CACHE_SNIPPET = r"""
import sys, time, torch
sys.path.insert(0, ".")
try:
    from utils import reuse_freed_memory                         # what every command now does first
    reuse_freed_memory()
except ImportError:
    pass
try:
    from checkpoints import load_checkpoint                      # the current layout
    from features import FeatureCache, configure_encoding
    from models import load_model
    checkpoint = load_checkpoint(sys.argv[1])
    encoder, _ = load_model(checkpoint, "cpu")
    workers = configure_encoding(torch.device("cpu"), 2)        # what train.py does before caching
except ImportError:                                              # the earlier layout: all in train.py
    from utils import load_checkpoint
    from models import load_model
    from train import FeatureCache
    encoder, _ = load_model(load_checkpoint(sys.argv[1]), "cpu")
    workers = 2                                                  # train.py's --workers default then
start, images = time.perf_counter(), 0
for split in ("TRAIN", "VAL"):
    images += len(FeatureCache(encoder, sys.argv[2], sys.argv[3], split, torch.device("cpu"), 32, workers))
print("SECONDS", time.perf_counter() - start, "IMAGES", images)
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--revision", default="adc01df", help="the earlier code (default: the last commit before the "
                                                          "encoder-speed work)")
    p.add_argument("--lite0-checkpoint", required=True, help="a trained Lite0 (224 px) checkpoint of either tree")
    p.add_argument("--data-folder", default=os.path.join(ROOT, "data", "flickr8k224"),
                   help="Flickr8k at 224 px (create_input_files.py --image-size 224; its default is 256)")
    p.add_argument("--data-folder-256", default=os.path.join(ROOT, "data", "flickr8k256_200"),
                   help="Flickr8k at 256 px, its first 200 photos per split (create_input_files.py --image-size "
                        "256 --limit 200 --word-map the 224-px folder's)")
    p.add_argument("--jobs", nargs="+", default=JOBS, choices=JOBS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args()


def unpack_revision(revision, folder):
    """The tracked files of `revision`, as they were, under folder/<revision>."""
    tree = os.path.join(folder, revision.replace("/", "_"))
    os.makedirs(tree)
    archive = os.path.join(folder, "tree.tar")
    subprocess.run(["git", "-C", ROOT, "archive", "-o", archive, revision], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def old_format(checkpoint):
    """A checkpoint as the earlier revision reads it: its LSTM cell was called decode_step."""
    decoder = {k.replace("lstm_cell.", "decode_step."): v for k, v in checkpoint["decoder"].items()}
    keep = {k: checkpoint[k] for k in ("config", "word_map", "encoder", "format")}
    return dict(keep, decoder=decoder)


def lite0_checkpoint(path, out):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["config"]["encoder"] != "efficientnet_lite0" or "encoder" not in checkpoint:
        sys.exit(f"{path}: not a full EfficientNet-Lite0 training checkpoint")
    torch.save(old_format(checkpoint), out)
    return out


def resnet101_checkpoint(word_map_path, out):
    """Random ResNet-101 and an untrained decoder (seed 0), built by the current code, saved in the old format."""
    sys.path.insert(0, ROOT)
    from checkpoints import CHECKPOINT_FORMAT
    from models import build_decoder, build_encoder

    with open(word_map_path) as f:
        word_map = json.load(f)
    config = {"encoder": "resnet101", "feature_stride": 32, "encoded_size": 14, "pretrained": False,
              "encoder_weights": None, "emb_dim": 512, "attention_dim": 512, "decoder_dim": 512, "dropout": 0.5}
    torch.manual_seed(0)
    encoder, decoder = build_encoder(config, pretrained=False), build_decoder(config, len(word_map))
    state = {"config": config, "word_map": word_map, "encoder": encoder.state_dict(),
             "decoder": decoder.state_dict(), "format": CHECKPOINT_FORMAT}
    torch.save(old_format(state), out)
    return out


def run_job(tree, job, checkpoints, args, scratch):
    """(seconds, images, VAL BLEU-4 or None) of the job in `tree`; for eval.py its own decode_seconds
    (encoding and decoding, no start-up)."""
    if job == "cache_lite0":
        cmd = [sys.executable, "-c", CACHE_SNIPPET, checkpoints["lite0"], args.data_folder, DATA_NAME]
        out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{job} failed in {tree}:\n{out.stderr[-2000:]}")
        seconds, images = out.stdout.split("SECONDS")[-1].split("IMAGES")
        return float(seconds), int(images), None
    report = os.path.join(scratch, "eval.json")
    model, folder = ("lite0", args.data_folder) if job == "eval_lite0" else ("r101", args.data_folder_256)
    cmd = [sys.executable, "eval.py", "--checkpoint", checkpoints[model], "--split", "VAL", "--data-folder",
           folder, "--beam-size", "5", "--out", report] + (["--max-len", "16"] if model == "r101" else [])
    if job == "eval_r101_bf16" and tree == ROOT:
        cmd += ["--encoder-precision", "bf16"]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{job} failed in {tree}:\n{out.stderr[-2000:]}")
    with open(report) as f:
        result = json.load(f)
    return result["decode_seconds"], result["num_images"], result["results"][0]["scores"].get("Bleu_4")


def main():
    args = parse_args()
    # each job runs inside its tree: paths given relative to here must not be read relative to there
    args.data_folder, args.data_folder_256 = os.path.abspath(args.data_folder), os.path.abspath(args.data_folder_256)
    print(f"this tree: {ROOT} ({git_head()}); earlier: {args.revision}; torch {torch.__version__}; "
          f"{cpu_model()}; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="revision_speed_") as scratch:
        trees = {"before": unpack_revision(args.revision, scratch), "now": ROOT}
        word_map = os.path.join(args.data_folder, f"WORDMAP_{DATA_NAME}.json")
        checkpoints = {"lite0": lite0_checkpoint(args.lite0_checkpoint, os.path.join(scratch, "lite0.pt")),
                       "r101": resnet101_checkpoint(word_map, os.path.join(scratch, "r101.pt"))}
        for job in args.jobs:
            best = {}
            for repeat in range(args.repeats if job != "cache_lite0" else 1):
                for name, tree in trees.items():  # alternate, so a slow spell of the machine hits both
                    load = os.getloadavg()[0]
                    seconds, images, bleu4 = run_job(tree, job, checkpoints, args, scratch)
                    print(f"  {job:14s} {name:6s} run {repeat}: {seconds:7.1f} s (load before {load:.2f})",
                          flush=True)
                    if name not in best or seconds < best[name]["seconds"]:
                        best[name] = {"seconds": seconds, "images": images, "load": load, "bleu4": bleu4}
            ratio = best["before"]["seconds"] / best["now"]["seconds"]
            rows.append({"job": job, "before": best["before"], "now": best["now"], "speedup": ratio})
    print(f"\n{'job':14s} {'before s':>9s} {'img/s':>7s} {'now s':>7s} {'img/s':>7s} {'speed-up':>8s}  BLEU-4 before/now")
    for r in rows:
        b, n = r["before"], r["now"]
        bleu = f"{b['bleu4']:.4f} / {n['bleu4']:.4f}" if b["bleu4"] is not None else "-"
        print(f"{r['job']:14s} {b['seconds']:9.1f} {b['images'] / b['seconds']:7.1f} {n['seconds']:7.1f} "
              f"{n['images'] / n['seconds']:7.1f} {r['speedup']:7.2f}x  {bleu}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"revision": args.revision, "now": git_head(), "cpu": cpu_model(), "rows": rows}, f, indent=1)


def git_head():
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def cpu_model():
    """The CPU's model name and family, from the first processor of /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return f"{os.cpu_count()} cores"
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}), {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
