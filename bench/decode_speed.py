"""Decoding throughput: the one beam search, batched against one image at a time (a benchmark, not a test).

    python bench/decode_speed.py --checkpoint runs/flickr8k/best.pt --data-folder data/flickr8k
    python bench/decode_speed.py            # no checkpoint: a random 512-d model on random features

Images are encoded once beforehand, so the numbers measure decoding alone.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints import load_checkpoint  # noqa: E402
from dataset import ImageDataset, find_data_name  # noqa: E402
from decoding import beam_search  # noqa: E402
from models import DecoderWithAttention, load_model  # noqa: E402
from utils import peak_rss_mb, pick_device  # noqa: E402


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
    return decoder, torch.randn(args.images, 49, 1280, device="cpu"), word_map


class StepCounter:
    """Counts the hypothesis-steps (rows x steps) a search computes, by wrapping decoder.step."""

    def __init__(self, decoder):
        self.rows, self.step = 0, decoder.step
        decoder.step = self

    def __call__(self, embedded, *state):
        self.rows += len(embedded)
        return self.step(embedded, *state)


def rate(decoder, features, word_map, beam, batch):
    start = time.time()
    for s in range(0, len(features), batch):
        beam_search(decoder, features[s : s + batch], word_map, beam, 50)
    if features.device.type == "cuda":
        torch.cuda.synchronize()
    return len(features) / (time.time() - start)


def macs_per_row_step(decoder, num_pixels):
    """Multiply-adds of one decoder step for one hypothesis: the matrix products of models.py."""
    att, lstm, fc = decoder.attention, decoder.lstm_cell, decoder.fc
    encoder_dim, attention_dim = att.encoder_att.in_features, att.encoder_att.out_features
    return (att.decoder_att.weight.numel() + decoder.f_beta.weight.numel() + lstm.weight_ih.numel()
            + lstm.weight_hh.numel() + fc.weight.numel() + num_pixels * (attention_dim + encoder_dim))


def matmul_gflops(decoder, rows=1000, repeats=10):
    """What this CPU sustains at best on the step's largest product, the LSTM input matmul, with many rows."""
    weight = decoder.lstm_cell.weight_ih.detach()  # (4 * decoder_dim, embed_dim + encoder_dim)
    x = torch.randn(rows, weight.shape[1])  # (rows, embed_dim + encoder_dim)
    x @ weight.T  # warm-up
    start = time.time()
    for _ in range(repeats):
        x @ weight.T  # (rows, 4 * decoder_dim)
    return 2 * rows * weight.numel() * repeats / (time.time() - start) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--data-folder", default=os.path.join("data", "flickr8k"))
    p.add_argument("--data-name")
    p.add_argument("--split", default="VAL")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    decoder, features, word_map = model_and_features(args)
    device = pick_device(args.device)
    decoder, features = decoder.to(device), features.to(device)
    print(f"{len(features)} images, {features.shape[1]} pixels x {features.shape[2]} features, "
          f"{torch.get_num_threads()} threads, {'checkpoint ' + args.checkpoint if args.checkpoint else 'random model'}")
    print(f"{'beam':>4s} {'batched img/s':>14s} {'one-by-one img/s':>17s} {'speed-up':>9s}")
    results = []
    for beam in args.beams:
        counter = StepCounter(decoder)
        batched = rate(decoder, features, word_map, beam, args.batch_size)
        decoder.step = counter.step
        single = rate(decoder, features, word_map, beam, 1)
        results.append((beam, batched, single, counter.rows / len(features)))
        print(f"{beam:4d} {batched:14.1f} {single:17.1f} {batched / single:8.1f}x")
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(f"peak RSS {peak_rss_mb():.0f} MiB" + (f", peak GPU memory {gpu_mib:.0f} MiB" if gpu_mib else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "peak_gpu_mib": gpu_mib, "rows": [
                {"beam": b, "batched": x, "one_by_one": y} for b, x, y, _ in results]}, f)
    if device.type != "cpu":
        return  # the matmul ceiling below is measured for this CPU
    # The batched search is bound by matrix products: how fast could it be if they were all it did?
    macs, gflops = macs_per_row_step(decoder, features.shape[1]), matmul_gflops(decoder)
    print(f"\none hypothesis-step = {macs / 1e6:.1f} M multiply-adds; this CPU's matmul: {gflops:.0f} GFLOP/s")
    print(f"{'beam':>4s} {'steps/img':>10s} {'matmul-only img/s':>18s} {'ceiling':>8s}")
    for beam, batched, single, row_steps in results:
        ceiling = gflops * 1e9 / (2 * macs * row_steps)
        print(f"{beam:4d} {row_steps:10.1f} {ceiling:18.1f} {ceiling / single:7.1f}x")


if __name__ == "__main__":
    main()
