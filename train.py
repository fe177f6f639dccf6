"""Train the Show, Attend and Tell captioner.

    python train.py                     # the built-in demo: prepare the shapes set, train, evaluate (CPU, minutes)
    python train.py --data-folder data/flickr8k --encoder efficientnet_lite0 --encoded-size 0
    python train.py --resume runs/NAME/best.pt --fine-tune-encoder      # second phase
    torchrun --nproc_per_node=2 train.py --data-folder ...               # DistributedDataParallel

While the encoder is frozen, every image is encoded once and its features are cached, so epochs
only run the decoder. Models are selected on VAL BLEU-4 from free-running (beam) decoding.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import random
import time

import h5py
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from dataset import CaptionDataset, ImageDataset, find_data_name
from decoding import beam_search, decode_batches, sample_captions
from eval import reference_sentences
from metrics import CiderD, score_captions
from models import build_decoder, build_encoder
from utils import (AverageMeter, UserError, decode_tokens, load_checkpoint, peak_rss_mb, pick_device, progress,
                   read_json, run_cli, save_checkpoint)

MODEL_KEYS = ("encoder", "feature_stride", "encoded_size", "pretrained", "encoder_weights", "emb_dim", "attention_dim",
              "decoder_dim", "dropout")
# `python train.py` with no --data-folder: a CPU-sized run on the built-in shapes set
# Stride-16 features (14 x 14 at 224 px) keep attention on the object being named; the doubly stochastic
# term is off because it pushes attention away from an object once it has been looked at.
SHAPES_DEMO = {"data_folder": os.path.join("data", "shapes"), "encoder": "efficientnet_lite0", "feature_stride": 16,
               "encoded_size": 0, "emb_dim": 128, "attention_dim": 128, "decoder_dim": 256, "dropout": 0.2,
               "epochs": 12, "batch_size": 32, "decoder_lr": 2e-3, "alpha_c": 0.0, "val_beam_size": 1,
               "out_dir": os.path.join("runs", "shapes")}
SHAPES_IMAGE_SIZE = 224


class TrainingDiverged(UserError):
    exit_code = 1


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data-folder", help="folder written by create_input_files.py (default: the shapes demo)")
    d.add_argument("--data-name", help="base name of the prepared files (default: the folder's only one)")
    m = p.add_argument_group("model")
    m.add_argument("--encoder", default="resnet50", choices=["resnet50", "resnet101", "resnet152", "efficientnet_lite0"])
    m.add_argument("--feature-stride", type=int, default=32, choices=[16, 32],
                   help="take the CNN's features at stride 32 (last block) or 16 (finer grid, less semantic)")
    m.add_argument("--encoded-size", type=int, default=14, help="pool features to this grid (0: keep the CNN's own)")
    m.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random encoder weights")
    m.add_argument("--encoder-weights", help="load the encoder's ImageNet weights from this file")
    m.add_argument("--emb-dim", type=int, default=512)
    m.add_argument("--attention-dim", type=int, default=512)
    m.add_argument("--decoder-dim", type=int, default=512)
    m.add_argument("--dropout", type=float, default=0.5)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=120)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--decoder-lr", type=float, default=4e-4)
    t.add_argument("--encoder-lr", type=float, default=1e-4)
    t.add_argument("--grad-clip", type=float, default=5.0)
    t.add_argument("--alpha-c", type=float, default=1.0, help="weight of the doubly stochastic attention term")
    t.add_argument("--lr-patience", type=int, default=8, help="decay the LR after this many epochs without improvement")
    t.add_argument("--lr-decay", type=float, default=0.8)
    t.add_argument("--early-stop", type=int, default=20, help="stop after this many epochs without improvement")
    t.add_argument("--fine-tune-encoder", action="store_true", help="also train the encoder's later blocks")
    t.add_argument("--resume", help="checkpoint to continue from")
    t.add_argument("--amp", action="store_true", help="mixed precision: bf16 (or fp16 + GradScaler) on CUDA, bf16 on CPU")
    t.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers (images are read from HDF5)")
    t.add_argument("--cache", default="ram", choices=["ram", "disk", "off"],
                   help="frozen encoder: keep features in RAM, in an HDF5 file in --out-dir, or recompute them")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=int, help="stop each epoch after this many batches (quick trials)")
    t.add_argument("--max-minutes", type=float,
                   help="wall-time budget from the start of the run (feature caching included): "
                        "no epoch starts that would end past it")
    s = p.add_argument_group("self-critical sequence training (after cross-entropy)")
    s.add_argument("--scst", action="store_true", help="fine-tune the decoder to maximise CIDEr-D (needs --resume)")
    s.add_argument("--scst-samples", type=int, default=5, help="sampled captions per image")
    s.add_argument("--scst-baseline", default="greedy", choices=["greedy", "mean"],
                   help="reward baseline: the greedy caption's CIDEr-D, or the mean of the other samples")
    s.add_argument("--scst-lr", type=float, default=5e-5, help="decoder learning rate during SCST")
    s.add_argument("--scst-max-len", type=int, default=20, help="longest sampled caption")
    v = p.add_argument_group("validation")
    v.add_argument("--val-beam-size", type=int, default=1, help="beam size of the VAL BLEU-4 decoding")
    v.add_argument("--max-decode-len", type=int, default=50)
    v.add_argument("--test-beam-size", type=int, default=3, help="shapes demo: beam size of the final TEST evaluation")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", help="where checkpoints and logs go (default: runs/DATA_NAME)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.demo = args.data_folder is None
    if args.demo:  # options given on the command line still win over the demo's
        given = set(vars(_explicit_args(parser, argv)))
        for key, value in SHAPES_DEMO.items():
            if key not in given:
                setattr(args, key, value)
    return args


def _explicit_args(parser, argv):
    """The options actually typed on the command line."""
    bare = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = action.const
            else:
                kwargs["nargs"] = action.nargs
            bare.add_argument(*action.option_strings, **kwargs)
    return bare.parse_known_args(argv)[0]


# ---------------------------------------------------------------------------
# Distributed helpers: one process per GPU under torchrun; plain single-process otherwise.
# ---------------------------------------------------------------------------


def setup_distributed(device_name):
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, pick_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def barrier(world):
    if world > 1:
        dist.barrier()


def broadcast(value, world):
    """Rank 0's value, on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(module):
    return module.module if isinstance(module, DistributedDataParallel) else module


