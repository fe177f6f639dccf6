"""Decoding throughput: the one beam search, batched against one image at a time (a benchmark, not a test).

    python bench/decode_speed.py --checkpoint runs/flickr8k/best.pt --data-folder data/flickr8k
    python bench/decode_speed.py            # no checkpoint: a random 512-d model on random features

Images are encoded once beforehand, so the numbers measure decoding alone.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import ImageDataset, find_data_name  # noqa: E402
from decoding import beam_search  # noqa: E402
from models import DecoderWithAttention, load_model  # noqa: E402
from utils import load_checkpoint, peak_rss_mb  # noqa: E402


def model_and_features(args):
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        encoder, decoder = load_model(state)
        images = ImageDataset(args.data_folder, args.data_name or find_data_name(args.data_folder), args.split)
        n = min(args.images, len(images))
        with torch.no_grad():
            features = torch.cat([encoder(torch.stack([images[i][0] for i in range(s, min(s + 50, n))]))
                                  for s in range(0, n, 50)])  # (n, num_pixels, encoder_dim)
        return decoder, features, state["word_map"]
    torch.manual_seed(0)
    word_map = {"<pad>": 0, **{f"w{i}": i for i in range(1, 2597)}, "<unk>": 2597, "<start>": 2598, "<end>": 2599}
    decoder = DecoderWithAttention(512, 512, 512, len(word_map), encoder_dim=1280).eval()
    return decoder, torch.randn(args.images, 49, 1280), word_map


def rate(decoder, features, word_map, beam, batch):
    start = time.time()
    for s in range(0, len(features), batch):
        beam_search(decoder, features[s : s + batch], word_map, beam, 50)
    return len(features) / (time.time() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--data-folder", default=os.path.join("data", "flickr8k"))
    p.add_argument("--data-name")
    p.add_argument("--split", default="VAL")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    args = p.parse_args()
    decoder, features, word_map = model_and_features(args)
    print(f"{len(features)} images, {features.shape[1]} pixels x {features.shape[2]} features, "
          f"{torch.get_num_threads()} threads, {'checkpoint ' + args.checkpoint if args.checkpoint else 'random model'}")
    print(f"{'beam':>4s} {'batched img/s':>14s} {'one-by-one img/s':>17s} {'speed-up':>9s}")
    for beam in args.beams:
        batched = rate(decoder, features, word_map, beam, args.batch_size)
        single = rate(decoder, features, word_map, beam, 1)
        print(f"{beam:4d} {batched:14.1f} {single:17.1f} {batched / single:8.1f}x")
    print(f"peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
