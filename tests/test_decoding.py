"""decoding.py: the one batched beam search, against greedy, one-at-a-time and a toy decoder with a known best."""
import math

import pytest
import torch
from torch import nn

from decoding import ban_repeated_trigrams, beam_search, model_decoding
from models import DecoderWithAttention




@pytest.fixture
def word_map(toy_word_map):
    return toy_word_map('a', 'b', 'c')  # <pad> 0, then these, then <unk>, <start>, <end>


def _random_decoder(seed=0, vocab=7):  # the word_map fixture's 7 entries
    torch.manual_seed(seed)
    decoder = DecoderWithAttention(16, 8, 24, vocab, encoder_dim=12, dropout=0.0).eval()
    with torch.no_grad():
        decoder.fc.weight.mul_(20)  # sharper distributions: captions of varied length
    return decoder


@torch.no_grad()
def greedy(decoder, features, word_map, max_len):
    """A plain reference implementation: always take the most likely next word."""
    out = []
    for i in range(len(features)):
        f = features[i : i + 1]
        projected = decoder.attention.project_features(f)
        h, c = decoder.init_hidden_state(f)
        word, tokens, logp = word_map["<start>"], [], 0.0
        for _ in range(max_len):
            h, c, _ = decoder.step(decoder.embedding(torch.tensor([word])), h, c, f, projected)
            log_probs = torch.log_softmax(decoder.word_scores(h), dim=1)[0]
            word = int(log_probs.argmax())
            logp += float(log_probs[word])
            if word == word_map["<end>"]:
                break
            tokens.append(word)
        out.append((tokens, logp))
    return out


def test_beam_size_one_equals_greedy(word_map):
    decoder = _random_decoder()
    features = torch.randn(12, 9, 12)
    hyps = beam_search(decoder, features, word_map, beam_size=1, max_len=12)
    for hyp, (tokens, logp) in zip(hyps, greedy(decoder, features, word_map, 12)):
        assert hyp["tokens"] == tokens
        assert hyp["log_prob"] == pytest.approx(logp, abs=1e-4)
        assert hyp["alphas"].shape == (len(tokens), 9)


@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_equals_one_at_a_time(beam_size, word_map):
    decoder = _random_decoder(1)
    features = torch.randn(10, 9, 12)
    batched = beam_search(decoder, features, word_map, beam_size=beam_size, max_len=15)
    lengths = set()
    for i in range(10):
        alone = beam_search(decoder, features[i : i + 1], word_map, beam_size=beam_size, max_len=15)[0]
        assert batched[i]["tokens"] == alone["tokens"]
        assert batched[i]["score"] == pytest.approx(alone["score"], abs=1e-4)
        assert torch.allclose(batched[i]["alphas"], alone["alphas"], atol=1e-5)
        lengths.add(len(alone["tokens"]))
    assert len(lengths) > 1  # images finished at different steps, so the batch really shrank


def test_beam_is_never_worse_than_greedy(word_map):
    decoder = _random_decoder(2)
    features = torch.randn(16, 9, 12)
    g = beam_search(decoder, features, word_map, beam_size=1, max_len=12)
    b = beam_search(decoder, features, word_map, beam_size=4, max_len=12)
    assert all(bb["log_prob"] >= gg["log_prob"] - 1e-5 for bb, gg in zip(b, g) if gg["finished"])


class MarkovDecoder(nn.Module):
    """A hand-made decoder: the next word depends only on the previous one, through a fixed table.

    h holds the previous word as a one-hot vector, so word_scores(h) reads that word's row."""

    def __init__(self, table):
        super().__init__()
        vocab = table.shape[0]
        self.vocab_size = vocab
        self.embedding = nn.Embedding.from_pretrained(torch.eye(vocab))
        self.log_table = torch.log(table)
        self.attention = type("A", (), {"project_features": staticmethod(lambda f: f)})()

    def init_hidden_state(self, features):
        zeros = features.new_zeros(len(features), self.vocab_size)
        return zeros, zeros

    def step(self, embedded, h, c, features, projected):
        alpha = features.new_full((len(embedded), features.shape[1]), 1.0 / features.shape[1])
        return embedded, c, alpha

    def word_scores(self, h):
        return self.log_table[h.argmax(1)]  # (rows, vocab): the previous word's row (a matmul would make 0 * -inf)


