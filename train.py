"""Train the Show, Attend and Tell captioner.

    python train.py                     # the built-in demo: prepare the shapes set, train, evaluate (CPU, minutes)
    python train.py --data-folder data/flickr8k --encoder efficientnet_lite0 --encoded-size 0
    python train.py --resume runs/NAME/best.pt --fine-tune-encoder      # second phase
    python train.py --resume runs/NAME/best.pt --scst                   # third phase: self-critical (scst.py)
    torchrun --nproc_per_node=2 train.py --data-folder ...               # DistributedDataParallel

While the encoder is frozen, every image is encoded once and its features are cached (features.py),
so epochs only run the decoder. Cross-entropy models are selected on VAL BLEU-4 from free-running
(beam) decoding; SCST models on VAL CIDEr.
"""
import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import random
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import shapes
from checkpoints import (MODEL_KEYS, RESUME_KEYS, checkpoint_state, load_checkpoint, repair_best,
                         restore_training_state, resumes_in_its_own_folder, save_epoch, set_rng_state)
from dataset import CaptionDataset, ImageDataset, find_data_name, reference_sentences, snapshot_folder
from decoding import decode_batches, model_decoding
from features import (FeatureCache, FinishedFeatures, Mirror, caption_batches, configure_encoding, default_cache_dir,
                      epoch_order, loader_options, mirror_flags, to_device)
from hard_attention import (BASELINE_DECAY, ENTROPY_WEIGHT, EXPECTED_CONTEXT_PROB, HARD_INFERENCE,
                            REINFORCE_WEIGHT, MovingBaseline, hard_attention_loss)
from metrics import score_captions
from models import ENCODERS, EncoderTop, build_decoder, build_encoder, load_weights
from scst import CiderD, add_scst_options, check_scst_options, scst_one_epoch
from utils import (AverageMeter, TrainingDiverged, UserError, broadcast, decode_tokens, folder_lock, non_negative_float,
                   non_negative_int, peak_rss_mb, positive_float, positive_int, prepared_name, probability, progress,
                   read_json, remove_leftovers, run_cli, setup_distributed, writable_dir)