# ---------------------------------------------------------------------------
# Data: cached features while the encoder is frozen, images otherwise.
# ---------------------------------------------------------------------------


class FeatureCache:
    """Encoder features of every image of a split, in RAM (float16) or in an HDF5 file."""

    def __init__(self, encoder, data_folder, data_name, split, device, batch_size, workers, disk_path=None):
        images = ImageDataset(data_folder, data_name, split)
        loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
        self.file, self.tensor = None, None
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for batch, indices in progress(loader, desc=f"caching {split} features", unit="batch"):
                feats = encoder(batch.to(device)).half().cpu()  # (batch, num_pixels, encoder_dim)
                if self.tensor is None and self.file is None:
                    shape = (len(images),) + tuple(feats.shape[1:])
                    if disk_path:
                        self.file = stack.enter_context(h5py.File(disk_path, "w"))
                        self.file.create_dataset("features", shape, dtype="float16", chunks=(1,) + shape[1:])
                    else:
                        self.tensor = torch.empty(shape, dtype=torch.float16)  # (num_images, num_pixels, encoder_dim)
                if disk_path:
                    self.file["features"][int(indices[0]) : int(indices[-1]) + 1] = feats.numpy()
                else:
                    self.tensor[indices] = feats
        if disk_path:
            self.file = h5py.File(disk_path, "r")["features"]

    def __len__(self):
        return len(self.tensor) if self.tensor is not None else self.file.shape[0]

    def __getitem__(self, image_index):
        """image_index (batch,) -> (batch, num_pixels, encoder_dim) float16."""
        if self.tensor is not None:
            return self.tensor[image_index]
        order, inverse = torch.unique(image_index, return_inverse=True)  # h5py wants increasing indices
        return torch.from_numpy(self.file[order.numpy()])[inverse]

    def image_batches(self, batch_size):
        """(features, image indices) batches over every image, for decoding."""
        for first in range(0, len(self), batch_size):
            index = torch.arange(first, min(first + batch_size, len(self)))
            yield self[index], index