def _table(word_map, rows):
    vocab = len(word_map)
    table = torch.full((vocab, vocab), 1e-9)
    for prev, nexts in rows.items():
        for word, p in nexts.items():
            table[word_map[prev], word_map[word]] = p
    return table / table.sum(1, keepdim=True)


def test_toy_decoder_best_sequence_is_found(word_map):
    # greedy takes "a" (0.6), then "c" (0.45), then <end>: 0.6 * 0.45 * 0.95 = 0.2565.
    # The best caption is "b c": 0.4 * 0.9 * 0.95 = 0.342, which greedy never looks at.
    table = _table(word_map, {"<start>": {"a": 0.6, "b": 0.4}, "a": {"<end>": 0.3, "a": 0.25, "c": 0.45},
                    "b": {"c": 0.9, "<end>": 0.1}, "c": {"<end>": 0.95, "a": 0.05}})
    decoder = MarkovDecoder(table)
    features = torch.zeros(2, 4, 3)
    greedy_hyp = beam_search(decoder, features, word_map, beam_size=1, max_len=10)[0]
    best = beam_search(decoder, features, word_map, beam_size=3, max_len=10)
    assert greedy_hyp["tokens"] == [word_map["a"], word_map["c"]]
    for hyp in best:
        assert hyp["tokens"] == [word_map["b"], word_map["c"]]
        assert hyp["log_prob"] == pytest.approx(math.log(0.4 * 0.9 * 0.95), abs=1e-5)
        assert hyp["finished"]


def test_no_end_returns_the_best_unfinished_caption(word_map):
    table = _table(word_map, {"<start>": {"a": 0.7, "b": 0.3}, "a": {"a": 0.8, "b": 0.2}, "b": {"b": 0.9, "a": 0.1}})
    table[:, word_map["<end>"]] = 0.0  # no word, not even an unlikely one, is ever followed by <end>
    table = table / table.sum(1, keepdim=True)
    hyps = beam_search(MarkovDecoder(table), torch.zeros(3, 4, 3), word_map, beam_size=3, max_len=6)
    for hyp in hyps:  # the tutorial raises "max() arg is an empty sequence" here
        assert not hyp["finished"] and len(hyp["tokens"]) == 6
        assert hyp["tokens"] == [word_map["a"]] * 6


def test_length_penalty_prefers_longer_captions(word_map):
    # "a <end>" = 0.5 * 0.5 = 0.25 ; "b c <end>" = 0.5 * 0.9 * 0.5 = 0.225: raw prefers the short one,
    # normalised by length (2 vs 3 words) the long one wins.
    table = _table(word_map, {"<start>": {"a": 0.5, "b": 0.5}, "a": {"<end>": 0.5, "c": 0.5}, "b": {"c": 0.9, "<end>": 0.1},
                    "c": {"<end>": 0.5, "a": 0.5}})
    f = torch.zeros(1, 4, 3)
    assert beam_search(MarkovDecoder(table), f, word_map, 4, 10)[0]["tokens"] == [word_map["a"]]
    long = beam_search(MarkovDecoder(table), f, word_map, 4, 10, length_penalty=1.0)[0]
    assert long["tokens"] == [word_map["b"], word_map["c"]]


