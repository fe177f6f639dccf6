"""Training throughput on a fixed synthetic batch (a benchmark script, not a test).

    python bench/train_speed.py                                   # ResNet-50, batch 32, 256 px, CPU
    python bench/train_speed.py --encoder efficientnet_lite0 --image-size 224 --encoded-size 0
    python bench/train_speed.py --device cuda --amp --batch-size 80

Prints images/s (one image = one image-caption pair) for:
  1. decoder only, on cached encoder features;
  2. encoder frozen but recomputed every batch;
  3. fine-tuning the encoder's later blocks;
and, for the decoder, W_a a projected once per batch against once per time step.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from models import DecoderWithAttention, Encoder  # noqa: E402
from utils import peak_rss_mb, pick_device  # noqa: E402


def synthetic_batch(batch, image_size, vocab, length, device):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)
    captions = torch.randint(1, vocab - 3, (batch, length + 2), device=device)  # (batch, max_len + 2)
    caplens = torch.randint(length // 2, length + 1, (batch,), device=device)  # (batch,)
    return images, captions, caplens


def per_step_projection_forward(decoder, features, captions, caplens):
    """The decoder loop with W_a a recomputed at every step, as a naive implementation would."""
    caplens, order = caplens.sort(descending=True)
    features, captions = features[order], captions[order]
    steps = int(caplens[0]) - 1
    embeddings = decoder.embedding(captions[:, :steps])  # (batch, steps, embed_dim)
    h, c = decoder.init_hidden_state(features)  # 2 x (batch, decoder_dim)
    hiddens = []
    for t in range(steps):
        n = int((caplens - 1 > t).sum())
        projected = decoder.attention.project_features(features[:n])  # recomputed: (n, num_pixels, attention_dim)
        h, c, _ = decoder.step(embeddings[:n, t], h[:n], c[:n], features[:n], projected)
        hiddens.append(torch.nn.functional.pad(h, (0, 0, 0, len(features) - n)))
    return decoder.word_scores(torch.stack(hiddens, 1)).sum()


def timed(step, iterations, device):
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - start) / iterations


MODES = {"cached": "decoder only, cached features", "per-step": "decoder only, W_a a recomputed every step",
         "frozen": "encoder frozen, recomputed", "fine-tune": "fine-tuning the encoder"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--encoded-size", type=int, default=14)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vocab", type=int, default=2600)
    p.add_argument("--caption-len", type=int, default=14)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which rows to measure")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    device = pick_device(args.device)
    dtype, scaled = train.precision(device, args.amp)  # what train.py --amp uses: fp16 + GradScaler on CUDA

    encoder = Encoder(args.encoder, args.encoded_size, pretrained=False).to(device)
    decoder = DecoderWithAttention(512, 512, 512, args.vocab, encoder_dim=encoder.encoder_dim).to(device)
    images, captions, caplens = synthetic_batch(args.batch_size, args.image_size, args.vocab, args.caption_len, device)
    with torch.no_grad():
        cached = encoder.eval()(images)  # (batch, num_pixels, encoder_dim)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    opt = torch.optim.Adam(list(decoder.parameters()) + [q for q in encoder.parameters()], lr=1e-4)

    def step(fine_tune, use_cache, per_step=False):
        def run():
            encoder.fine_tune(fine_tune)
            encoder.train(fine_tune)
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
            with ctx:
                if per_step:
                    loss = per_step_projection_forward(decoder, cached.float(), captions, caplens)
                else:
                    inputs = cached if use_cache else images
                    loss = train.compute_loss(encoder, decoder, inputs, captions, caplens, use_cache, 1.0)[0]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return run

    print(f"{args.encoder}, {args.image_size} px, batch {args.batch_size}, {device}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, amp {'on (' + str(dtype) + ')' if dtype else 'off'}, "
          f"{torch.get_num_threads()} threads")
    steps = {"cached": step(False, True), "per-step": step(False, True, per_step=True),
             "frozen": step(False, False), "fine-tune": step(True, False)}
    print(f"{'mode':44s} {'images/s':>9s} {'peak mem (MiB)':>15s}")
    results = []
    for mode in args.modes:
        seconds = timed(steps[mode], args.iterations, device)
        mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
        results.append({"mode": mode, "images_per_s": args.batch_size / seconds, "peak_mem_mib": mem,
                        "memory": "GPU" if device.type == "cuda" else "RSS"})
        print(f"{MODES[mode]:44s} {args.batch_size / seconds:9.1f} {mem:15.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"encoder": args.encoder, "amp": bool(dtype), "device": str(device), "rows": results}, f)


if __name__ == "__main__":
    main()
