"""Exercise 5 (train.py): compute_loss, with stub encoder and decoder, against eq. (14) word by word."""
import torch

from .common import CheckFailed, expect, expect_same_gradients, expect_tensor, expect_tuple, load


class DecoderStub(torch.nn.Module):
    """Stands in for the decoder: learnable scores and attention, returned in length order
    (like the real decoder), with junk scores on padded steps."""

    def __init__(self, batch, steps, vocab, num_pixels):
        super().__init__()
        self.steps = steps
        self.score_table = torch.nn.Parameter(torch.randn(batch, steps, vocab))  # (batch, steps, vocab)
        self.alpha_logits = torch.nn.Parameter(torch.randn(batch, steps, num_pixels))  # (batch, steps, P)
        self.seen_features = None

    def outputs(self, captions, caplens):
        lengths, sort_ind = caplens.view(-1).sort(descending=True)  # (batch,), (batch,)
        decode_lengths = lengths - 1  # (batch,)
        running = torch.arange(self.steps).unsqueeze(0) < decode_lengths.unsqueeze(1)  # (batch, steps)
        alphas = torch.softmax(self.alpha_logits, dim=2) * running.unsqueeze(2)  # (batch, steps, P), 0 when ended
        return self.score_table, captions[sort_ind], decode_lengths, alphas, sort_ind

    def forward(self, features, captions, caplens):
        self.seen_features = features
        return self.outputs(captions, caplens)


class EncoderStub(torch.nn.Module):
    """Stands in for the Encoder: uint8 images -> (batch, num_pixels, encoder_dim) features."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def forward(self, images):
        features = images.float().flatten(2).transpose(1, 2) / 255.0  # (batch, H * W, 3)
        self.outputs.append(features)
        return features


def loss_by_hand(scores, captions, decode_lengths, alphas, alpha_c, count_padding=False, shift=1):
    """Eq. (14) word by word: mean cross-entropy of each real next word, plus
    alpha_c * mean over images and pixels of (1 - sum_t alpha_ti)^2."""
    total, words = 0.0, 0
    for b in range(scores.shape[0]):
        steps = scores.shape[1] if count_padding else int(decode_lengths[b])
        for t in range(steps):
            target = int(captions[b, t + shift])  # shift 1: the word after the input word t
            total = total - (scores[b, t, target] - torch.logsumexp(scores[b, t], dim=0))
            words += 1
    cross_entropy = total / words
    attention = alphas.sum(dim=1)  # (batch, num_pixels): attention each pixel got over the caption
    return cross_entropy, ((1.0 - attention) ** 2).mean(), cross_entropy + alpha_c * ((1.0 - attention) ** 2).mean()


def explain_wrong_loss(got, decoder, captions, caplens, alpha_c):
    """Name the usual mistake when the loss is off."""
    scores, sorted_captions, decode_lengths, alphas, _ = decoder.outputs(captions, caplens)
    cross_entropy, penalty, wanted = (float(x) for x in
                                      loss_by_hand(scores, sorted_captions, decode_lengths, alphas, alpha_c))
    known_mistakes = [
        (cross_entropy, "the attention penalty is missing: add alpha_c * mean((1 - sum_t alpha)^2)"),
        (cross_entropy + penalty, "the attention penalty is not multiplied by alpha_c"),
        (float(loss_by_hand(scores, sorted_captions, decode_lengths, alphas, alpha_c, count_padding=True)[2]),
         "padded steps are counted: keep only steps t < decode_length"),
        (float(loss_by_hand(scores, captions, decode_lengths, alphas, alpha_c)[2]),
         "the targets come from the unsorted captions: use the captions the decoder returns"),
        (float(loss_by_hand(scores, sorted_captions, decode_lengths, alphas, alpha_c, shift=0)[2]),
         "the target of step t is the input word t itself; it should be the next word, captions[:, t + 1]"),
    ]
    for value, reason in known_mistakes:
        if abs(got - value) < 1e-4:
            return f"loss {got:.4f} differs from the expected {wanted:.4f}: {reason}"
    return f"loss {got:.4f} differs from the expected {wanted:.4f}"


def expect_same_words(scores, targets, wanted_scores, wanted_targets):
    """The returned (scores row, target) pairs must be the real words', in any order."""
    def key(row, target):
        return (int(target), tuple(round(float(v), 4) for v in row))

    got = sorted(key(s, t) for s, t in zip(scores.detach(), targets))
    wanted = sorted(key(s, t) for s, t in zip(wanted_scores.detach(), wanted_targets))
    expect(got == wanted, "the returned scores and targets are not the real (unpadded) words' "
                          "scores and next words")