def epoch_order(num_items, epoch, seed, rank, world):
    """This rank's shuffled item indices for `epoch`: the same on every run, so resuming is exact."""
    if world > 1:
        sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.tensor(list(RandomSampler(range(num_items), generator=generator)))


def caption_batches(dataset, order, batch_size, cache, workers):
    """Yield (inputs, captions, caplens): inputs are cached features if `cache` is set, else uint8 images."""
    if cache is not None:
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]  # (batch,) caption indices
            yield cache[idx // dataset.cpi], dataset.captions[idx], dataset.caplens[idx]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=workers)
        for batch in loader:
            yield batch[0], batch[1], batch[2].view(-1)


# ---------------------------------------------------------------------------
# Loss, one training epoch, validation
# ---------------------------------------------------------------------------


def compute_loss(encoder, decoder, inputs, captions, caplens, cached, alpha_c):
    """Teacher-forced cross-entropy plus the doubly stochastic attention regulariser (paper eq. 14).
    Returns (loss, scores (n, vocab), targets (n,)) where n counts the real, unpadded words."""
    # EXERCISE 5 >>> Teacher forcing loss: run the decoder on the true caption, score each next word, add the attention term.
    # Hint: targets are captions[:, 1:]; skip padded steps (step t is real while t < decode_length);
    #       penalty = mean over batch and pixels of (1 - sum over steps of alpha) ** 2.
    # Paper: eq. (14) L = -log p(y|x) + lambda * sum_i (1 - sum_t alpha_ti) ** 2
    features = inputs.float() if cached else encoder(inputs)  # (batch, num_pixels, encoder_dim)
    # scores (batch, steps, vocab), captions sorted by length, decode_lengths (batch,), alphas (batch, steps, num_pixels)
    scores, captions, decode_lengths, alphas, _ = decoder(features, captions, caplens)
    targets = captions[:, 1 : scores.shape[1] + 1]  # (batch, steps): the word after each input word
    steps = torch.arange(scores.shape[1], device=scores.device)  # (steps,)
    mask = steps.unsqueeze(0) < decode_lengths.unsqueeze(1)  # (batch, steps): True on real words
    scores, targets = scores[mask], targets[mask]  # (n, vocab), (n,)
    cross_entropy = F.cross_entropy(scores.float(), targets)
    # every pixel should receive about one unit of attention over the whole caption
    attention_penalty = ((1.0 - alphas.sum(dim=1)) ** 2).mean()  # alphas.sum(1): (batch, num_pixels)
    return cross_entropy + alpha_c * attention_penalty, scores, targets
    # <<< EXERCISE 5


def top5_accuracy(scores, targets):
    top5 = scores.topk(5, dim=1).indices  # (n, 5)
    return (top5 == targets.unsqueeze(1)).any(dim=1).float().mean().item() * 100.0


def train_one_epoch(run, epoch):
    """One pass over TRAIN. Returns {'loss', 'top5', 'img_per_s'}."""
    encoder, decoder = run.encoder, run.decoder
    decoder.train()
    encoder.train(run.fine_tune)
    order = epoch_order(len(run.train_set), epoch, run.args.seed, run.rank, run.world)  # (captions,) this rank's
    batches = caption_batches(run.train_set, order, run.args.batch_size, run.train_cache, run.args.workers)
    total = math.ceil(len(order) / run.args.batch_size)
    if run.args.max_steps:
        total = min(total, run.args.max_steps)
    losses, top5s, seen, start = AverageMeter(), AverageMeter(), 0, time.time()
    bar = progress(itertools.islice(batches, total), total=total, desc=f"epoch {epoch}", unit="batch",
                   disable=run.rank != 0)
    for step, (inputs, captions, caplens) in enumerate(bar):
        inputs = inputs.to(run.device)  # (batch, num_pixels, encoder_dim) cached features or (batch, 3, S, S) images
        captions, caplens = captions.to(run.device), caplens.to(run.device)  # (batch, max_len + 2), (batch,)
        with run.autocast():
            loss, scores, targets = compute_loss(encoder, decoder, inputs, captions, caplens,
                                                 run.train_cache is not None, run.args.alpha_c)  # (), (n, vocab), (n,)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at epoch {epoch}, batch {step}: stopped. The last good checkpoint "
                f"({os.path.join(run.out_dir, 'last.pt')}) is intact; try a lower --decoder-lr or run without --amp")
        optimisation_step(run, loss)
        losses.update(loss.item(), len(targets))
        top5s.update(top5_accuracy(scores, targets), len(targets))
        seen += len(captions)
        bar.set_postfix(refresh=False, loss=f"{losses.avg:.3f}", img_s=f"{seen / (time.time() - start):.0f}")
    return {"loss": losses.avg, "top5": top5s.avg, "img_per_s": seen * run.world / (time.time() - start)}


