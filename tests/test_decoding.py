"""The shared beam search, eval.py, caption.py and the metrics."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import metrics
from conftest import ROOT
from decoding import beam_search
from models import DecoderWithAttention

WORD_MAP = {"<pad>": 0, "a": 1, "b": 2, "c": 3, "<unk>": 4, "<start>": 5, "<end>": 6}


def _random_decoder(seed=0, vocab=len(WORD_MAP)):
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


def test_beam_size_one_equals_greedy():
    decoder = _random_decoder()
    features = torch.randn(12, 9, 12)
    hyps = beam_search(decoder, features, WORD_MAP, beam_size=1, max_len=12)
    for hyp, (tokens, logp) in zip(hyps, greedy(decoder, features, WORD_MAP, 12)):
        assert hyp["tokens"] == tokens
        assert hyp["log_prob"] == pytest.approx(logp, abs=1e-4)
        assert hyp["alphas"].shape == (len(tokens), 9)


@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_equals_one_at_a_time(beam_size):
    decoder = _random_decoder(1)
    features = torch.randn(10, 9, 12)
    batched = beam_search(decoder, features, WORD_MAP, beam_size=beam_size, max_len=15)
    lengths = set()
    for i in range(10):
        alone = beam_search(decoder, features[i : i + 1], WORD_MAP, beam_size=beam_size, max_len=15)[0]
        assert batched[i]["tokens"] == alone["tokens"]
        assert batched[i]["score"] == pytest.approx(alone["score"], abs=1e-4)
        assert torch.allclose(batched[i]["alphas"], alone["alphas"], atol=1e-5)
        lengths.add(len(alone["tokens"]))
    assert len(lengths) > 1  # images finished at different steps, so the batch really shrank


def test_beam_is_never_worse_than_greedy():
    decoder = _random_decoder(2)
    features = torch.randn(16, 9, 12)
    g = beam_search(decoder, features, WORD_MAP, beam_size=1, max_len=12)
    b = beam_search(decoder, features, WORD_MAP, beam_size=4, max_len=12)
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


def _table(rows):
    vocab = len(WORD_MAP)
    table = torch.full((vocab, vocab), 1e-9)
    for prev, nexts in rows.items():
        for word, p in nexts.items():
            table[WORD_MAP[prev], WORD_MAP[word]] = p
    return table / table.sum(1, keepdim=True)


def test_toy_decoder_best_sequence_is_found():
    # greedy takes "a" (0.6), then "c" (0.45), then <end>: 0.6 * 0.45 * 0.95 = 0.2565.
    # The best caption is "b c": 0.4 * 0.9 * 0.95 = 0.342, which greedy never looks at.
    table = _table({"<start>": {"a": 0.6, "b": 0.4}, "a": {"<end>": 0.3, "a": 0.25, "c": 0.45},
                    "b": {"c": 0.9, "<end>": 0.1}, "c": {"<end>": 0.95, "a": 0.05}})
    decoder = MarkovDecoder(table)
    features = torch.zeros(2, 4, 3)
    greedy_hyp = beam_search(decoder, features, WORD_MAP, beam_size=1, max_len=10)[0]
    best = beam_search(decoder, features, WORD_MAP, beam_size=3, max_len=10)
    assert greedy_hyp["tokens"] == [WORD_MAP["a"], WORD_MAP["c"]]
    for hyp in best:
        assert hyp["tokens"] == [WORD_MAP["b"], WORD_MAP["c"]]
        assert hyp["log_prob"] == pytest.approx(math.log(0.4 * 0.9 * 0.95), abs=1e-5)
        assert hyp["finished"]


def test_no_end_returns_the_best_unfinished_caption():
    table = _table({"<start>": {"a": 0.7, "b": 0.3}, "a": {"a": 0.8, "b": 0.2}, "b": {"b": 0.9, "a": 0.1}})
    table[:, WORD_MAP["<end>"]] = 0.0  # no word, not even an unlikely one, is ever followed by <end>
    table = table / table.sum(1, keepdim=True)
    hyps = beam_search(MarkovDecoder(table), torch.zeros(3, 4, 3), WORD_MAP, beam_size=3, max_len=6)
    for hyp in hyps:  # the tutorial raises "max() arg is an empty sequence" here
        assert not hyp["finished"] and len(hyp["tokens"]) == 6
        assert hyp["tokens"] == [WORD_MAP["a"]] * 6


def test_length_penalty_prefers_longer_captions():
    # "a <end>" = 0.5 * 0.5 = 0.25 ; "b c <end>" = 0.5 * 0.9 * 0.5 = 0.225: raw prefers the short one,
    # normalised by length (2 vs 3 words) the long one wins.
    table = _table({"<start>": {"a": 0.5, "b": 0.5}, "a": {"<end>": 0.5, "c": 0.5}, "b": {"c": 0.9, "<end>": 0.1},
                    "c": {"<end>": 0.5, "a": 0.5}})
    f = torch.zeros(1, 4, 3)
    assert beam_search(MarkovDecoder(table), f, WORD_MAP, 4, 10)[0]["tokens"] == [WORD_MAP["a"]]
    long = beam_search(MarkovDecoder(table), f, WORD_MAP, 4, 10, length_penalty=1.0)[0]
    assert long["tokens"] == [WORD_MAP["b"], WORD_MAP["c"]]


def test_unk_suppression():
    table = _table({"<start>": {"<unk>": 0.9, "a": 0.1}, "<unk>": {"<end>": 1.0}, "a": {"<end>": 1.0}})
    f = torch.zeros(1, 4, 3)
    assert beam_search(MarkovDecoder(table), f, WORD_MAP, 2, 5)[0]["tokens"] == [WORD_MAP["<unk>"]]
    assert beam_search(MarkovDecoder(table), f, WORD_MAP, 2, 5, suppress_unk=True)[0]["tokens"] == [WORD_MAP["a"]]


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

REFS = {1: ["a red square on grey", "the square is red"], 2: ["a blue box", "one blue square ."]}
HYPS = {1: "a red square", 2: "a blue square"}


@pytest.mark.skipif(not metrics.java_available(), reason="needs Java for the PTB tokenizer and METEOR")
def test_scores_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = metrics.score_captions(REFS, HYPS, quiet=True)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": s} for s in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in HYPS.items()})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert ours["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0])
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])


def test_without_java_the_rest_is_still_computed(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = metrics.score_captions(REFS, HYPS)
    assert "METEOR" not in scores and "SPICE" not in scores
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores)
    err = capsys.readouterr().err.strip().splitlines()
    assert any("no Java" in line and "METEOR skipped" in line for line in err)
    assert len(err) == 2  # that line, and SPICE's
    assert metrics.fallback_tokenize({1: ["One blue square ."]}) == {1: ["one blue square"]}


def test_spice_skip_says_why(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_spice_ready", lambda: False)
    metrics.score_captions(REFS, HYPS, metrics=("SPICE",))
    assert "SPICE skipped" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# eval.py
# ---------------------------------------------------------------------------


def test_eval_report_fields_and_scores(prepared, tiny_checkpoint, tmp_path):
    import eval as evaluation

    out = str(tmp_path / "results.json")
    report = evaluation.evaluate(tiny_checkpoint, prepared[0], None, "TEST", [1, 3], batch_size=2, out=out,
                                 workers=0)
    saved = json.load(open(out))
    assert saved == json.loads(json.dumps(report))
    assert {"checkpoint", "split", "data_folder", "results"} <= set(saved)
    assert [r["beam_size"] for r in saved["results"]] == [1, 3]
    refs = json.load(open(os.path.join(prepared[0], f"TEST_REFS_{prepared[1]}.json")))
    for r in saved["results"]:
        assert len(r["captions"]) == 2 and {"image_id", "caption"} <= set(r["captions"][0])
        hyps = {i: c["caption"] for i, c in enumerate(r["captions"])}
        direct = metrics.score_captions({i: [" ".join(t) for t in refs[i]] for i in hyps}, hyps, quiet=True)
        assert r["scores"] == pytest.approx(direct)
        assert "Bleu_4" in r["scores"] and "CIDEr" in r["scores"]


def test_eval_cli_bad_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(junk)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a checkpoint of this project" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# caption.py
# ---------------------------------------------------------------------------


def test_attention_figure_has_one_panel_per_word():
    import caption

    alphas = np.random.rand(4, 9).astype(np.float32)
    fig = caption.attention_figure(Image.new("RGB", (80, 60), (100, 50, 0)), ["a", "red", "square", "here"], alphas, 3)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["a", "red", "square", "here"]


def test_caption_cli_writes_figures_and_survives_bad_images(tiny_checkpoint, prepared, tmp_path):
    raw = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs")
    good = os.path.join(raw, "img000.jpg")
    rgba = tmp_path / "photo.png"
    Image.new("RGBA", (90, 50), (0, 200, 0, 128)).save(rgba)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels in a few kB: Pillow's guard refuses it
    figs = tmp_path / "figs"
    result = subprocess.run(
        [sys.executable, "caption.py", "--checkpoint", tiny_checkpoint, "--beam-size", "3", "--out", str(figs),
         "--img", good, str(tmp_path / "missing.jpg"), str(not_image), str(bomb), str(rgba)],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "no such file" in errors[0] and "not an image" in errors[1] and "decompression bomb" in errors[2]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(figs)) == ["img000.png", "photo.png"]  # the good ones were still captioned
    assert result.stdout.count(": ") >= 2


def test_caption_cli_single_png_and_foreign_checkpoint(tiny_checkpoint, prepared, tmp_path):
    raw = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs", "img001.jpg")
    out = tmp_path / "one.png"
    ok = subprocess.run([sys.executable, "caption.py", "--checkpoint", tiny_checkpoint, "--img", raw, "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 100
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    bad = subprocess.run([sys.executable, "caption.py", "--checkpoint", str(foreign), "--img", raw],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "not a checkpoint of this project" in bad.stderr
