"""Self-critical sequence training: the CIDEr-D reward, the sampler, and a toy run where SCST helps."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from checkpoints import load_checkpoint
from decoding import beam_search
from models import DecoderWithAttention
from scst import CiderD, bad_ending_ids, constrain, sample_captions

# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------


def test_cider_d_equals_pycocoevalcap_with_corpus_document_frequencies():
    from pycocoevalcap.cider.cider import Cider

    rng = np.random.default_rng(0)
    words = "a man dog runs on the grass red ball with two people street".split()
    refs = {i: [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(5)] for i in range(30)}
    hyps = {i: " ".join(rng.choice(words, size=rng.integers(2, 10))) for i in range(30)}
    hyps[3] = refs[3][0]  # one exact match
    mean, per_image = Cider().compute_score(refs, {i: [h] for i, h in hyps.items()})
    ours = CiderD(refs)  # document frequencies from the same references: coco-caption's mode
    scores = [ours.score(i, hyps[i]) for i in range(30)]
    assert np.allclose(scores, per_image, atol=1e-6, rtol=0)
    assert abs(np.mean(scores) - mean) < 1e-6


def test_cider_d_clipping_by_hand():
    # two images, every n-gram in one document only: each idf is log(2) - log(1) = log 2
    cider = CiderD({0: ["a b"], 1: ["c d"]})
    # "a a" vs "a b": unigram tf-idf (2 log2) is clipped to the reference's (log2):
    # cos_1 = log2 * log2 / (2 log2 * sqrt(2) log2) = 1 / (2 sqrt 2); no shared bigram; no 3-, 4-grams.
    # Both have one bigram, so no length penalty. CIDEr-D = 10 * mean over n of cos_n.
    assert cider.score(0, "a a") == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4, abs=1e-9)
    # without clipping the unigram term would be 1 / sqrt(2): twice as much
    assert cider.score(0, "a b") == pytest.approx(10 * (1 + 1) / 4, abs=1e-9)


def test_cider_d_length_penalty_by_hand():
    cider = CiderD({0: ["a b"], 1: ["c d"]})
    # "a b c d" vs "a b": cos_1 = 2 / (2 * sqrt 2), cos_2 = 1 / sqrt 3 (three bigrams, one shared);
    # 3 bigrams against 1: delta 2, penalty exp(-4 / (2 * 6^2)).
    expected = 10 * math.exp(-4 / 72) * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4
    assert cider.score(0, "a b c d") == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------



@pytest.fixture
def word_map(toy_word_map):
    return toy_word_map('a', 'dog', 'with')  # <pad> 0, then these, then <unk>, <start>, <end>


def test_constraints_block_bad_endings_and_repeats(word_map):
    log_probs = torch.zeros(3, 7)  # (rows, vocab)
    previous = torch.tensor([5, 3, 2])  # <start>, "with", "dog"
    out = constrain(log_probs, previous, word_map, bad_ending_ids(word_map, previous.device))
    assert torch.isinf(out[1, 6]) and torch.isinf(out[1, 3])  # no <end> after "with", no "with with"
    assert torch.isinf(out[2, 2]) and not torch.isinf(out[2, 6])  # no "dog dog"; "dog <end>" is fine
    assert torch.isinf(out[:, [0, 5]]).all()  # <pad> and <start> are never words
    assert not torch.isinf(out[0, [1, 2, 3, 4, 6]]).any()


def test_sampler_shapes_masks_and_gradients(word_map):
    torch.manual_seed(0)
    decoder = DecoderWithAttention(8, 8, 16, len(word_map), encoder_dim=12, dropout=0.0)
    features = torch.randn(4, 5, 12)
    tokens, log_probs, mask = sample_captions(decoder, features, word_map, samples_per_image=3, max_len=6)
    assert tokens.shape == log_probs.shape == mask.shape and tokens.shape[0] == 12
    for row, m in zip(tokens.tolist(), mask.tolist()):
        n = int(sum(m))
        assert all(t == 0 for t in row[n:])  # padding after <end>
        assert n == len(row) or row[n - 1] == word_map["<end>"]
        assert all(a != b for a, b in zip(row[: n - 1], row[1:n]))  # no word twice in a row
    assert (log_probs * mask <= 0).all()
    (log_probs * mask).sum().backward()
    assert decoder.fc.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# A toy set where cross-entropy plateaus and SCST raises CIDEr-D
# ---------------------------------------------------------------------------


def _toy_collection(folder):
    """Every image: 3 x "a photo" (in every image: idf 0, so CIDEr-D 0) and 2 x "the COLOUR thing".
    Cross-entropy's greedy caption is "a photo" (probability 0.6) however long it trains;
    CIDEr-D rewards the rarer, image-specific caption."""
    os.makedirs(os.path.join(folder, "imgs"))
    colors = {"red": (220, 20, 20), "green": (20, 180, 40), "blue": (30, 60, 230)}
    images = []
    for i in range(16):
        color = list(colors)[i % 3]
        Image.new("RGB", (64, 64), colors[color]).save(os.path.join(folder, "imgs", f"{i}.png"))
        sentences = ["a photo"] * 3 + [f"the {color} thing"] * 2
        images.append({"filename": f"{i}.png", "filepath": "imgs", "imgid": i,
                       "split": "train" if i < 12 else "val" if i < 14 else "test",
                       "sentences": [{"tokens": s.split()} for s in sentences]})
    path = os.path.join(folder, "toy.json")
    json.dump({"images": images}, open(path, "w"))
    return path


def _greedy_train_cider(checkpoint_path, folder, name):
    """Mean CIDEr-D (TRAIN document frequencies) of greedy captions on the TRAIN images."""
    from dataset import ImageDataset, load_references
    from models import load_model

    state = load_checkpoint(checkpoint_path)
    encoder, decoder = load_model(state)
    word_map = state["word_map"]
    rev = {v: k for k, v in word_map.items()}
    refs = {i: [" ".join(r) for r in refs] for i, refs in enumerate(load_references(folder, name, "TRAIN"))}
    images = ImageDataset(folder, name, "TRAIN")
    batch = torch.stack([images[i][0] for i in range(len(images))])  # (12, 3, 64, 64)
    with torch.no_grad():
        hyps = beam_search(decoder, encoder(batch), word_map, 1, 10,
                           constrained=state["config"].get("constrained_decoding", False))
    cider = CiderD(refs)
    return float(np.mean([cider.score(i, " ".join(rev[t] for t in h["tokens"])) for i, h in enumerate(hyps)]))


def test_scst_raises_cider_where_cross_entropy_plateaus(tmp_path, tiny_model_args):
    import create_input_files

    json_path = _toy_collection(str(tmp_path / "raw"))
    folder = str(tmp_path / "data")
    create_input_files.main(["--dataset", "coco", "--karpathy-json", json_path, "--image-folder",
                             str(tmp_path / "raw"), "--output-folder", folder, "--image-size", "64",
                             "--min-word-freq", "1", "--workers", "1"])
    name = "coco_5_cap_per_img_1_min_word_freq"
    # pretrained features tell the colours apart (the shipped EfficientNet-Lite0 weights load offline)
    model = [a for a in tiny_model_args if a != "--no-pretrained"]
    common = ["--data-folder", folder, *model, "--decoder-lr", "5e-3", "--dropout", "0"]
    xe = str(tmp_path / "xe")
    train.main([*common, "--epochs", "15", "--out-dir", xe])
    ce_at_15 = _greedy_train_cider(os.path.join(xe, "last.pt"), folder, name)
    train.main([*common, "--epochs", "30", "--out-dir", xe, "--resume", os.path.join(xe, "last.pt")])
    ce_at_30 = _greedy_train_cider(os.path.join(xe, "last.pt"), folder, name)
    assert ce_at_15 < 0.5 and ce_at_30 < 0.5  # plateau: more cross-entropy does not help

    scst = str(tmp_path / "scst")
    train.main([*common, "--epochs", "45", "--out-dir", scst, "--resume", os.path.join(xe, "last.pt"),
                "--scst", "--scst-lr", "5e-3", "--scst-samples", "4", "--batch-size", "4"])
    after = _greedy_train_cider(os.path.join(scst, "last.pt"), folder, name)
    assert after > ce_at_30 + 2.0, (ce_at_30, after)  # the image-specific caption scores 3.0
    state = load_checkpoint(os.path.join(scst, "last.pt"))
    assert state["phase"] == "scst" and state["select_on"] == "CIDEr"
    assert state["config"]["constrained_decoding"] is True
    assert "reward" in state["history"][-1]