def check(folder):
    train = load(folder, "train")
    batch, steps, vocab, num_pixels, alpha_c = 4, 5, 7, 4, 0.7
    caplens = torch.tensor([4, 6, 3, 5])  # (batch,): decode lengths 3, 5, 2, 4
    captions = torch.randint(1, vocab, (batch, 8))  # (batch, max_len + 2)
    captions[torch.arange(8).unsqueeze(0) >= caplens.unsqueeze(1)] = 0  # <pad>
    decoder, encoder = DecoderStub(batch, steps, vocab, num_pixels), EncoderStub()

    cached_features = torch.randn(batch, num_pixels, 3).half()  # (batch, num_pixels, encoder_dim) as cached
    out = train.compute_loss(encoder, decoder, cached_features, captions, caplens, True, alpha_c)
    expect_tuple(out, 3, "loss, scores, targets")
    loss, scores, targets = out
    expect(not encoder.outputs, "the encoder ran although cached=True: the inputs are already features")
    expect(decoder.seen_features is not None and decoder.seen_features.dtype == torch.float32,
           "cached features are float16: give the decoder inputs.float()")
    expect(torch.equal(decoder.seen_features, cached_features.float()), "the decoder did not get the cached features")
    expect(isinstance(loss, torch.Tensor) and loss.numel() == 1, "the loss should be a one-element tensor")

    # (batch, steps, vocab), (batch, max_len + 2), (batch,), (batch, steps, num_pixels): what the decoder gave
    wanted_scores, sorted_captions, lengths, alphas, _ = decoder.outputs(captions, caplens)
    wanted = loss_by_hand(wanted_scores, sorted_captions, lengths, alphas, alpha_c)[2]
    if abs(float(loss) - float(wanted)) > 1e-4:
        raise CheckFailed(explain_wrong_loss(float(loss), decoder, captions, caplens, alpha_c))
    words = int(lengths.sum())
    expect_tensor("the returned scores", scores, (words, vocab), f"(n, vocab) with n = {words} real words")
    expect_tensor("the returned targets", targets, (words,), f"(n,) with n = {words} real words")
    running = torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, steps)
    expect_same_words(scores, targets, wanted_scores[running], sorted_captions[:, 1 : steps + 1][running])
    expect_same_gradients(loss, wanted, [("the scores", decoder.score_table),
                                         ("the attention", decoder.alpha_logits)], "the loss")

    images = torch.randint(0, 256, (batch, 3, 2, 2), dtype=torch.uint8)  # (batch, 3, H, W)
    train.compute_loss(encoder, decoder, images, captions, caplens, False, alpha_c)
    expect(len(encoder.outputs) == 1 and decoder.seen_features is encoder.outputs[0],
           "with cached=False the decoder should get encoder(inputs)")

    expect_training_lowers_loss(lambda: train.compute_loss(encoder, decoder, cached_features, captions, caplens,
                                                           True, alpha_c)[0], decoder.parameters(), "compute_loss")


def expect_training_lowers_loss(loss_fn, parameters, what, steps=30, lr=0.5):
    """A tiny training run: plain gradient descent on `loss_fn` must bring the loss well down."""
    optimizer = torch.optim.SGD(list(parameters), lr=lr)
    first = last = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        first = float(loss) if first is None else first
        last = float(loss)
    expect(last < 0.7 * first, f"a tiny training run on {what} did not lower the loss ({first:.3f} -> {last:.3f})")
