"""Score a checkpoint on a prepared split with the coco-caption metrics.

    python eval.py --checkpoint runs/flickr8k/best.pt --split VAL --data-folder data/flickr8k --beam-size 1 3 5

Each image is encoded and decoded once per beam size, against all of its raw reference captions
(the {SPLIT}_REFS file), so the scores do not depend on the word map the folder was prepared with.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

from dataset import CaptionDataset, ImageDataset, find_data_name, load_image_info, load_references
from decoding import beam_search
from metrics import SCORE_NAMES, score_captions
from models import load_model
from utils import UserError, decode_tokens, load_checkpoint, pick_device, progress, read_json, run_cli, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="TEST", type=str.upper, choices=["TRAIN", "VAL", "TEST"])
    p.add_argument("--data-folder", help="folder written by create_input_files.py (default: the checkpoint's)")
    p.add_argument("--data-name", help="base name of the prepared files (default: the folder's only one)")
    p.add_argument("--beam-size", type=int, nargs="+", default=[3])
    p.add_argument("--batch-size", type=int, default=32, help="images decoded together")
    p.add_argument("--length-penalty", type=float, default=0.0, help="divide log-probabilities by length**this")
    p.add_argument("--max-len", type=int, default=50, help="longest caption in words")
    p.add_argument("--suppress-unk", action="store_true", help="never emit <unk>")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="JSON file for scores and captions (default: next to the checkpoint)")
    return p.parse_args(argv)


def reference_sentences(data_folder, data_name, split, num_images):
    """{image index: [reference sentence, ...]}: the raw REFS file, or else the encoded captions with a notice."""
    refs = load_references(data_folder, data_name, split)
    if refs is not None:
        return {i: [" ".join(tokens) for tokens in r] for i, r in enumerate(refs)}
    print(f"note: {data_folder} has no {split}_REFS file (prepared elsewhere?): scoring against its encoded "
          "captions, where rare words read <unk>", file=sys.stderr)
    word_map = read_json(os.path.join(data_folder, f"WORDMAP_{data_name}.json"))
    rev = {v: k for k, v in word_map.items()}
    captions = CaptionDataset(data_folder, data_name, split)
    cpi = captions.cpi
    return {i: [" ".join(decode_tokens(c, rev, word_map)) for c in captions.captions[i * cpi : (i + 1) * cpi].tolist()]
            for i in range(num_images)}


@torch.no_grad()
def decode_all(encoder, decoder, images, word_map, beam_sizes, batch_size, device, workers, **search):
    """{beam_size: {image index: hypothesis}}; each batch is encoded once for all beam sizes."""
    results = {k: {} for k in beam_sizes}
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
    for batch, indices in progress(loader, desc="decoding", unit="batch"):
        features = encoder(batch.to(device))  # (batch, num_pixels, encoder_dim)
        for k in beam_sizes:
            results[k].update(zip(indices.tolist(), beam_search(decoder, features, word_map, k, **search)))
    return results


def evaluate(checkpoint_path, data_folder=None, data_name=None, split="TEST", beam_sizes=(3,), batch_size=32,
             device="cpu", out=None, length_penalty=0.0, max_len=50, suppress_unk=False, workers=2):
    """Decode and score; print a table; write the JSON report. Returns the report dict."""
    checkpoint = load_checkpoint(checkpoint_path)
    data_folder = data_folder or checkpoint.get("data_folder")
    if not data_folder:
        raise UserError("give --data-folder (the checkpoint does not name one)")
    data_name = data_name or find_data_name(data_folder)
    encoder, decoder = load_model(checkpoint, device)
    word_map = checkpoint["word_map"]  # decode with the checkpoint's own vocabulary
    rev_word_map = {v: k for k, v in word_map.items()}
    images = ImageDataset(data_folder, data_name, split)
    refs = reference_sentences(data_folder, data_name, split, len(images))
    info = load_image_info(data_folder, data_name, split, len(images))

    start = time.time()
    hyps = decode_all(encoder, decoder, images, word_map, beam_sizes, batch_size, device, workers,
                      max_len=max_len, length_penalty=length_penalty, suppress_unk=suppress_unk,
                      constrained=checkpoint["config"].get("constrained_decoding", False))
    seconds = time.time() - start
    report = {"checkpoint": checkpoint_path, "split": split, "data_folder": data_folder, "data_name": data_name,
              "num_images": len(images), "decode_seconds": seconds, "results": []}
    for k in beam_sizes:
        sentences = {i: " ".join(decode_tokens(h["tokens"], rev_word_map, word_map)) for i, h in hyps[k].items()}
        scores = score_captions(refs, sentences, quiet=k != beam_sizes[0])  # skip notes once, not per beam
        captions = [{"image_id": info[i]["image_id"], "file_name": info[i]["file_name"], "caption": sentences[i]}
                    for i in sorted(sentences)]
        report["results"].append({"beam_size": k, "scores": scores, "captions": captions})
    print_table(report)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"eval_{split.lower()}.json")
    write_json(out, report)
    print(f"wrote {out}")
    return report


def print_table(report):
    names = [n for n in SCORE_NAMES if any(n in r["scores"] for r in report["results"])]
    print(f"\n{report['split']} of {report['data_name']}: {report['num_images']} images, "
          f"decoded in {report['decode_seconds']:.1f} s")
    print("beam  " + "  ".join(f"{n:>8s}" for n in names))
    for r in report["results"]:
        print(f"{r['beam_size']:4d}  " + "  ".join(f"{r['scores'].get(n, float('nan')):8.4f}" for n in names))


def main(argv=None):
    args = parse_args(argv)
    if min(args.beam_size) < 1:
        raise UserError("--beam-size must be at least 1")
    evaluate(args.checkpoint, args.data_folder, args.data_name, args.split, args.beam_size, args.batch_size,
             pick_device(args.device), args.out, args.length_penalty, args.max_len, args.suppress_unk, args.workers)


if __name__ == "__main__":
    run_cli(main)
