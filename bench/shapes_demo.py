"""Measure the main job: `python train.py` on a fresh folder, then its three targets.

    python bench/shapes_demo.py                 # runs the demo in a temporary folder (about 5-10 minutes)
    python bench/shapes_demo.py --run-dir DIR   # only measure an existing demo run folder
    python bench/shapes_demo.py -- --attention hard --hard-inference argmax   # the demo with other train.py options

Prints: wall time of `python train.py`, shapes TEST BLEU-4, and how often the attention's argmax
falls inside the box of the shape whose noun the decoder just emitted.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import load_checkpoint  # noqa: E402
from dataset import ImageDataset, load_image_info  # noqa: E402
from decoding import beam_search  # noqa: E402
from models import load_model  # noqa: E402
from shapes import SHAPES, load_boxes  # noqa: E402


def attention_hits(checkpoint_path, folder, shapes_json, beam_size, hard_inference=None):
    """(hits, nouns): nouns emitted on TEST, and those whose attention argmax lies in that shape's box.
    For hard attention the argmax is the location it attends when decoding with --hard-inference argmax."""
    checkpoint = load_checkpoint(checkpoint_path)
    if hard_inference:
        checkpoint["config"]["hard_inference"] = hard_inference
    encoder, decoder = load_model(checkpoint)
    word_map = checkpoint["word_map"]
    rev = {v: k for k, v in word_map.items()}
    name = "shapes_5_cap_per_img_5_min_word_freq"
    images = ImageDataset(folder, name, "TEST")
    info = load_image_info(folder, name, "TEST", len(images))
    boxes = load_boxes(shapes_json)
    hits = nouns = 0
    with torch.no_grad():
        for first in range(0, len(images), 50):
            idx = range(first, min(first + 50, len(images)))
            batch = torch.stack([images[i][0] for i in idx])  # (batch, 3, S, S)
            features = encoder(batch)  # (batch, num_pixels, encoder_dim)
            grid = int(round(features.shape[1] ** 0.5))
            for i, hyp in zip(idx, beam_search(decoder, features, word_map, beam_size)):
                objects = {o["shape"]: o["bbox"] for o in boxes[info[i]["file_name"]]}
                for token, alpha in zip(hyp["tokens"], hyp["alphas"]):
                    word = rev[token]
                    if word not in SHAPES:
                        continue
                    nouns += 1
                    if word not in objects:
                        continue  # a shape that is not in the picture: a miss
                    row, col = divmod(int(alpha.argmax()), grid)
                    x, y = (col + 0.5) / grid, (row + 0.5) / grid
                    x0, y0, x1, y1 = objects[word]
                    hits += x0 <= x <= x1 and y0 <= y <= y1
    return hits, nouns


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a folder where `python train.py` already ran")
    p.add_argument("--checkpoint", help="default: RUN_DIR/runs/shapes/best.pt")
    p.add_argument("--data-folder", help="default: RUN_DIR/data/shapes")
    p.add_argument("--hard-inference", choices=["expected", "argmax"], help="override a hard-attention checkpoint's")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="train.py options after --")
    args = p.parse_args()
    run_dir, seconds = args.run_dir, None
    if run_dir is None:
        run_dir = tempfile.mkdtemp(prefix="shapes_demo_")
        start = time.time()
        extra = [a for a in args.train_args if a != "--"]
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *extra], cwd=run_dir, check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.time() - start
    checkpoint = args.checkpoint or os.path.join(run_dir, "runs", "shapes", "best.pt")
    report = json.load(open(os.path.join(os.path.dirname(checkpoint), "test_results.json")))
    result = report["results"][0]
    folder = args.data_folder or os.path.join(run_dir, "data", "shapes")
    shapes_json = os.path.join(run_dir, "data", "shapes_raw", "dataset_shapes.json")
    hits, nouns = attention_hits(checkpoint, folder, shapes_json, result["beam_size"], args.hard_inference)
    if seconds is not None:
        print(f"python train.py wall time: {seconds / 60:.2f} min ({os.cpu_count()} CPUs, {run_dir})")
    print(f"shapes TEST BLEU-4 (beam {result['beam_size']}): {result['scores']['Bleu_4']:.4f}")
    kind = load_checkpoint(checkpoint)["config"].get("attention", "soft") + " attention"
    if args.hard_inference:
        kind += f", decoded with --hard-inference {args.hard_inference}"
    print(f"attention argmax ({kind}) inside the named shape's box: {hits}/{nouns} = {hits / max(nouns, 1):.1%}")


if __name__ == "__main__":
    main()