def optimisation_step(run, loss):
    """Backpropagate, clip the gradient norm, update every optimiser."""
    # EXERCISE 6 >>> Backpropagate the loss, clip gradients to run.args.grad_clip, and step every optimiser.
    # Hint: zero_grad first; with mixed precision go through run.scaler (scale, unscale_, step, update);
    #       clip over run.trainable_parameters.
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    for opt in run.optimizers:
        run.scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(run.trainable_parameters, run.args.grad_clip)
    for opt in run.optimizers:
        run.scaler.step(opt)
    run.scaler.update()
    # <<< EXERCISE 6


def scst_one_epoch(run, epoch):
    """Self-critical sequence training (Rennie et al., 2017): REINFORCE with the CIDEr-D of sampled
    captions as reward and the greedy caption's CIDEr-D (or the other samples' mean) as baseline."""
    decoder, args, n = run.decoder, run.args, run.args.scst_samples
    order = epoch_order(len(run.train_cache), epoch, args.seed, run.rank, run.world)  # image indices
    total = math.ceil(len(order) / args.batch_size)
    if args.max_steps:
        total = min(total, args.max_steps)
    losses, rewards, baselines = AverageMeter(), AverageMeter(), AverageMeter()
    seen, reward_seconds, start = 0, 0.0, time.time()
    bar = progress(range(total), desc=f"SCST epoch {epoch}", unit="batch")
    for step in bar:
        images = order[step * args.batch_size : (step + 1) * args.batch_size]  # (batch,) image indices
        features = run.train_cache[images].float().to(run.device)  # (batch, num_pixels, encoder_dim)
        decoder.train()
        with run.autocast():
            tokens, log_probs, mask = sample_captions(decoder, features, run.word_map, n, args.scst_max_len)  # (batch * n, steps) x3
        tic = time.time()
        keys = images.repeat_interleave(n).tolist()  # the image of each sample
        sampled = [sentence(run, row) for row in tokens.tolist()]
        reward = torch.tensor(run.cider.scores(keys, sampled)).view(-1, n)  # (batch, n)
        baseline = scst_baseline(run, features, images, reward)  # (batch, n)
        reward_seconds += time.time() - tic
        advantage = (reward - baseline).view(-1, 1).to(run.device)  # (batch * n, 1)
        loss = -(advantage * log_probs * mask).sum() / mask.sum()
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"SCST loss became {loss.item()} at epoch {epoch}, batch {step}: stopped; "
                                   f"{os.path.join(run.out_dir, 'last.pt')} is intact; try a lower --scst-lr")
        optimisation_step(run, loss)
        losses.update(loss.item(), len(images))
        rewards.update(reward.mean().item(), len(images))
        baselines.update(baseline.mean().item(), len(images))
        seen += len(images)
        bar.set_postfix(refresh=False, reward=f"{rewards.avg:.3f}", img_s=f"{seen / (time.time() - start):.0f}")
    seconds = time.time() - start
    return {"loss": losses.avg, "reward": rewards.avg, "baseline": baselines.avg,
            "img_per_s": seen / seconds, "reward_share": reward_seconds / seconds}


def sentence(run, token_ids):
    return " ".join(run.rev_word_map[i] for i in token_ids if i not in (0, run.word_map["<end>"]))