CONFIG_OPTIONS = ("encoder", "feature_stride", "encoded_size", "input_size", "pretrained", "encoder_weights", "emb_dim",
                  "attention_dim", "decoder_dim", "dropout", "attention", "hard_inference", "hard_expected_prob")  # the options that shape the model: kept in its config


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data-folder", help="folder written by create_input_files.py (default: the shapes demo)")
    d.add_argument("--data-name", help="base name of the prepared files (default: the folder's only one)")
    m = p.add_argument_group("model")
    m.add_argument("--encoder", default="resnet50", choices=list(ENCODERS))
    m.add_argument("--input-size", type=non_negative_int, default=0,
                   help="resize images to this size before the CNN (0: as prepared); e.g. 260 for efficientnet_lite2, "
                        "its ImageNet resolution")
    m.add_argument("--feature-stride", type=int, default=32, choices=[16, 32],
                   help="take the CNN's features at stride 32 (last block) or 16 (finer grid, less semantic)")
    m.add_argument("--encoded-size", type=non_negative_int, default=14, help="pool features to this grid (0: keep the CNN's own)")
    m.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random encoder weights")
    m.add_argument("--encoder-weights", help="load the encoder's ImageNet weights from this file")
    m.add_argument("--emb-dim", type=positive_int, default=512)
    m.add_argument("--attention-dim", type=positive_int, default=512)
    m.add_argument("--decoder-dim", type=positive_int, default=512)
    m.add_argument("--dropout", type=probability, default=0.5)
    m.add_argument("--feature-dropout", type=probability,
                   help="dropout on the image features in cross-entropy training (default 0, or the resumed "
                        "checkpoint's): against a frozen encoder's fixed features being learnt by heart")
    m.add_argument("--attention", default="soft", choices=["soft", "hard"],
                   help="soft: the expected context (section 4.2); hard: one sampled location per step, trained "
                        "with REINFORCE (section 4.1, hard_attention.py)")
    h = p.add_argument_group("hard attention (--attention hard; defaults from the paper, see hard_attention.py)")
    h.add_argument("--hard-inference", default="expected", choices=list(HARD_INFERENCE),
                   help="context when decoding: the expected one, or the most likely location's")
    h.add_argument("--hard-expected-prob", type=probability, default=EXPECTED_CONTEXT_PROB,
                   help="probability that a training step uses the expected context instead of a sample")
    h.add_argument("--reinforce-weight", type=non_negative_float, default=REINFORCE_WEIGHT, help="lambda_r of eq. (12)")
    h.add_argument("--entropy-weight", type=non_negative_float, default=ENTROPY_WEIGHT, help="lambda_e of eq. (12)")
    h.add_argument("--baseline-decay", type=probability, default=BASELINE_DECAY,
                   help="decay of the moving-average reward baseline")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=120)
    t.add_argument("--batch-size", type=positive_int, default=32)
    t.add_argument("--decoder-lr", type=positive_float, default=4e-4)
    t.add_argument("--encoder-lr", type=positive_float, default=1e-4)
    t.add_argument("--grad-clip", type=positive_float, default=5.0)
    t.add_argument("--label-smoothing", type=probability, default=0.0,
                   help="cross-entropy label smoothing for soft attention, in [0, 1) (0: none)")
    t.add_argument("--hflip", action="store_true",
                   help="augment TRAIN: each caption sees its photo mirrored left to right with probability 1/2, "
                        "'left' and 'right' swapped (a frozen encoder caches the mirrored photos' features too)")
    t.add_argument("--alpha-c", type=non_negative_float, default=1.0, help="weight of the doubly stochastic attention term")
    t.add_argument("--lr-patience", type=positive_int, default=8, help="decay the LR after this many epochs without improvement")
    t.add_argument("--lr-decay", type=positive_float, default=0.8)
    t.add_argument("--early-stop", type=positive_int, default=20, help="stop after this many epochs without improvement")
    t.add_argument("--lr-step", type=non_negative_int, default=0,
                   help="also multiply the learning rates by --lr-decay every this many epochs (0: never)")
    t.add_argument("--fine-tune-encoder", action="store_true", help="also train the encoder's later blocks")
    t.add_argument("--fine-tune-top", type=non_negative_int, default=0, metavar="N",
                   help="train the encoder's last N blocks (and its head) on top of cached features of the blocks "
                        "below: a fraction of the cost of --fine-tune-encoder")
    t.add_argument("--resume", help="checkpoint to continue from")
    t.add_argument("--amp", action="store_true", help="mixed precision: fp16 with a GradScaler on CUDA, bf16 elsewhere")
    t.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    t.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (images are read from HDF5)")
    t.add_argument("--cache", default="ram", choices=["ram", "disk", "off"],
                   help="frozen encoder: keep features in memory, in an HDF5 file in --cache-dir (reused by later "
                        "runs with the same encoder, weights and data), or recompute them")
    t.add_argument("--cache-dir", help="where --cache disk files go (default: cache/ in --data-folder, "
                                       "or in --out-dir if that folder is read-only)")
    t.add_argument("--encoder-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="what the frozen encoder computes in; auto: reduced precision where measured faster at "
                        "equal quality (models.AUTO_PRECISION), else fp32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=positive_int, help="stop each epoch after this many batches (quick trials)")
    t.add_argument("--max-minutes", type=positive_float,
                   help="wall-time budget from the start of the run (feature caching included): "
                        "no epoch starts that would end past it")
    v = p.add_argument_group("validation")
    v.add_argument("--val-beam-size", type=positive_int, default=1, help="beam size of the VAL BLEU-4 decoding")
    v.add_argument("--select-on", default="auto", choices=["auto", "Bleu_4", "CIDEr"],
                   help="the VAL score that picks best.pt (auto: BLEU-4 for cross-entropy, CIDEr for SCST)")
    v.add_argument("--length-penalty", type=non_negative_float,
                   help="VAL decoding scores a caption by log-probability / length ** this (default: the resumed "
                        "checkpoint's, else 0); recorded in the checkpoints, so eval.py and caption.py decode the same way")
    v.add_argument("--block-trigrams", action="store_true",
                   help="VAL decoding repeats no trigram within a caption; recorded in the checkpoints like --length-penalty")
    v.add_argument("--max-decode-len", type=positive_int, default=50)
    v.add_argument("--test-beam-size", type=positive_int, default=3, help="shapes demo: beam size of the final TEST evaluation")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", help="where checkpoints and logs go (default: runs/DATA_NAME)")
    add_scst_options(p)
    return p


def parse_args(argv=None):
    """Without --data-folder, the shapes preset replaces the defaults (not the options given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.demo = args.data_folder is None
    if args.demo:
        parser.set_defaults(**shapes.PRESET)
        args = parser.parse_args(argv)
        args.demo = True
    args.given = given_options(argv)
    return args


def given_options(argv):
    """The options typed on the command line (not defaults): a resumed run warns about the model options it ignores."""
    parser, unset = build_parser(), object()  # a default no typed value can equal
    parser.set_defaults(**{action.dest: unset for action in parser._actions})
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}


def warn_ignored_model_options(args, config):
    """A resumed model keeps the options that shaped it (its config); say which typed ones differ and are ignored."""
    ignored = [k for k in CONFIG_OPTIONS if k in getattr(args, "given", ()) and getattr(args, k) != config.get(k)]
    for k in ignored:
        print(f"warning: {k}={getattr(args, k)} ignored: {args.resume} was trained with {k}={config.get(k)}, "
              "and a resumed run keeps its model's options", file=sys.stderr)


# ---------------------------------------------------------------------------
# The run state: everything one training run holds, filled in once by setup_run
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    args: argparse.Namespace  # the parsed options
    started: float  # time.time() at the start: --max-minutes counts from here, feature caching included
    rank: int  # this process' rank under torchrun (0 otherwise)
    world: int  # number of processes
    device: torch.device  # where the model runs
    data_folder: str  # the prepared data, as the user named it (checkpoints record this)
    snapshot: str  # the folder of the one whole prepared set this run reads (see dataset.snapshot_folder)
    data_name: str  # base name of its files
    out_dir: str  # checkpoints, logs and curves go here
    config: dict  # the model's architecture options, stored in every checkpoint
    word_map: dict  # word -> id
    rev_word_map: dict  # id -> word
    fine_tune: bool  # are the encoder's later blocks trained?
    top_blocks: int  # --fine-tune-top: the encoder blocks trained on top of the cache (0: none)
    phase: str  # "xe", "xe_fine_tune" or "scst": a new phase starts with fresh optimisers
    select_on: str  # the VAL score that picks best.pt: "Bleu_4" or "CIDEr"
    encoder: torch.nn.Module  # the raw modules: checkpoints, validation and decoding use these
    decoder: torch.nn.Module
    train_encoder: torch.nn.Module  # what training's forward passes call: DDP-wrapped under torchrun
    train_decoder: torch.nn.Module
    decoder_opt: torch.optim.Optimizer
    encoder_opt: Optional[torch.optim.Optimizer]  # None while the encoder is frozen
    optimizers: list  # the optimisers in use
    trainable_parameters: list  # every parameter that is trained (gradient clipping runs over these)
    autocast: Callable  # autocast() -> a context manager: mixed precision with --amp, else a no-op
    scaler: torch.amp.GradScaler  # loss scaling for fp16 on CUDA; a pass-through otherwise
    train_set: CaptionDataset = None
    val_set: CaptionDataset = None
    val_refs: dict = None  # {VAL image index: [reference sentence, ...]}
    train_cache: Optional[FeatureCache] = None  # encoder features, while the encoder is frozen
    mirror_cache: Optional[FeatureCache] = None  # --hflip: the mirrored TRAIN photos' features
    val_cache: Optional[FeatureCache] = None
    cider: Optional[CiderD] = None  # SCST's reward, with TRAIN document frequencies
    start_epoch: int = 0
    best_score: float = -1.0  # best VAL `select_on` so far
    best_epoch: int = -1  # the epoch best.pt holds
    epochs_since_improvement: int = 0
    history: list = dataclasses.field(default_factory=list)  # one dict of statistics per epoch
    hard_baseline: Optional[MovingBaseline] = None  # hard attention's reward baseline b (None for soft)


# ---------------------------------------------------------------------------
# Setting up: processes and devices, model, precision, data
# ---------------------------------------------------------------------------


def precision(device, amp):
    """(autocast dtype or None, use a GradScaler?): fp16 with loss scaling on CUDA, which every CUDA GPU
    runs fast; bf16 elsewhere, whose float32-sized exponent needs no scaling."""
    if not amp:
        return None, False
    return (torch.float16, True) if device.type == "cuda" else (torch.bfloat16, False)


def setup_run(args, stack):
    """Build everything a run holds. `stack` (an ExitStack) keeps the output folder locked until the run ends."""
    started = time.time()
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # image batches have one fixed shape: tune once
    if args.demo:
        data_name = shapes.prepare_demo_data(args.data_folder, rank)
        if world > 1:  # the other ranks wait until rank 0 has prepared it
            dist.barrier()
    else:
        data_name = args.data_name or find_data_name(args.data_folder)
    out_dir = args.out_dir or os.path.join("runs", data_name)
    if rank == 0:  # only rank 0 writes; the lock keeps a second run out of this folder until the first ends
        stack.enter_context(folder_lock(writable_dir(out_dir, "--out-dir"), "train.py"))
        remove_leftovers(out_dir)
    snapshot = snapshot_folder(args.data_folder, data_name)  # read every file from one set, even if re-prepared
    word_map = read_json(os.path.join(snapshot, prepared_name("WORDMAP", data_name)))
    checkpoint = load_checkpoint(args.resume, MODEL_KEYS + RESUME_KEYS) if args.resume else None
    if checkpoint is not None and checkpoint["word_map"] != word_map:
        raise UserError(f"{args.resume} was trained with another word map than {args.data_folder}'s; "
                        "prepare the data with --word-map from that run")
    config = dict(checkpoint["config"]) if checkpoint else {k: getattr(args, k) for k in CONFIG_OPTIONS}
    if checkpoint is not None and rank == 0:
        warn_ignored_model_options(args, config)
    if args.scst:
        check_scst_options(args, world)
        config["constrained_decoding"] = True  # decode as it was trained
    if args.feature_dropout is not None:  # a regulariser, not part of the weights' shape: a resumed run may change it
        config["feature_dropout"] = args.feature_dropout
    if args.length_penalty is not None:  # select on the decoding the model will be used with
        config["length_penalty"] = args.length_penalty
    if args.block_trigrams:
        config["block_trigrams"] = True

    if args.fine_tune_top and args.fine_tune_encoder:
        raise UserError("--fine-tune-top and --fine-tune-encoder exclude each other: choose one")
    if args.label_smoothing and (config.get("attention") == "hard" or args.scst):
        raise UserError("--label-smoothing smooths soft attention's cross-entropy; "
                        "hard attention and --scst train on other objectives")
    encoder = build_encoder(config, pretrained=checkpoint is None and config["pretrained"],
                            top_blocks=args.fine_tune_top).to(device)
    decoder = build_decoder(config, len(word_map)).to(device)
    if checkpoint is not None:
        load_weights(encoder, decoder, checkpoint)
    fine_tune = args.fine_tune_encoder or args.fine_tune_top > 0
    encoder.fine_tune(fine_tune)
    # Under torchrun, training's forward passes go through DDP wrappers, which average the gradients;
    # the raw modules stay for checkpoints and validation, so both look the same with or without torchrun.
    ddp = DistributedDataParallel if dist.is_initialized() else (lambda m: m)
    decoder_opt = torch.optim.Adam(decoder.parameters(), lr=args.scst_lr if args.scst else args.decoder_lr)
    encoder_opt = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad],
                                   lr=args.encoder_lr) if fine_tune else None
    dtype, scaled = precision(device, args.amp)
    run = RunState(
        args=args, started=started, rank=rank, world=world, device=device, data_folder=args.data_folder,
        snapshot=snapshot, data_name=data_name, out_dir=out_dir, config=config,
        word_map=word_map, rev_word_map={v: k for k, v in word_map.items()}, fine_tune=fine_tune,
        phase="scst" if args.scst else ("xe_fine_tune" if fine_tune else "xe"),
        select_on=("CIDEr" if args.scst else "Bleu_4") if args.select_on == "auto" else args.select_on,
        encoder=encoder, decoder=decoder, top_blocks=args.fine_tune_top,
        train_encoder=ddp(encoder) if fine_tune else encoder, train_decoder=ddp(decoder),
        decoder_opt=decoder_opt, encoder_opt=encoder_opt,
        optimizers=[o for o in (decoder_opt, encoder_opt) if o is not None],
        trainable_parameters=[p for p in list(decoder.parameters()) + list(encoder.parameters()) if p.requires_grad],
        autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext,
        scaler=torch.amp.GradScaler(device.type, enabled=scaled))
    if config.get("attention") == "hard":
        run.hard_baseline = MovingBaseline(args.baseline_decay)
    if checkpoint is not None:
        restore_training_state(run, checkpoint)
        if rank == 0:
            repair_best(run, checkpoint)
        check_epochs_left(run)
    setup_data(run)
    if checkpoint is not None:  # last: building the caches draws from the RNG too
        set_rng_state(checkpoint["rng"])
    return run


def check_epochs_left(run):
    """--epochs counts from epoch 0, so a resumed run that has done them trains nothing. In its own folder that only
    repairs best.pt and the log; in a new folder it is a mistake: that folder would get no checkpoint at all."""
    if run.start_epoch < run.args.epochs:
        return
    advice = f"--epochs counts every epoch from 0: give --epochs {run.start_epoch + 1} or more to train on"
    if not resumes_in_its_own_folder(run):
        raise UserError(f"nothing to train: {run.args.resume} has finished epoch {run.start_epoch - 1}, and {advice}")
    if run.rank == 0:
        print(f"note: nothing to train: {run.args.resume} has finished its {run.args.epochs} epochs; {advice}")


def setup_data(run):
    args = run.args
    run.train_set = CaptionDataset(run.snapshot, run.data_name, "TRAIN")
    run.val_set = CaptionDataset(run.snapshot, run.data_name, "VAL")
    run.val_refs = reference_sentences(run.snapshot, run.data_name, "VAL", len(run.val_set) // run.val_set.cpi)
    run.config.setdefault("image_size", run.train_set.h5.image_size)  # caption.py resizes new images to this
    run.encoder.set_precision(args.encoder_precision)
    if (not run.fine_tune or run.top_blocks) and args.cache != "off":
        run.encoder.eval()
        workers = configure_encoding(run.device, args.workers, quiet=run.rank != 0)
        # disk: a file per key (encoder, weights, sizes, precision, prepared file), reused by later runs
        cache_dir = None
        if args.cache == "disk":
            cache_dir = args.cache_dir or default_cache_dir(run.data_folder, run.out_dir)
        run.train_cache, run.val_cache = (
            FeatureCache(run.encoder, run.snapshot, run.data_name, split, run.device, 32, workers,
                         cache_dir=cache_dir, in_memory=args.cache == "ram")
            for split in ("TRAIN", "VAL"))
        if args.hflip:
            run.mirror_cache = FeatureCache(run.encoder, run.snapshot, run.data_name, "TRAIN", run.device, 32,
                                            workers, cache_dir=cache_dir, in_memory=args.cache == "ram", mirrored=True)
        if run.top_blocks:  # the caches hold the bottom's maps: training calls the top alone,
            run.train_encoder = EncoderTop(run.encoder)  # and validation reads finished features
            run.val_cache = FinishedFeatures(run.val_cache, run.encoder)
            if run.world > 1:
                run.train_encoder = DistributedDataParallel(run.train_encoder)
    if args.scst:
        refs = reference_sentences(run.snapshot, run.data_name, "TRAIN", len(run.train_set) // run.train_set.cpi)
        run.cider = CiderD(refs)  # document frequencies from TRAIN references, once


# ---------------------------------------------------------------------------
# Loss, one training epoch
# ---------------------------------------------------------------------------


def compute_loss(encoder, decoder, inputs, captions, caplens, cached, alpha_c, label_smoothing=0.0):
    """Teacher-forced cross-entropy plus the doubly stochastic attention regulariser (paper eq. 14).
    label_smoothing > 0 spreads that share of each target's probability evenly over the vocabulary.
    Returns (loss, scores (n, vocab), targets (n,)) where n counts the real, unpadded words."""
    # EXERCISE 5 >>> Teacher forcing loss: run the decoder on the true caption, score each next word, add the attention term.
    # Hint: targets are captions[:, 1:]; skip padded steps (step t is real while t < decode_length);
    #       penalty = mean over batch and pixels of (1 - sum over steps of alpha) ** 2;
    #       F.cross_entropy takes label_smoothing as a keyword.
    # Paper: eq. (14) L = -log p(y|x) + lambda * sum_i (1 - sum_t alpha_ti) ** 2
    features = inputs.float() if cached else encoder(inputs)  # (batch, num_pixels, encoder_dim)
    # scores (batch, steps, vocab), captions sorted by length, decode_lengths (batch,), alphas (batch, steps, num_pixels)
    scores, captions, decode_lengths, alphas, _ = decoder(features, captions, caplens)
    targets = captions[:, 1 : scores.shape[1] + 1]  # (batch, steps): the word after each input word
    steps = torch.arange(scores.shape[1], device=scores.device)  # (steps,)
    mask = steps.unsqueeze(0) < decode_lengths.unsqueeze(1)  # (batch, steps): True on real words
    scores, targets = scores[mask], targets[mask]  # (n, vocab), (n,)
    cross_entropy = F.cross_entropy(scores.float(), targets, label_smoothing=label_smoothing)
    # every pixel should receive about one unit of attention over the whole caption
    attention_penalty = ((1.0 - alphas.sum(dim=1)) ** 2).mean()  # alphas.sum(1): (batch, num_pixels)
    return cross_entropy + alpha_c * attention_penalty, scores, targets
    # <<< EXERCISE 5

def loss_options(run):
    """The training loss's extra arguments: label smoothing for soft attention, REINFORCE's for hard."""
    if run.hard_baseline is None:
        return {"label_smoothing": run.args.label_smoothing}
    return {"baseline": run.hard_baseline, "reinforce_weight": run.args.reinforce_weight,
            "entropy_weight": run.args.entropy_weight}


def features_cached(run):
    """Do the cached batches hold finished features? (With --fine-tune-top they hold the bottom's maps.)"""
    return run.train_cache is not None and not run.top_blocks


def top5_accuracy(scores, targets):
    top5 = scores.topk(5, dim=1).indices  # (n, 5)
    return (top5 == targets.unsqueeze(1)).any(dim=1).float().mean().item() * 100.0


def train_one_epoch(run, epoch):
    """One pass over TRAIN. Returns {'loss', 'top5', 'img_per_s'}."""
    run.decoder.train()
    run.encoder.train(run.fine_tune)
    order = epoch_order(len(run.train_set), epoch, run.args.seed, run.rank, run.world)  # (captions,) this rank's
    mirror = None
    if run.args.hflip:  # which captions see their photo mirrored this epoch
        mirror = Mirror(mirror_flags(len(order), epoch, run.args.seed, run.rank), run.mirror_cache, run.word_map)
    batches = caption_batches(run.train_set, order, run.args.batch_size, run.train_cache, run.args.workers, run.device,
                              mirror)
    total = math.ceil(len(order) / run.args.batch_size)
    if run.args.max_steps:
        total = min(total, run.args.max_steps)
    losses, top5s, seen, start = AverageMeter(), AverageMeter(), 0, time.time()
    bar = progress(itertools.islice(batches, total), total=total, desc=f"epoch {epoch}", unit="batch",
                   disable=run.rank != 0)
    for step, (inputs, captions, caplens) in enumerate(bar):
        inputs = to_device(inputs, run.device)  # (batch, num_pixels, encoder_dim) features or (batch, 3, S, S) images
        captions, caplens = to_device(captions, run.device), to_device(caplens, run.device)  # (batch, L), (batch,)
        with run.autocast():
            loss_fn = hard_attention_loss if run.hard_baseline is not None else compute_loss
            loss, scores, targets = loss_fn(run.train_encoder, run.train_decoder, inputs, captions, caplens,
                                            features_cached(run), run.args.alpha_c,
                                            **loss_options(run))  # (), (n, vocab), (n,)
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


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@torch.no_grad()
def validate(run):
    """VAL teacher-forced loss and top-5 accuracy, and BLEU-1..4 and CIDEr of free-running beam decoding."""
    encoder, decoder = run.encoder.eval(), run.decoder.eval()  # the raw modules: no DDP forward here
    losses, top5s = AverageMeter(), AverageMeter()
    order = torch.arange(len(run.val_set), device="cpu")  # (captions,)
    # EXERCISE 7 >>> The validation loop: average the teacher-forced loss and top-5 accuracy over VAL, weighted by words.
    # Hint: like training but without gradients or optimiser steps; batches come from caption_batches(...)
    #       with run.val_cache; update the meters with len(targets) as the weight.
    for inputs, captions, caplens in caption_batches(run.val_set, order, run.args.batch_size, run.val_cache,
                                                     run.args.workers, run.device):
        inputs = to_device(inputs, run.device)  # (batch, num_pixels, encoder_dim) features or (batch, 3, S, S) images
        captions, caplens = to_device(captions, run.device), to_device(caplens, run.device)  # (batch, L), (batch,)
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
    """{image index: caption string} for every image of `split`, by beam search."""
    if run.val_cache is not None and split == "VAL":
        batches, features_given = run.val_cache.image_batches(64), True
    else:
        batches = DataLoader(ImageDataset(run.snapshot, run.data_name, split), batch_size=64,
                             num_workers=run.args.workers, **loader_options(run.device))
        features_given = False
    with run.autocast():
        hyps = decode_batches(encoder, decoder, batches, run.word_map, run.args.val_beam_size,
                              run.args.max_decode_len, device=run.device, desc=f"decoding {split}",
                              features_given=features_given, **model_decoding(run.config))
    return {i: " ".join(decode_tokens(h["tokens"], run.rev_word_map, run.word_map)) for i, h in hyps.items()}


# ---------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------


def decay_learning_rates(run, why):
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] *= run.args.lr_decay
    print(f"  {why}: learning rates x{run.args.lr_decay}")


def end_of_epoch(run, epoch, stats):
    """Select on VAL `run.select_on`, adjust the LR, save checkpoints and logs. Returns True to stop early."""
    score = stats.get(f"val_{run.select_on}", 0.0)
    improved = score > run.best_score
    if improved:
        run.best_score, run.best_epoch, run.epochs_since_improvement = score, epoch, 0
    else:
        run.epochs_since_improvement += 1
        if run.epochs_since_improvement % run.args.lr_patience == 0:
            decay_learning_rates(run, f"no improvement for {run.epochs_since_improvement} epochs")
    if run.args.lr_step and (epoch + 1) % run.args.lr_step == 0:
        decay_learning_rates(run, f"{epoch + 1} epochs done (--lr-step {run.args.lr_step})")
    run.history.append({"epoch": epoch, **stats, "lr": run.decoder_opt.param_groups[0]["lr"]})
    save_epoch(run, checkpoint_state(run, epoch))
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
        if run.args.scst:
            stats = scst_one_epoch(run, epoch, optimisation_step)
        else:
            stats = train_one_epoch(run, epoch)
        stop = False
        if run.rank == 0:  # the other ranks wait at the broadcast below
            stats.update(validate(run))
            stats["minutes"] = (time.time() - start) / 60
            stats["peak_rss_mb"] = peak_rss_mb()
            if run.device.type == "cuda":
                stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
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


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        run_training(setup_run(args, stack))


def run_training(run):
    if run.rank == 0:
        cached = "features cached" if run.train_cache is not None else "encoder run every batch"
        print(f"Training on {run.data_name} ({len(run.train_set)} captions) with {run.config['encoder']} "
              f"({'fine-tuned' if run.fine_tune else 'frozen'}, {cached}) on {run.device}; output in {run.out_dir}")
    try:
        train(run)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; continue with: python train.py --resume {os.path.join(run.out_dir, 'last.pt')} "
                        "(plus the same options)") from None
    if run.rank == 0 and run.args.demo:
        shapes.finish_demo(run)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
