"""Exercise 7 (train.py): the loss / top-5 loop of validate, with compute_loss (exercise 5), decoding
and BLEU stubbed out."""
import types

import torch

from .common import CheckFailed, expect, load


VAL_VOCAB = 10


def scores_with_hits(targets, hits):
    """(words, vocab) scores whose top 5 hold the target exactly where hits is True."""
    scores = torch.zeros(len(targets), VAL_VOCAB)  # (words, vocab)
    for j, (target, hit) in enumerate(zip(targets.tolist(), hits.tolist())):
        others = [w for w in range(VAL_VOCAB) if w != target]
        scores[j, [target] + others[:4] if hit else others[:5]] = 1.0
    return scores


class ComputeLossStub:
    """Stands in for compute_loss (exercise 5): a known loss and known top-5 hits for every batch."""

    def __init__(self, autocast):
        self.autocast, self.calls = autocast, []

    def __call__(self, encoder, decoder, inputs, captions, caplens, cached, alpha_c):
        ids = captions[:, 1]  # (batch,): every VAL caption carries its id in column 1
        words = int((caplens.view(-1) - 1).sum())
        loss = 1.0 + 0.1 * float(ids.float().mean())  # different for every batch
        targets = torch.arange(words) % VAL_VOCAB  # (words,)
        hits = (torch.arange(words) + int(ids[0])) % 3 != 0  # (words,)
        self.calls.append({"inputs": inputs.clone(), "ids": ids.tolist(), "cached": cached, "alpha_c": alpha_c,
                           "words": words, "loss": loss, "hits": int(hits.sum()),
                           "in_autocast": self.autocast.active, "grad": torch.is_grad_enabled()})
        return torch.tensor(loss), scores_with_hits(targets, hits), targets


class AutocastSpy:
    """run.autocast: a context manager that remembers whether it is open."""

    def __init__(self):
        self.active = False

    def __call__(self):
        return self

    def __enter__(self):
        self.active = True

    def __exit__(self, *exc):
        self.active = False


class TinyValSet(torch.utils.data.Dataset):
    """8 VAL captions of 4 images; caption k has id k + 1 in column 1."""

    cpi = 2

    def __init__(self):
        self.caplens = torch.tensor([3, 5, 4, 6, 2, 4, 5, 3])  # (8,)
        self.captions = torch.randint(1, VAL_VOCAB, (8, 7))  # (8, max_len + 2)
        self.captions[:, 1] = torch.arange(1, 9)  # (8,) caption ids
        self.images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)  # (4, 3, S, S)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i // self.cpi], self.captions[i], self.caplens[i : i + 1]


def validate_with_stubs(train, val_cache):
    """Run the copy's validate on stubbed compute_loss, decoding and BLEU; returns (stats, calls, run)."""
    autocast = AutocastSpy()
    val_set = TinyValSet()
    run = types.SimpleNamespace(
        encoder=torch.nn.Identity(), decoder=torch.nn.Linear(1, 1), val_set=val_set, device=torch.device("cpu"),
        val_cache=val_cache, autocast=autocast, val_refs={},
        args=types.SimpleNamespace(batch_size=3, workers=0, alpha_c=0.7, val_beam_size=1, max_decode_len=5))
    stub = ComputeLossStub(autocast)
    train.compute_loss = stub
    train.decode_split = lambda run, encoder, decoder, split: {0: "a b"}
    train.score_captions = lambda refs, hyps, metrics=None, quiet=True: {"Bleu_4": 0.25}
    stats = train.validate(run)
    return stats, stub.calls, run


def expect_every_caption_once(calls, run):
    expect(calls, "compute_loss was never called: run it on every VAL batch")
    ids = sorted(i for call in calls for i in call["ids"])
    expect(ids == list(range(1, len(run.val_set) + 1)),
           f"VAL captions seen: {ids}; every one of the {len(run.val_set)} should be seen once")
    source = run.val_cache if run.val_cache is not None else run.val_set.images  # what each caption's input is
    for call in calls:
        wanted = torch.stack([source[(i - 1) // run.val_set.cpi] for i in call["ids"]])  # (batch, ...)
        expect(call["inputs"].shape == wanted.shape and torch.equal(call["inputs"], wanted),
               "compute_loss did not get each caption's own image features: use the batches of caption_batches(...)")


def expect_right_averages(stats, calls):
    words = sum(call["words"] for call in calls)
    wanted_loss = sum(call["loss"] * call["words"] for call in calls) / words  # weighted by words
    plain_loss = sum(call["loss"] for call in calls) / len(calls)
    wanted_top5 = 100.0 * sum(call["hits"] for call in calls) / words
    expect("val_loss" in stats and "val_top5" in stats, "validate no longer returns val_loss and val_top5")
    got_loss, got_top5 = float(stats["val_loss"]), float(stats["val_top5"])
    if abs(got_loss - wanted_loss) > 1e-4:
        reason = f"val_loss {got_loss:.4f} differs from the expected {wanted_loss:.4f}"
        if abs(got_loss - plain_loss) < 1e-4:
            reason += ": that is the plain mean over batches; weight each batch by its words, len(targets)"
        raise CheckFailed(reason)
    expect(abs(got_top5 - wanted_top5) < 1e-3, f"val_top5 {got_top5:.2f} differs from the expected {wanted_top5:.2f}, "
                                                "the share of all VAL words with the target in the top 5")


def check(folder):
    train = load(folder, "train")
    cache = torch.randn(4, 3, 5).half()  # (num_images, num_pixels, encoder_dim), as FeatureCache holds them
    for val_cache in (cache, None):
        stats, calls, run = validate_with_stubs(train, val_cache)
        cached = val_cache is not None
        expect_every_caption_once(calls, run)
        expect(all(call["cached"] == cached for call in calls),
               f"compute_loss got cached={not cached} although run.val_cache is {'set' if cached else 'None'}: "
               "pass run.val_cache is not None")
        expect(all(call["alpha_c"] == run.args.alpha_c for call in calls),
               f"compute_loss got alpha_c={calls[0]['alpha_c']}; pass run.args.alpha_c")
        expect(all(call["in_autocast"] for call in calls),
               "run compute_loss inside `with run.autocast():`, as in training (mixed precision)")
        expect_right_averages(stats, calls)