def scst_baseline(run, features, images, reward):
    """(batch, n) baseline for each sample's reward."""
    n = reward.shape[1]
    if run.args.scst_baseline == "mean":  # leave-one-out mean of the other samples
        return (reward.sum(1, keepdim=True) - reward) / (n - 1)
    run.decoder.eval()
    with torch.no_grad(), run.autocast():
        greedy = beam_search(run.decoder, features, run.word_map, 1, run.args.scst_max_len, constrained=True)
    run.decoder.train()
    captions = [" ".join(run.rev_word_map[i] for i in g["tokens"]) for g in greedy]
    return torch.tensor(run.cider.scores(images.tolist(), captions)).view(-1, 1).expand(-1, n)


@torch.no_grad()
def validate(run):
    """VAL teacher-forced loss and top-5 accuracy, and BLEU-1..4 of free-running beam decoding."""
    encoder, decoder = run.encoder.eval(), unwrap(run.decoder).eval()
    losses, top5s = AverageMeter(), AverageMeter()
    order = torch.arange(len(run.val_set))
    # EXERCISE 7 >>> The validation loop: average the teacher-forced loss and top-5 accuracy over VAL, weighted by words.
    # Hint: like training but without gradients or optimiser steps; batches come from caption_batches(...)
    #       with run.val_cache; update the meters with len(targets) as the weight.
    for inputs, captions, caplens in caption_batches(run.val_set, order, run.args.batch_size, run.val_cache,
                                                     run.args.workers):
        inputs = inputs.to(run.device)  # (batch, num_pixels, encoder_dim) cached features or (batch, 3, S, S) images
        captions, caplens = captions.to(run.device), caplens.to(run.device)  # (batch, max_len + 2), (batch,)
        with run.autocast():
            loss, scores, targets = compute_loss(encoder, decoder, inputs, captions, caplens,
                                                 run.val_cache is not None, run.args.alpha_c)  # (), (n, vocab), (n,)
        losses.update(loss.item(), len(targets))
        top5s.update(top5_accuracy(scores, targets), len(targets))
    # <<< EXERCISE 7
    hyps = decode_split(run, encoder, decoder, "VAL")
    scores = score_captions(run.val_refs, hyps, metrics=("Bleu", "CIDEr"), quiet=True)
    return {"val_loss": losses.avg, "val_top5": top5s.avg, **{f"val_{k}": v for k, v in scores.items()}}


def decode_split(run, encoder, decoder, split):
    """{image index: caption string} for every image of VAL, by beam search."""
    if run.val_cache is not None:
        batches, features_given = run.val_cache.image_batches(64), True
    else:
        batches = DataLoader(ImageDataset(run.data_folder, run.data_name, split), batch_size=64,
                             num_workers=run.args.workers)
        features_given = False
    with run.autocast():
        hyps = decode_batches(encoder, decoder, batches, run.word_map, run.args.val_beam_size,
                              run.args.max_decode_len, device=run.device, desc=f"decoding {split}",
                              features_given=features_given,
                              constrained=run.config.get("constrained_decoding", False))
    return {i: " ".join(decode_tokens(h["tokens"], run.rev_word_map, run.word_map)) for i, h in hyps.items()}


