"""Self-critical sequence training (Rennie et al., 2017): after cross-entropy, fine-tune the decoder to
maximise the CIDEr-D of its own sampled captions.

train.py --scst switches to scst_one_epoch; everything SCST needs lives here: the sampler, the rules
that keep sampled captions well-formed (no ending on "a", no "a a"), the reward and its baseline.
"""
import collections
import math
import os
import time

import torch

from decoding import beam_search
from features import epoch_order
from utils import (END, PAD, START, AverageMeter, TrainingDiverged, UserError, decode_tokens, positive_float,
                   positive_int, progress)


# ---------------------------------------------------------------------------
# Well-formed captions: the constraint used in sampling and in the SCST model's beam search
# ---------------------------------------------------------------------------

# Words a caption must not end on: self-critical training learns to stop after them ("a man with a")
BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near", "to",
               "is", "are", "am", "and")


def bad_ending_ids(word_map, device):
    return torch.tensor([word_map[w] for w in BAD_ENDINGS if w in word_map], dtype=torch.long, device=device)


def constrain(log_probs, previous, word_map, bad_ids):
    """Forbid <end> right after a bad-ending word, any word twice in a row ("a a a"), and <pad> or
    <start> as a word. log_probs (rows, vocab), previous (rows,) the last word of each row."""
    end = word_map[END]
    log_probs[:, [word_map[PAD], word_map[START]]] = float("-inf")
    after_bad = torch.isin(previous, bad_ids)  # (rows,)
    log_probs[after_bad, end] = float("-inf")
    repeat = previous != word_map[START]  # (rows,)
    log_probs[repeat.nonzero().view(-1), previous[repeat]] = float("-inf")
    return log_probs


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def sample_captions(decoder, features, word_map, samples_per_image, max_len=20):
    """Sample captions word by word from the model (with gradients), for self-critical training.

    Returns tokens (batch * n, steps) with 0 after <end>, log_probs (batch * n, steps) of the sampled
    words, and mask (batch * n, steps), 1 for real words (<end> included). Rows of one image are adjacent.
    """
    n, end = samples_per_image, word_map[END]
    bad_ids = bad_ending_ids(word_map, features.device)  # (num_bad,)
    projected = decoder.attention.project_features(features)  # (batch, num_pixels, attention_dim)
    h, c = decoder.init_hidden_state(features)  # 2 x (batch, decoder_dim)
    h, c = h.repeat_interleave(n, 0), c.repeat_interleave(n, 0)  # 2 x (batch * n, decoder_dim): samples share features
    words = torch.full((len(h),), word_map[START], dtype=torch.long, device=h.device)  # (batch * n,)
    finished = torch.zeros(len(h), dtype=torch.bool, device=h.device)  # (batch * n,)
    tokens, log_probs, mask = [], [], []
    for _ in range(max_len):
        h, c, _ = decoder.step(decoder.embedding(words), h, c, features, projected)  # (batch * n, decoder_dim) x2
        scores = decoder.word_scores(h).float()  # (batch * n, vocab)
        with torch.no_grad():
            allowed = constrain(torch.zeros_like(scores), words, word_map, bad_ids)  # 0 or -inf
        step_log_probs = torch.log_softmax(scores + allowed, dim=1)  # (batch * n, vocab)
        words = torch.multinomial(step_log_probs.detach().exp(), 1).view(-1)  # (batch * n,)
        tokens.append(words.masked_fill(finished, 0))
        log_probs.append(step_log_probs.gather(1, words.unsqueeze(1)).view(-1))  # (batch * n,)
        mask.append(~finished)
        finished = finished | (words == end)
        if finished.all():
            break
    return torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(mask, 1).float()


# ---------------------------------------------------------------------------
# The reward: CIDEr-D, with document frequencies computed once from the TRAIN references
# ---------------------------------------------------------------------------


