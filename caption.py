"""Caption images with a trained checkpoint and draw where the model looked for each word.

    python caption.py --img photo.jpg [more.jpg ...] [--out fig.png]   # the bundled pretrained model
    python caption.py --checkpoint runs/shapes/best.pt --img photo.jpg
    python caption.py --checkpoint runs/shapes/best.pt --img-dir photos/ --out figures/

A bad image (missing, not an image, a decompression bomb) or a figure that cannot be written gets a
one-line error; the others are still captioned, and the exit code is then 2.
"""
import argparse
import collections
import os
import sys

import torch

from checkpoints import DEFAULT_MODEL, load_checkpoint
from decoding import beam_search, model_decoding
from figures import attention_figure, save_figure
from models import load_model
from utils import (DISK_ERRORS, ImageLoadError, UserError, load_image, non_negative_float, open_rgb,
                   pick_device, positive_int, run_cli, writable_dir, writable_file)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--img", nargs="+", help="image file(s)")
    src.add_argument("--img-dir", help="caption every image in this folder")
    p.add_argument("--checkpoint", default=DEFAULT_MODEL,
                   help="a model file (default: the bundled Flickr8k model, %(default)s)")
    p.add_argument("--beam-size", type=positive_int, default=5)
    p.add_argument("--length-penalty", type=non_negative_float,
                   help="divide log-probabilities by length**this (default: the model's own, else 0)")
    p.add_argument("--max-len", type=positive_int, default=50)
    p.add_argument("--out", help="figure path (.png) for one image, or a folder for several "
                                 "(default: IMAGE_attention.png in the current folder)")
    p.add_argument("--no-plot", action="store_true", help="print captions only")
    p.add_argument("--device", default="auto")
    p.add_argument("--encoder-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="what the encoder computes in; auto: reduced precision where measured faster at equal "
                        "quality (models.AUTO_PRECISION), else fp32")
    return p.parse_args(argv)


def list_images(args):
    if args.img:
        return args.img
    if not os.path.isdir(args.img_dir):
        raise UserError(f"{args.img_dir}: folder not found")
    names = sorted(n for n in os.listdir(args.img_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise UserError(f"{args.img_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(args.img_dir, n) for n in names]


def figure_paths(out, image_paths):
    """One figure path per image, all different: STEM.png in the --out folder (STEM_attention.png in the
    current folder without --out), or --out itself for a single image and a .png name. Images whose stems
    collide (good.jpg, good.webp) keep their extension (good_jpg.png, good_webp.png), then get a number."""
    if out is not None and len(image_paths) == 1 and out.lower().endswith(".png"):
        return [out]
    stems = [os.path.splitext(os.path.basename(p)) for p in image_paths]
    counts = collections.Counter(stem for stem, _ in stems)
    names, used = [], set()
    for stem, ext in stems:
        name = stem if counts[stem] == 1 else f"{stem}_{ext.lstrip('.').lower()}"
        unique, n = name, 1
        while unique in used:
            n += 1
            unique = f"{name}_{n}"
        used.add(unique)
        names.append(unique)
    if out is None:
        return [f"{name}_attention.png" for name in names]
    return [os.path.join(out, f"{name}.png") for name in names]


@torch.no_grad()
def caption_image(encoder, decoder, word_map, image, beam_size=5, max_len=50, with_beams=False, **rules):
    """image: (3, S, S) uint8 array; rules: beam_search's decoding rules (model_decoding). Returns (words,
    alphas (len(words), num_pixels), grid size), and with with_beams=True also the beam_size best finished
    beams ({tokens, score, log_prob}, best score first)."""
    device = next(decoder.parameters()).device
    features = encoder(torch.from_numpy(image).unsqueeze(0).to(device))  # (1, num_pixels, encoder_dim)
    hyp = beam_search(decoder, features, word_map, beam_size, max_len, **rules)[0]
    rev = {v: k for k, v in word_map.items()}
    words = [rev[i] for i in hyp["tokens"]]
    grid = int(round(features.shape[1] ** 0.5))
    if with_beams:
        return words, hyp["alphas"].float().numpy(), grid, hyp["beams"]
    return words, hyp["alphas"].float().numpy(), grid


def main(argv=None):
    args = parse_args(argv)
    paths = list_images(args)
    checkpoint = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    try:
        encoder, decoder = load_model(checkpoint, device, encoder_precision=args.encoder_precision)
        word_map, size = checkpoint["word_map"], int(checkpoint["config"].get("image_size", 256))
    except KeyError as err:
        raise UserError(f"{args.checkpoint}: not a captioning checkpoint (missing {err})") from None
    failures, plot = 0, not args.no_plot
    figures = figure_paths(args.out, paths)
    if plot:
        try:  # checked once, up front; the captions are still worth having without figures
            if len(figures) == 1:
                writable_file(figures[0], "--out")
            else:
                writable_dir(os.path.dirname(os.path.abspath(figures[0])), "--out")
        except UserError as err:
            print(f"error: {err}; printing captions only", file=sys.stderr)
            failures, plot = 1, False
    for path, figure in zip(paths, figures):
        try:
            image = load_image(path, size)  # (3, size, size) uint8, as in training
            picture = open_rgb(path, draft_size=512)
        except ImageLoadError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
            continue
        words, alphas, grid = caption_image(encoder, decoder, word_map, image, args.beam_size, args.max_len,
                                            **model_decoding(checkpoint["config"], args.length_penalty))
        print(f"{path}: {' '.join(words)}")
        if plot:
            picture.thumbnail((400, 400))
            try:
                hard = checkpoint["config"].get("attention") == "hard"  # draw the chosen cell, not a heat map
                save_figure(attention_figure(picture, words, alphas, grid, hard=hard), figure)
            except OSError as err:  # e.g. the disk filled up: the next images are still captioned
                reason = DISK_ERRORS.get(err.errno) or err.strerror or str(err)
                print(f"error: {figure}: cannot write the figure ({reason})", file=sys.stderr)
                failures += 1
                continue
            print(f"  attention figure: {figure}")
    return 2 if failures else 0


if __name__ == "__main__":
    run_cli(main)
