"""Shared fixtures: a tiny captioned collection made inside the tests, prepared data, a tiny trained model."""
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pyproject.toml puts it on sys.path

COLORS = {"red": (220, 20, 20), "green": (20, 180, 40), "blue": (30, 60, 230)}
TINY_MODEL = ["--encoder", "efficientnet_lite0", "--no-pretrained", "--encoded-size", "0", "--emb-dim", "16",
              "--attention-dim", "16", "--decoder-dim", "32", "--batch-size", "8", "--workers", "0"]


def make_collection(folder, splits=("train",) * 8 + ("val",) * 2 + ("test",) * 2, size=48, extra_words=None):
    """Write small JPEGs and a Karpathy-format JSON; return the JSON path.

    Image i is a coloured square; its captions name the colour, so a model can learn them.
    extra_words: {split: word} adds a word that appears only in that split's captions."""
    os.makedirs(os.path.join(folder, "imgs"), exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i, split in enumerate(splits):
        color = list(COLORS)[i % len(COLORS)]
        arr = np.full((size, size, 3), 127, np.uint8)
        arr[8:40, 8:40] = COLORS[color]
        arr = np.clip(arr.astype(int) + rng.integers(-5, 6, arr.shape), 0, 255).astype(np.uint8)
        name = f"img{i:03d}.jpg"
        Image.fromarray(arr).save(os.path.join(folder, "imgs", name), quality=95)
        sentences = [f"a {color} square", f"a {color} box on grey", f"the square is {color}",
                     f"one {color} square", f"a {color} block"]
        if extra_words and split in extra_words:
            sentences[0] += " " + extra_words[split]
        images.append({"filename": name, "filepath": "imgs", "imgid": i, "split": split,
                       "sentences": [{"tokens": s.split(), "raw": s} for s in sentences]})
    path = os.path.join(folder, "dataset_tiny.json")
    with open(path, "w") as f:
        json.dump({"dataset": "tiny", "images": images}, f)
    return path


def prepare_args(json_path, out, *extra, image_size=64):
    return ["--dataset", "flickr8k", "--karpathy-json", json_path, "--image-folder", os.path.dirname(json_path),
            "--output-folder", out, "--image-size", str(image_size), "--min-word-freq", "1", "--workers", "1",
            *extra]


BASE = "flickr8k_5_cap_per_img_1_min_word_freq"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """(data folder, base name) of the tiny collection, prepared at 64 x 64."""
    import create_input_files

    root = tmp_path_factory.mktemp("tiny")
    json_path = make_collection(str(root / "raw"))
    out = str(root / "prepared")
    create_input_files.main(prepare_args(json_path, out))
    return out, BASE


@pytest.fixture(scope="session")
def tiny_checkpoint(prepared, tmp_path_factory):
    """best.pt of a tiny model trained for a few epochs on the prepared collection."""
    import train

    out = str(tmp_path_factory.mktemp("run"))
    train.main(["--data-folder", prepared[0], "--epochs", "3", "--out-dir", out, "--decoder-lr", "3e-3", *TINY_MODEL])
    return os.path.join(out, "best.pt")


def build_toy_word_map(*words):
    """The layout build_word_map writes: <pad> 0, the words from 1, then <unk>, <start>, <end>."""
    word_map = {"<pad>": 0, **{w: i for i, w in enumerate(words, 1)}}
    for token in ("<unk>", "<start>", "<end>"):
        word_map[token] = len(word_map)
    return word_map


# ---------------------------------------------------------------------------
# Fixtures: tests ask for these by name instead of importing from this file.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def tiny_model_args():
    """train.py options for a model small enough to train in seconds."""
    return list(TINY_MODEL)


@pytest.fixture(scope="session")
def collection_factory():
    """make_collection(folder, splits=..., size=..., extra_words=...) -> Karpathy JSON path."""
    return make_collection


@pytest.fixture(scope="session")
def prepare_argv():
    """prepare_args(json_path, out, *extra, image_size=64) -> create_input_files.py argv."""
    return prepare_args


@pytest.fixture(scope="session")
def tiny_base_name():
    return BASE


@pytest.fixture(scope="session")
def eight_captions():
    """(features (8, 4, 24), captions (8, 9), caplens (8,)): 8 distinct "images" with one caption each, of 2 to 5
    words among w1..w10 (ids 1..10 of toy_word_map(w1..w10); <start> 12, <end> 13): the overfit tests' task."""
    import torch

    torch.manual_seed(0)
    features = torch.randn(8, 4, 24)
    captions = []
    for i in range(8):
        words = [1 + (i + j * 3) % 10 for j in range(2 + i % 4)]
        captions.append([12, *words, 13] + [0] * (7 - len(words)))
    captions = torch.tensor(captions)
    return features, captions, (captions != 0).sum(1)


@pytest.fixture(scope="session")
def toy_word_map():
    """toy_word_map(*words) -> a word map with these words (build_word_map's layout)."""
    return build_toy_word_map
