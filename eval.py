"""Score a checkpoint on a prepared split with the coco-caption metrics.

    python eval.py --checkpoint runs/flickr8k/best.pt --split VAL --data-folder data/flickr8k --beam-size 1 3 5

Each image is encoded and decoded once per beam size, against all of its raw reference captions
(the {SPLIT}_REFS file), so the scores do not depend on the word map the folder was prepared with.
"""
import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from checkpoints import load_checkpoint
from dataset import ImageDataset, find_data_name, load_image_info, reference_sentences
from decoding import decode_batches, model_decoding
from features import configure_encoding, loader_options
from metrics import SCORE_NAMES, score_captions
from models import load_model
from utils import (DISK_ERRORS, UserError, decode_tokens, non_negative_float, non_negative_int, pick_device,
                   positive_int, run_cli, writable_file, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="TEST", type=str.upper, choices=["TRAIN", "VAL", "TEST"])
    p.add_argument("--data-folder", help="folder written by create_input_files.py (default: the checkpoint's)")
    p.add_argument("--data-name", help="base name of the prepared files (default: the folder's only one)")
    p.add_argument("--beam-size", type=positive_int, nargs="+", default=[3])
    p.add_argument("--batch-size", type=positive_int, default=32, help="images decoded together")
    p.add_argument("--length-penalty", type=non_negative_float,
                   help="divide log-probabilities by length**this (default: the model's own, else 0)")
    p.add_argument("--max-len", type=positive_int, default=50, help="longest caption in words")
    p.add_argument("--block-trigrams", action="store_true",
                   help="never repeat a trigram within a caption (default: as the model records)")
    p.add_argument("--suppress-unk", action="store_true", help="never emit <unk>")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--encoder-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="what the encoder computes in; auto: reduced precision where measured faster at equal "
                        "quality (models.AUTO_PRECISION), else fp32")
    p.add_argument("--hard-inference", choices=["expected", "argmax"],
                   help="a hard-attention model's context when decoding (default: what its checkpoint records)")
    p.add_argument("--out", help="JSON file for scores and captions (default: next to the checkpoint)")
    return p.parse_args(argv)


def evaluate(checkpoint_path, data_folder=None, data_name=None, split="TEST", beam_sizes=(3,), batch_size=32,
             device="cpu", out=None, length_penalty=None, max_len=50, suppress_unk=False, workers=2,
             encoder_precision="auto", hard_inference=None, block_trigrams=False):
    """Decode and score; print a table; write the JSON report. Returns the report dict."""
    checkpoint = load_checkpoint(checkpoint_path)
    device = torch.device(device)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"eval_{split.lower()}.json")
    writable_file(out, "--out")  # now, not after all the decoding
    data_folder = data_folder or checkpoint.get("data_folder")
    if not data_folder:
        raise UserError("give --data-folder (the checkpoint does not name one)")
    data_name = data_name or find_data_name(data_folder)
    if hard_inference:
        if checkpoint["config"].get("attention") != "hard":
            raise UserError("--hard-inference applies to hard-attention models only")
        checkpoint["config"]["hard_inference"] = hard_inference
    encoder, decoder = load_model(checkpoint, device, encoder_precision=encoder_precision)
    word_map = checkpoint["word_map"]  # decode with the checkpoint's own vocabulary
    rules = model_decoding(checkpoint["config"], length_penalty)  # the model's own, but a given length penalty wins
    rules["block_trigrams"] |= block_trigrams
    rev_word_map = {v: k for k, v in word_map.items()}
    images = ImageDataset(data_folder, data_name, split)  # its errors name the public paths
    snapshot = images.folder  # read every other file from the same whole prepared set
    warn_if_other_resolution(checkpoint["config"].get("image_size"), images.h5.image_size, data_folder)
    refs = reference_sentences(snapshot, data_name, split, len(images))
    info = load_image_info(snapshot, data_name, split, len(images))

    workers = configure_encoding(device, workers)  # threads for the CNN, one loader worker on the CPU: printed
    start = time.time()
    batches = DataLoader(images, batch_size=batch_size, num_workers=workers, **loader_options(device))
    hyps = decode_batches(encoder, decoder, batches, word_map, list(beam_sizes), max_len, suppress_unk=suppress_unk,
                          device=device, **rules)
    seconds = time.time() - start
    report = {"checkpoint": checkpoint_path, "split": split, "data_folder": data_folder, "data_name": data_name,
              "num_images": len(images), "decode_seconds": seconds, "decoding": rules, "results": []}
    for k in beam_sizes:
        sentences = {i: " ".join(decode_tokens(h["tokens"], rev_word_map, word_map)) for i, h in hyps[k].items()}
        scores = score_captions(refs, sentences, quiet=k != beam_sizes[0])  # skip notes once, not per beam
        captions = [{"image_id": info[i]["image_id"], "file_name": info[i]["file_name"], "caption": sentences[i]}
                    for i in sorted(sentences)]
        report["results"].append({"beam_size": k, "scores": scores, "captions": captions})
    print_table(report)
    save_report(report, out)
    print(f"wrote {out}")
    return report


def warn_if_other_resolution(trained_size, prepared_size, data_folder):
    """Scores drop quietly when a model is evaluated on pictures prepared at another size than it was trained
    on (the bundled model: VAL BLEU-4 20.7 on 256-px data against 21.6 on its own 224): say so, once."""
    if trained_size and trained_size != prepared_size:
        print(f"warning: the model was trained on pictures prepared at {trained_size} px, but {data_folder} holds "
              f"{prepared_size} px ones; scores will be lower than on a folder prepared with "
              f"create_input_files.py --image-size {trained_size}")


def save_report(report, out):
    """Write the report to `out`. Should that still fail after all the decoding, save it in the working
    folder (or else the temporary folder) and say where, in one error line."""
    try:
        write_json(out, report)
        return
    except OSError as err:
        reason = DISK_ERRORS.get(err.errno) or err.strerror or str(err)
    stem = os.path.splitext(os.path.basename(out))[0]
    name = f"{stem}-rescued-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for folder in (os.getcwd(), tempfile.gettempdir()):
        try:
            write_json(os.path.join(folder, name), report)
        except OSError:
            continue
        raise UserError(f"cannot write {out} ({reason}); the report was saved to {os.path.join(folder, name)} "
                        "instead")
    raise UserError(f"cannot write {out} ({reason}), nor a copy in {os.getcwd()} or {tempfile.gettempdir()}; "
                    "the scores are printed above")


def print_table(report):
    names = [n for n in SCORE_NAMES if any(n in r["scores"] for r in report["results"])]
    print(f"\n{report['split']} of {report['data_name']}: {report['num_images']} images, "
          f"decoded in {report['decode_seconds']:.1f} s")
    print("beam  " + "  ".join(f"{n:>8s}" for n in names))
    for r in report["results"]:
        print(f"{r['beam_size']:4d}  " + "  ".join(f"{r['scores'].get(n, float('nan')):8.4f}" for n in names))


def main(argv=None):
    args = parse_args(argv)
    evaluate(args.checkpoint, args.data_folder, args.data_name, args.split, args.beam_size, args.batch_size,
             pick_device(args.device), args.out, args.length_penalty, args.max_len, args.suppress_unk, args.workers,
             encoder_precision=args.encoder_precision, hard_inference=args.hard_inference,
             block_trigrams=args.block_trigrams)


if __name__ == "__main__":
    run_cli(main)