# ---------------------------------------------------------------------------
# Checkpoints, logs, curves
# ---------------------------------------------------------------------------


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def checkpoint_state(run, epoch):
    return {
        "config": run.config, "word_map": run.word_map, "epoch": epoch,
        "encoder": run.encoder.state_dict(), "decoder": unwrap(run.decoder).state_dict(),
        "decoder_optimizer": run.decoder_opt.state_dict(),
        "encoder_optimizer": run.encoder_opt.state_dict() if run.encoder_opt else None,
        "scaler": run.scaler.state_dict(), "phase": run.phase, "select_on": run.select_on,
        "best_score": run.best_score,
        "epochs_since_improvement": run.epochs_since_improvement, "history": run.history,
        "rng": rng_state(), "data_folder": run.data_folder, "data_name": run.data_name,
        "args": {k: v for k, v in vars(run.args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }


def write_logs(out_dir, history):
    with open(os.path.join(out_dir, "log.jsonl.tmp"), "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    os.replace(os.path.join(out_dir, "log.jsonl.tmp"), os.path.join(out_dir, "log.jsonl"))
    plot_curves(history, os.path.join(out_dir, "curves.png"))


def plot_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    xe = [h for h in history if "reward" not in h]  # cross-entropy epochs (SCST epochs log a reward instead)
    scst = [h for h in history if "reward" in h]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot([h["epoch"] for h in xe], [h["loss"] for h in xe], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    axes[0].set_title("cross-entropy loss")
    axes[1].plot([h["epoch"] for h in xe], [h["top5"] for h in xe], "o-", label="train")
    axes[1].plot(epochs, [h["val_top5"] for h in history], "o-", label="val")
    axes[1].set_title("top-5 accuracy (%)")
    axes[2].plot(epochs, [h.get("val_Bleu_4", 0) for h in history], "o-", color="C2", label="val BLEU-4")
    axes[2].set_title("free-running decoding")
    cider = axes[2].twinx()
    cider.plot(epochs, [h.get("val_CIDEr", 0) for h in history], "s-", color="C3", label="val CIDEr (right)")
    if scst:
        cider.plot([h["epoch"] for h in scst], [h["reward"] for h in scst], "--", color="C4",
                   label="SCST train reward (right)")
        for ax in axes:
            ax.axvline(scst[0]["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    lines = axes[2].get_legend_handles_labels()
    more = cider.get_legend_handles_labels()
    axes[2].legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Setting up a run
# ---------------------------------------------------------------------------


class Run:
    """Everything one training run holds: data, model, optimisers, state."""


def prepare_demo_data(args, rank, world):
    """The shapes demo: prepare data/shapes once."""
    name = "shapes_5_cap_per_img_5_min_word_freq"
    if not os.path.exists(os.path.join(args.data_folder, f"WORDMAP_{name}.json")) and rank == 0:
        print(f"No prepared data in {args.data_folder}: preparing the built-in shapes set first.")
        import create_input_files

        create_input_files.prepare(create_input_files.parse_args(
            ["--dataset", "shapes", "--output-folder", args.data_folder, "--image-size", str(SHAPES_IMAGE_SIZE),
             "--image-folder", os.path.join("data", "shapes_raw")]))
    barrier(world)
    return name


def setup_run(args):
    run = Run()
    run.args = args
    run.started = time.time()  # --max-minutes counts from here, so feature caching is inside the budget
    run.rank, run.world, run.device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run.data_folder = args.data_folder
    run.data_name = prepare_demo_data(args, run.rank, run.world) if args.demo else (
        args.data_name or find_data_name(args.data_folder))
    run.out_dir = args.out_dir or os.path.join("runs", run.data_name)
    word_map = read_json(os.path.join(run.data_folder, f"WORDMAP_{run.data_name}.json"))

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        run.config = checkpoint["config"]
        if checkpoint["word_map"] != word_map:
            raise UserError(f"{args.resume} was trained with another word map than {run.data_folder}'s; "
                            "prepare the data with --word-map from that run")
    else:
        run.config = {k: getattr(args, k) for k in MODEL_KEYS}
    run.word_map, run.rev_word_map = word_map, {v: k for k, v in word_map.items()}
    run.fine_tune = args.fine_tune_encoder
    run.phase = "scst" if args.scst else ("xe_fine_tune" if run.fine_tune else "xe")
    run.select_on = "CIDEr" if args.scst else "Bleu_4"
    if args.scst:
        check_scst_options(args, run.world)
        run.config = dict(run.config, constrained_decoding=True)  # decode as it was trained

    run.encoder = build_encoder(run.config, pretrained=checkpoint is None and run.config["pretrained"]).to(run.device)
    run.decoder = build_decoder(run.config, len(word_map)).to(run.device)
    if checkpoint is not None:
        run.encoder.load_state_dict(checkpoint["encoder"])
        run.decoder.load_state_dict(checkpoint["decoder"])
    run.encoder.fine_tune(run.fine_tune)

    run.decoder_opt = torch.optim.Adam(run.decoder.parameters(), lr=args.scst_lr if args.scst else args.decoder_lr)
    run.encoder_opt = torch.optim.Adam([p for p in run.encoder.parameters() if p.requires_grad],
                                       lr=args.encoder_lr) if run.fine_tune else None
    run.optimizers = [o for o in (run.decoder_opt, run.encoder_opt) if o is not None]
    run.trainable_parameters = [p for p in list(run.decoder.parameters()) + list(run.encoder.parameters())
                                if p.requires_grad]
    setup_precision(run, args.amp)

    run.start_epoch, run.best_score, run.epochs_since_improvement, run.history = 0, -1.0, 0, []
    if checkpoint is not None:
        restore_training_state(run, checkpoint)

    if run.world > 1:
        run.decoder = DistributedDataParallel(run.decoder)
        if run.fine_tune:
            run.encoder = DistributedDataParallel(run.encoder)
    setup_data(run)
    if checkpoint is not None:  # last: building the caches draws from the RNG too
        set_rng_state(checkpoint["rng"])
    return run


def check_scst_options(args, world):
    if not args.resume:
        raise UserError("--scst continues a cross-entropy model: give it with --resume CHECKPOINT")
    if args.fine_tune_encoder or args.cache == "off" or world > 1:
        raise UserError("--scst trains the decoder alone on cached features, in one process "
                        "(no --fine-tune-encoder, --cache off or torchrun)")
    if args.scst_samples < 1 or (args.scst_baseline == "mean" and args.scst_samples < 2):
        raise UserError("--scst-samples must be at least 1 (at least 2 with --scst-baseline mean)")


def restore_training_state(run, checkpoint):
    same_phase = checkpoint["phase"] == run.phase
    if same_phase:  # a new phase (frozen -> fine-tuning -> SCST) starts with fresh optimisers
        run.decoder_opt.load_state_dict(checkpoint["decoder_optimizer"])
        if run.encoder_opt is not None:
            run.encoder_opt.load_state_dict(checkpoint["encoder_optimizer"])
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.start_epoch = checkpoint["epoch"] + 1
    # a new selection metric (BLEU-4 -> CIDEr for SCST) starts a new "best"
    run.best_score = checkpoint["best_score"] if checkpoint["select_on"] == run.select_on else -1.0
    run.epochs_since_improvement = checkpoint["epochs_since_improvement"] if same_phase else 0
    run.history = list(checkpoint["history"])


def setup_precision(run, amp):
    dtype = None
    if amp:
        on_cuda = run.device.type == "cuda"
        dtype = torch.bfloat16 if not on_cuda or torch.cuda.is_bf16_supported() else torch.float16
    run.autocast = (lambda: torch.autocast(run.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    run.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def setup_data(run):
    args = run.args
    run.train_set = CaptionDataset(run.data_folder, run.data_name, "TRAIN")
    run.val_set = CaptionDataset(run.data_folder, run.data_name, "VAL")
    run.val_refs = reference_sentences(run.data_folder, run.data_name, "VAL", len(run.val_set) // run.val_set.cpi)
    run.config.setdefault("image_size", run.train_set.h5.image_size)  # caption.py resizes new images to this
    run.train_cache = run.val_cache = None
    if not run.fine_tune and args.cache != "off":
        run.encoder.eval()
        disk = args.cache == "disk"
        if disk:
            os.makedirs(run.out_dir, exist_ok=True)
        for split in ("TRAIN", "VAL"):
            path = os.path.join(run.out_dir, f"features_{split}_rank{run.rank}.hdf5") if disk else None
            cache = FeatureCache(run.encoder, run.data_folder, run.data_name, split, run.device, 32,
                                 args.workers, path)
            setattr(run, "train_cache" if split == "TRAIN" else "val_cache", cache)
    if args.scst:
        refs = reference_sentences(run.data_folder, run.data_name, "TRAIN", len(run.train_set) // run.train_set.cpi)
        run.cider = CiderD(refs)  # document frequencies from TRAIN references, once


# ---------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------


def end_of_epoch(run, epoch, stats):
    """Select on VAL BLEU-4, adjust the LR, save checkpoints and logs. Returns True to stop early."""
    score = stats.get(f"val_{run.select_on}", 0.0)
    improved = score > run.best_score
    if improved:
        run.best_score, run.epochs_since_improvement = score, 0
    else:
        run.epochs_since_improvement += 1
        if run.epochs_since_improvement % run.args.lr_patience == 0:
            for opt in run.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= run.args.lr_decay
            print(f"  no improvement for {run.epochs_since_improvement} epochs: learning rates x{run.args.lr_decay}")
    run.history.append({"epoch": epoch, **stats, "lr": run.decoder_opt.param_groups[0]["lr"]})
    state = checkpoint_state(run, epoch)
    os.makedirs(run.out_dir, exist_ok=True)
    save_checkpoint(os.path.join(run.out_dir, "last.pt"), state)
    if improved:
        save_checkpoint(os.path.join(run.out_dir, "best.pt"), state)
    write_logs(run.out_dir, run.history)
    train_part = f"reward {stats['reward']:.3f}" if "reward" in stats else f"top-5 {stats['top5']:.1f}%"
    print(f"epoch {epoch}: loss {stats['loss']:.3f}, {train_part}, val loss {stats['val_loss']:.3f}, "
          f"val top-5 {stats['val_top5']:.1f}%, val BLEU-4 {stats.get('val_Bleu_4', 0):.4f}, "
          f"val CIDEr {stats.get('val_CIDEr', 0):.4f}{' (best ' + run.select_on + ')' if improved else ''}, "
          f"{stats['img_per_s']:.0f} img/s")
    return run.epochs_since_improvement >= run.args.early_stop


def train(run):
    tensorboard = open_tensorboard(run) if run.rank == 0 else None
    start = time.time()
    for epoch in range(run.start_epoch, run.args.epochs):
        epoch_start = time.time()
        stats = (scst_one_epoch if run.args.scst else train_one_epoch)(run, epoch)
        stop = False
        if run.rank == 0:
            stats.update(validate(run))
            stats["minutes"] = (time.time() - start) / 60
            stats["peak_rss_mb"] = peak_rss_mb()
            stop = end_of_epoch(run, epoch, stats)
            if tensorboard is not None:
                for key, value in stats.items():
                    tensorboard.add_scalar(key, value, epoch)
            if stop:
                print(f"no improvement for {run.args.early_stop} epochs: stopping early")
            elif run.args.max_minutes and out_of_time(run, epoch_start):
                print(f"another epoch would pass --max-minutes {run.args.max_minutes:g}: stopping")
                stop = True
        if broadcast(stop, run.world):
            break


def out_of_time(run, epoch_start):
    """Would another epoch as long as the last one end past --max-minutes, counted from the run's start?"""
    now = time.time()
    return (now - run.started) + (now - epoch_start) > run.args.max_minutes * 60


def open_tensorboard(run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(os.path.join(run.out_dir, "tensorboard"))


def finish_demo(run):
    """Evaluate the best shapes model on TEST and say what to try next."""
    from eval import evaluate

    best = os.path.join(run.out_dir, "best.pt")
    evaluate(best, run.data_folder, run.data_name, "TEST", [run.args.test_beam_size], batch_size=64,
             device=run.device, out=os.path.join(run.out_dir, "test_results.json"))
    example = os.path.join("data", "shapes_raw", "images", "shapes_01750.png")
    print(f"\nNext, caption an image and draw its attention:\n  python caption.py --checkpoint {best} "
          f"--img {example} --out attention.png")


def main(argv=None):
    args = parse_args(argv)
    run = setup_run(args)
    if run.rank == 0:
        cached = "features cached" if run.train_cache is not None else "encoder run every batch"
        print(f"Training on {run.data_name} ({len(run.train_set)} captions) with {run.config['encoder']} "
              f"({'fine-tuned' if run.fine_tune else 'frozen'}, {cached}) on {run.device}; output in {run.out_dir}")
    try:
        train(run)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; continue with: python train.py --resume {os.path.join(run.out_dir, 'last.pt')} "
                        "(plus the same options)") from None
    if run.rank == 0 and args.demo:
        finish_demo(run)
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