def _ngram_counts(words, n=4):
    counts = collections.Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D as coco-caption computes it (tf-idf n-gram vectors, n = 1..4, hypothesis counts clipped
    by the reference's, a Gaussian length penalty with sigma 6, times 10), but with the document
    frequencies fixed once from a reference corpus instead of recomputed from each evaluated set.

    references: {image key: [sentence, ...]} (the training references for SCST).
    """

    def __init__(self, references, n=4, sigma=6.0):
        self.n, self.sigma = n, sigma
        self.df = collections.Counter()
        for sentences in references.values():
            self.df.update({g for s in sentences for g in _ngram_counts(s.split(), n)})
        self.log_num_docs = math.log(float(len(references)))
        self._refs = {key: [self._vector(s) for s in sentences] for key, sentences in references.items()}

    def _vector(self, sentence):
        """(tf-idf dict per n, norm per n, length). Length counts bigrams, exactly as coco-caption does."""
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in _ngram_counts(sentence.split(), self.n).items():
            i = len(gram) - 1
            vec[i][gram] = tf * (self.log_num_docs - math.log(max(1.0, self.df[gram])))
            norm[i] += vec[i][gram] ** 2
            if i == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp, ref):
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for i in range(self.n):
            val = sum(min(w, vr[i].get(g, 0.0)) * vr[i].get(g, 0.0) for g, w in vh[i].items())
            if nh[i] != 0 and nr[i] != 0:
                val /= nh[i] * nr[i]
            total += val * penalty
        return total / self.n

    def score(self, key, hypothesis, references=None):
        """CIDEr-D of one hypothesis against the stored references of `key` (or the given ones)."""
        refs = self._refs[key] if references is None else [self._vector(r) for r in references]
        hyp = self._vector(hypothesis)
        return 10.0 * sum(self._similarity(hyp, r) for r in refs) / len(refs)

    def scores(self, keys, hypotheses):
        return [self.score(k, h) for k, h in zip(keys, hypotheses)]


# ---------------------------------------------------------------------------
# One SCST epoch
# ---------------------------------------------------------------------------


def add_scst_options(parser):
    """train.py's options for this phase."""
    s = parser.add_argument_group("self-critical sequence training (after cross-entropy; see scst.py)")
    s.add_argument("--scst", action="store_true", help="fine-tune the decoder to maximise CIDEr-D (needs --resume)")
    s.add_argument("--scst-samples", type=positive_int, default=5, help="sampled captions per image")
    s.add_argument("--scst-baseline", default="greedy", choices=["greedy", "mean"],
                   help="reward baseline: the greedy caption's CIDEr-D, or the mean of the other samples")
    s.add_argument("--scst-lr", type=positive_float, default=5e-5, help="decoder learning rate during SCST")
    s.add_argument("--scst-max-len", type=positive_int, default=20, help="longest sampled caption")
    s.add_argument("--scst-no-dropout", action="store_true",
                   help="sample with the decoder's dropout off, i.e. from the model that decodes at test time")


def check_scst_options(args, world):
    if not args.resume:
        raise UserError("--scst continues a cross-entropy model: give it with --resume CHECKPOINT")
    if args.fine_tune_encoder or args.fine_tune_top or args.cache == "off" or world > 1:
        raise UserError("--scst trains the decoder alone on cached features, in one process "
                        "(no --fine-tune-encoder, --fine-tune-top, --cache off or torchrun)")
    if args.scst_samples < 1 or (args.scst_baseline == "mean" and args.scst_samples < 2):
        raise UserError("--scst-samples must be at least 1 (at least 2 with --scst-baseline mean)")
    if args.hflip:
        raise UserError("--hflip augments cross-entropy training; SCST samples from the photos as they are")
    if args.feature_dropout:
        raise UserError("--feature-dropout regularises cross-entropy training; SCST samples from the features as they are")


def scst_one_epoch(run, epoch, optimisation_step):
    """Self-critical sequence training (Rennie et al., 2017): REINFORCE with the CIDEr-D of sampled
    captions as reward and the greedy caption's CIDEr-D (or the other samples' mean) as baseline.
    optimisation_step(run, loss) is train.py's: backward, clip, step."""
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
        decoder.train(not args.scst_no_dropout)  # dropout on or off while sampling; gradients flow either way
        with run.autocast():
            tokens, log_probs, mask = sample_captions(decoder, features, run.word_map, n, args.scst_max_len)  # (batch * n, steps) x3
        tic = time.time()
        keys = images.repeat_interleave(n).tolist()  # the image of each sample
        sampled = [" ".join(decode_tokens(row, run.rev_word_map, run.word_map)) for row in tokens.tolist()]
        reward = torch.tensor(run.cider.scores(keys, sampled), device=run.device).view(-1, n)  # (batch, n)
        baseline = scst_baseline(run, features, images, reward)  # (batch, n)
        reward_seconds += time.time() - tic
        advantage = (reward - baseline).view(-1, 1)  # (batch * n, 1)
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


def scst_baseline(run, features, images, reward):
    """(batch, n) baseline for each sample's reward."""
    n = reward.shape[1]
    if run.args.scst_baseline == "mean":  # leave-one-out mean of the other samples
        return (reward.sum(1, keepdim=True) - reward) / (n - 1)
    run.decoder.eval()
    with torch.no_grad(), run.autocast():
        greedy = beam_search(run.decoder, features, run.word_map, 1, run.args.scst_max_len, constrained=True)
    run.decoder.train()
    captions = [" ".join(decode_tokens(g["tokens"], run.rev_word_map, run.word_map)) for g in greedy]
    return torch.tensor(run.cider.scores(images.tolist(), captions), device=run.device).view(-1, 1).expand(-1, n)
