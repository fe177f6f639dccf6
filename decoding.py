"""The one beam search, batched over images x beams, used by train.py, eval.py and caption.py."""
import torch

from utils import END, START, UNK, progress


def model_decoding(config, length_penalty=None):
    """A model's own decoding rules, from its config, as keyword arguments of beam_search and decode_batches:
    constrained (self-critical training's rules, set by train.py --scst), and the length penalty and trigram
    blocking that export.py recorded (tuned on VAL). A length_penalty given here wins over the recorded one."""
    if length_penalty is None:
        length_penalty = config.get("length_penalty", 0.0)
    return {"length_penalty": float(length_penalty), "constrained": bool(config.get("constrained_decoding", False)),
            "block_trigrams": bool(config.get("block_trigrams", False))}


@torch.no_grad()
def beam_search(decoder, features, word_map, beam_size=5, max_len=50, length_penalty=0.0, suppress_unk=False,
                constrained=False, block_trigrams=False):
    """Decode a batch of encoded images at once.

    features: (batch, num_pixels, encoder_dim) from the Encoder.
    max_len is the most words a caption may have, <end> included.
    A hypothesis' score is its summed log-probability divided by len ** length_penalty
    (len counts the generated words and <end>; length_penalty=0 means plain log-probability).
    An image is finished once beam_size hypotheses have emitted <end>, or (without a length
    penalty) once no live beam can beat its best finished one. If none emits <end> within
    max_len words, the best unfinished hypothesis is returned instead of failing.
    constrained applies self-critical training's rules (scst.constrain); block_trigrams forbids any word
    that would repeat a trigram of its own hypothesis.

    Returns one dict per image: tokens (word ids, no <start>/<end>), score, log_prob,
    finished (bool), alphas (len(tokens), num_pixels) with each word's attention, and beams: the image's
    beam_size best finished hypotheses as {tokens, score, log_prob}, best score first (the best alone if none
    finished).
    """
    k, vocab = beam_size, decoder.vocab_size
    start, end, unk = word_map[START], word_map[END], word_map[UNK]
    batch, num_pixels, _ = features.shape
    device = features.device

    projected = decoder.attention.project_features(features)  # (batch, num_pixels, attention_dim)
    # the first step starts from one hypothesis per image, <start>; from then on each image has k beams.
    # features and projected keep one row per image: an image's beams share them (see Attention.forward)
    h, c = decoder.init_hidden_state(features)  # 2 x (batch, decoder_dim)
    words = torch.full((batch,), start, dtype=torch.long, device=device)  # (batch,)
    scores = torch.zeros(batch, 1, device=device)  # (batch, 1)
    seqs = torch.empty(batch, 0, dtype=torch.long, device=device)  # (batch, t)
    alpha_seqs = features.new_empty(batch, 0, num_pixels)  # (batch, t, num_pixels)
    images = torch.arange(batch, device=device)  # original image of each live row block
    if constrained:  # the decoding rules of self-critical training (imported here: scst.py imports this module)
        from scst import bad_ending_ids, constrain

        bad_ids = bad_ending_ids(word_map, device)  # (num_bad,)
    best = [None] * batch
    n_finished = [0] * batch
    found = [[] for _ in range(batch)]  # every finished hypothesis of each image

    for t in range(max_len):  # at most max_len words, <end> included
        live, beams = scores.shape  # beams is 1 at the first step, k after
        embedded = decoder.embedding(words)  # (live * beams, embed_dim)
        h, c, alpha = decoder.step(embedded, h, c, features, projected)  # 2 x (live * beams, decoder_dim),
        #                                                                  (live * beams, num_pixels)
        log_probs = torch.log_softmax(decoder.word_scores(h).float(), dim=1)  # (live * beams, vocab)
        if suppress_unk:
            log_probs[:, unk] = float("-inf")
        if constrained:
            log_probs = constrain(log_probs, words, word_map, bad_ids)
        if block_trigrams:
            log_probs = ban_repeated_trigrams(log_probs, seqs)
        candidates = (scores.view(-1, 1) + log_probs).view(live, beams * vocab)  # (live, beams * vocab)
        scores, flat = candidates.topk(k, dim=1)  # (live, k), (live, k)
        beam, word = flat // vocab, flat % vocab  # (live, k) each: source beam, new word
        rows = (torch.arange(live, device=device).unsqueeze(1) * beams + beam).view(-1)  # (live * k,)
        seqs = torch.cat([seqs[rows], word.view(-1, 1)], dim=1)  # (live * k, t + 1)
        alpha_seqs = torch.cat([alpha_seqs[rows], alpha[rows].unsqueeze(1)], dim=1)  # (live * k, t + 1, num_pixels)
        h, c = h[rows], c[rows]  # (live * k, decoder_dim) x2

        ended = word == end  # (live, k)
        _collect_finished(ended, scores, seqs, alpha_seqs, images, best, n_finished, length_penalty, k, found)
        scores = scores.masked_fill(ended, float("-inf"))  # finished beams leave the search

        keep = _still_searching(scores, images, best, n_finished, k, length_penalty)  # (live,) bool
        if t == max_len - 1 or not keep.any():
            break
        if not keep.all():  # finished images leave the batch, so they cost nothing from now on
            rows = (keep.nonzero().view(-1, 1) * k + torch.arange(k, device=device)).view(-1)  # (kept * k,)
            features, projected = features[keep], projected[keep]  # (kept, num_pixels, ...)
            h, c, seqs, alpha_seqs = h[rows], c[rows], seqs[rows], alpha_seqs[rows]  # (kept * k, ...)
            scores, word, images = scores[keep], word[keep], images[keep]  # (kept, k), (kept, k), (kept,)
        words = word.view(-1)  # (live * k,)

    _fill_unfinished(scores, seqs, alpha_seqs, images, best, length_penalty, k)
    for hyp, beams in zip(best, found):
        summary = {key: hyp[key] for key in ("tokens", "score", "log_prob")}
        # several beams can end at the same step, so more than k may have finished: keep the k best
        hyp["beams"] = sorted(beams, key=lambda b: b["score"], reverse=True)[:k] if beams else [summary]
    return best