def test_beams_keep_at_most_beam_size_finished_captions(toy_word_map):
    # beam 2: "a <end>" finishes at step 2 and "b c" goes on; "b c" splits into "b c d" and "b c e", which
    # both end at step 4. Three captions finished, but a beam of 2 returns its 2 best: by score with the
    # length penalty 1, "b c d" (log 0.196 / 4) ahead of "a" (log 0.42 / 2), and "b c e" (log 0.16 / 4) dropped.
    word_map = toy_word_map("a", "b", "c", "d", "e")
    table = _table(word_map, {"<start>": {"a": 0.6, "b": 0.4}, "a": {"<end>": 0.7, "c": 0.3},
                              "b": {"c": 0.9, "<end>": 0.1}, "c": {"d": 0.55, "e": 0.45}, "d": {"<end>": 1.0},
                              "e": {"<end>": 1.0}})
    hyp = beam_search(MarkovDecoder(table), torch.zeros(1, 4, 3), word_map, 2, 10, length_penalty=1.0)[0]
    tokens = [[word_map[w] for w in caption] for caption in (["b", "c", "d"], ["a"])]
    assert [b["tokens"] for b in hyp["beams"]] == tokens and hyp["tokens"] == tokens[0]
    assert hyp["beams"][0]["score"] > hyp["beams"][1]["score"]


def test_unk_suppression(word_map):
    table = _table(word_map, {"<start>": {"<unk>": 0.9, "a": 0.1}, "<unk>": {"<end>": 1.0}, "a": {"<end>": 1.0}})
    f = torch.zeros(1, 4, 3)
    assert beam_search(MarkovDecoder(table), f, word_map, 2, 5)[0]["tokens"] == [word_map["<unk>"]]
    assert beam_search(MarkovDecoder(table), f, word_map, 2, 5, suppress_unk=True)[0]["tokens"] == [word_map["a"]]


def _trigrams(tokens):
    return list(zip(tokens, tokens[1:], tokens[2:]))


def test_ban_repeated_trigrams_forbids_exactly_the_repeating_word():
    seqs = torch.tensor([[1, 2, 3, 1, 2], [1, 2, 3, 4, 2], [1, 2, 0, 0, 0]])  # (rows, t)
    out = ban_repeated_trigrams(torch.zeros(3, 6), seqs)  # (rows, vocab)
    banned = [torch.isinf(row).nonzero().view(-1).tolist() for row in out]
    # row 0 ends in "1 2", once followed by 3; row 1's "4 2" is new; row 2's "0 0" was followed by 0
    assert banned == [[3], [], [0]]
    short = torch.zeros(2, 6)
    assert torch.equal(ban_repeated_trigrams(short, torch.tensor([[1, 2], [2, 2]])), short)


def test_constrained_beam_search_never_repeats_a_trigram(word_map):
    # a likes b and b likes a, and nothing ever ends: unconstrained, the caption is "a b a b a b"
    table = _table(word_map, {"<start>": {"a": 0.9, "b": 0.1}, "a": {"b": 0.9, "c": 0.1}, "b": {"a": 0.9, "c": 0.1},
                    "c": {"a": 0.5, "b": 0.5}})
    table[:, word_map["<end>"]] = 0.0
    table = table / table.sum(1, keepdim=True)
    f = torch.zeros(2, 4, 3)
    free = beam_search(MarkovDecoder(table), f, word_map, 3, 6)
    kept = beam_search(MarkovDecoder(table), f, word_map, 3, 6, block_trigrams=True)
    for loose, strict in zip(free, kept):
        assert len(set(_trigrams(loose["tokens"]))) < len(_trigrams(loose["tokens"]))
        assert len(strict["tokens"]) == 6
        assert len(set(_trigrams(strict["tokens"]))) == len(_trigrams(strict["tokens"]))


def test_model_decoding_reads_the_config_and_a_given_length_penalty_wins():
    assert model_decoding({}) == {"length_penalty": 0.0, "constrained": False, "block_trigrams": False}
    tuned = {"length_penalty": 0.7, "constrained_decoding": True, "block_trigrams": True}
    assert model_decoding(tuned) == {"length_penalty": 0.7, "constrained": True, "block_trigrams": True}
    assert model_decoding(tuned, 0.0)["length_penalty"] == 0.0
