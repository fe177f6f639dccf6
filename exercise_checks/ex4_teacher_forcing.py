"""Exercise 4 (models.py): the teacher-forcing loop of DecoderWithAttention.forward, with the step
(exercise 3) stubbed out, against each caption replayed on its own."""
import types

import torch

from .common import CheckFailed, close, expect, expect_tensor, load, small_decoder


def stub_step_math(embedded, h, c, features):
    """Stands in for exercise 3: any deterministic function of the inputs will do, as long as it can be
    replayed one caption at a time."""
    new_h = torch.tanh(0.5 * h + c + embedded.sum(dim=1, keepdim=True))  # (n, decoder_dim)
    new_c = 0.5 * c + 1.0  # (n, decoder_dim)
    alpha = torch.softmax(features[:, :, 0] + new_h[:, :1], dim=1)  # (n, num_pixels)
    return new_h, new_c, alpha


class StepStub:
    """Replaces decoder.step and records what the loop hands it at every step."""

    def __init__(self):
        self.calls = []

    def __call__(self, embedded, h, c, features, projected):
        t = len(self.calls)
        rows = [embedded.shape[0], h.shape[0], c.shape[0], features.shape[0], projected.shape[0]]
        expect(len(set(rows)) == 1, f"step {t} got embedded, h, c, features, projected with {rows} rows; "
                                    "give every one the same first n rows")
        self.calls.append({name: value.detach().clone() for name, value in
                           (("embedded", embedded), ("h", h), ("c", c), ("features", features),
                            ("projected", projected))})
        return stub_step_math(embedded, h, c, features)


def replay_caption(decoder, features_row, caption, decode_length):
    """One caption on its own through the stub: the h given to each step, and the h and alpha it stores."""
    features_row = features_row.unsqueeze(0)  # (1, num_pixels, encoder_dim)
    h, c = decoder.init_hidden_state(features_row)  # 2 x (1, decoder_dim)
    h_in, h_out, alphas = [], [], []
    for t in range(decode_length):
        h_in.append(h[0])
        embedded = decoder.embedding(caption[t : t + 1])  # (1, embed_dim): the true word t
        h, c, alpha = stub_step_math(embedded, h, c, features_row)  # (1, decoder_dim) x2, (1, num_pixels)
        h_out.append(h[0])
        alphas.append(alpha[0])
    return types.SimpleNamespace(h_in=h_in, h_out=torch.stack(h_out), alphas=torch.stack(alphas))


def expect_right_step_inputs(decoder, calls, features, captions, lengths, replays):
    """Step t must get the first n_t rows (the captions still running), word t, and the h of step t - 1."""
    projected = decoder.attention.project_features(features)  # (batch, num_pixels, attention_dim)
    for t, call in enumerate(calls):
        n = int((lengths > t).sum())  # rows are sorted by length: the first n are still running
        got = call["embedded"].shape[0]
        expect(got == n, f"step {t} got {got} rows; expected {n}, the captions still running (decode_length > {t})")
        words = decoder.embedding(captions[:n, t])  # (n, embed_dim)
        if not close(call["embedded"], words):
            expect(not close(call["embedded"], decoder.embedding(captions[:n, t + 1])),
                   f"step {t} was fed word {t + 1}; teacher forcing feeds the true word t")
            raise CheckFailed(f"step {t} was not fed the embeddings of word {t} of each caption")
        wanted_h = torch.stack([replays[b].h_in[t] for b in range(n)])  # (n, decoder_dim)
        expect(close(call["h"], wanted_h), f"step {t} did not get the h returned by step {t - 1}" if t else
               "step 0 did not get h from init_hidden_state(features)")
        expect(close(call["features"], features[:n]) and close(call["projected"], projected[:n]),
               f"step {t} should get features[:n] and projected[:n] of the sorted rows")


def check(folder):
    models = load(folder, "models")
    decoder = small_decoder(models)
    decoder.step = StepStub()  # the loop's bookkeeping is checked, not exercise 3
    batch, num_pixels, encoder_dim, vocab = 4, 5, 6, 11
    caplens = torch.tensor([3, 6, 2, 5])  # (batch,): <start> + words + <end>, all different
    captions = torch.randint(1, vocab, (batch, 8))  # (batch, max_len + 2)
    captions[torch.arange(8).unsqueeze(0) >= caplens.unsqueeze(1)] = 0  # <pad> after each caption
    features = torch.randn(batch, num_pixels, encoder_dim)  # (batch, num_pixels, encoder_dim)

    # (batch, steps, vocab), (batch, steps, num_pixels), (batch,): sorted by length, longest first
    scores, _, _, alphas, sort_ind = decoder(features, captions, caplens)
    lengths = caplens[sort_ind] - 1  # (batch,) decode lengths, longest first
    sorted_captions, sorted_features = captions[sort_ind], features[sort_ind]  # (batch, 8), (batch, P, E)
    steps = int(lengths.max())
    calls = decoder.step.calls
    expect(len(calls) == steps, f"self.step was called {len(calls)} times; expected {steps}, "
                                "one per step of the longest caption")
    replays = [replay_caption(decoder, sorted_features[b], sorted_captions[b], int(lengths[b])) for b in range(batch)]
    expect_right_step_inputs(decoder, calls, sorted_features, sorted_captions, lengths, replays)

    expect_tensor("alphas", alphas, (batch, steps, num_pixels), "(batch, steps, num_pixels)")
    expect_tensor("scores", scores, (batch, steps, vocab), "(batch, steps, vocab_size)")
    hiddens = torch.zeros(batch, steps, decoder.fc.in_features)  # (batch, steps, decoder_dim)
    wanted_alphas = torch.zeros(batch, steps, num_pixels)  # (batch, steps, num_pixels)
    for b, replay in enumerate(replays):
        hiddens[b, : len(replay.h_out)] = replay.h_out
        wanted_alphas[b, : len(replay.alphas)] = replay.alphas
    for b in range(batch):
        n = int(lengths[b])
        expect(float(alphas[b, n:].detach().abs().sum()) == 0,
               f"alphas[{b}, {n}:] should stay zero: that caption ended after {n} steps")
        expect(close(alphas[b, :n], wanted_alphas[b, :n]),
               f"alphas[{b}, t] does not hold the alpha that step t returned for that row")
    expect(close(scores, decoder.word_scores(hiddens)),
           "scores do not match the h of each step: store each step's h in hiddens[:n, t]")

    weights = torch.randn(batch, steps, num_pixels)  # (batch, steps, num_pixels): alphas.sum() would be constant
    for output, name in ((scores.sum(), "scores"), ((alphas * weights).sum(), "alphas")):
        expect(output.requires_grad, f"the {name} carry no gradient: do not detach or run the loop without gradients")
        grads = torch.autograd.grad(output, [decoder.embedding.weight, decoder.init_h.weight], retain_graph=True,
                                    allow_unused=True)
        expect(all(g is not None and float(g.abs().sum()) > 0 for g in grads),
               f"no gradient flows from the {name} back to the embeddings and init_h: do not detach what you store")