def ban_repeated_trigrams(log_probs, seqs):
    """Forbid each row's next word where it would repeat a trigram that row already has
    ("a man in a red shirt and a red shirt"). log_probs (rows, vocab), seqs (rows, t) the words so far."""
    if seqs.shape[1] < 3:
        return log_probs
    # bigram i is (seqs[:, i], seqs[:, i + 1]), for i up to t - 3; the word that followed it is seqs[:, i + 2]
    same_bigram = (seqs[:, :-2] == seqs[:, -2:-1]) & (seqs[:, 1:-1] == seqs[:, -1:])  # (rows, t - 2)
    banned = torch.zeros_like(log_probs).scatter_add_(1, seqs[:, 2:], same_bigram.float())  # (rows, vocab)
    return log_probs.masked_fill(banned > 0, float("-inf"))


def _collect_finished(ended, scores, seqs, alpha_seqs, images, best, n_finished, length_penalty, k, found):
    """Record hypotheses that just emitted <end> in `found`, and each image's best by normalised score."""
    for i, j in ended.nonzero().tolist():
        log_prob = float(scores[i, j])
        if log_prob == float("-inf"):
            continue
        row, img = i * k + j, int(images[i])
        length = seqs.shape[1]  # words + <end>
        score = log_prob / length**length_penalty
        n_finished[img] += 1
        found[img].append({"tokens": seqs[row, :-1].tolist(), "score": score, "log_prob": log_prob})
        if best[img] is None or score > best[img]["score"]:
            best[img] = {"tokens": seqs[row, :-1].tolist(), "score": score, "log_prob": log_prob,
                         "finished": True, "alphas": alpha_seqs[row, :-1].cpu()}


def _fill_unfinished(scores, seqs, alpha_seqs, images, best, length_penalty, k):
    """Images where no beam emitted <end> within max_len words get their best live hypothesis."""
    for i, img in enumerate(images.tolist()):
        if best[img] is not None or float(scores[i].max()) == float("-inf"):
            continue
        j = int(scores[i].argmax())
        log_prob, row = float(scores[i, j]), i * k + j
        best[img] = {"tokens": seqs[row].tolist(), "score": log_prob / seqs.shape[1] ** length_penalty,
                     "log_prob": log_prob, "finished": False, "alphas": alpha_seqs[row].cpu()}


def _still_searching(scores, images, best, n_finished, k, length_penalty):
    """(live,) bool: which images may still find a better hypothesis."""
    keep = []
    for i, img in enumerate(images.tolist()):
        top = float(scores[i].max())
        if n_finished[img] >= k or top == float("-inf"):
            keep.append(False)
        elif length_penalty == 0 and best[img] is not None and best[img]["log_prob"] >= top:
            keep.append(False)  # log-probabilities only fall: no live beam can win any more
        else:
            keep.append(True)
    return torch.tensor(keep, dtype=torch.bool, device=scores.device)


@torch.no_grad()
def decode_batches(encoder, decoder, batches, word_map, beam_size, max_len=50, length_penalty=0.0,
                   suppress_unk=False, device="cpu", desc="decoding", features_given=False, constrained=False,
                   block_trigrams=False):
    """Beam-search every image yielded by `batches` ((images or features, indices) pairs).

    beam_size: one size, which returns {index: hypothesis dict}; or a list of sizes, which returns
    {size: {index: hypothesis dict}}, each batch being encoded once for all of them. With
    features_given=True the batches hold cached encoder features instead of images and the encoder is skipped.
    """
    sizes = [beam_size] if isinstance(beam_size, int) else list(beam_size)
    results = {k: {} for k in sizes}
    for inputs, indices in progress(batches, desc=desc, unit="batch", leave=False):
        inputs = inputs.to(device)
        features = inputs.float() if features_given else encoder(inputs)  # (batch, num_pixels, encoder_dim)
        for k in sizes:
            hyps = beam_search(decoder, features, word_map, k, max_len, length_penalty, suppress_unk, constrained,
                               block_trigrams)
            results[k].update(zip(indices.tolist(), hyps))
    return results[beam_size] if isinstance(beam_size, int) else results
