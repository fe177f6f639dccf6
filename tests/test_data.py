"""create_input_files.py and dataset.py: formats, layout, bad input, loading."""
import io
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import create_input_files
from dataset import CaptionDataset, ImageDataset, load_references, reference_sentences
from utils import UserError, load_image, prepared_name, progress


@pytest.fixture
def prep(tmp_path, collection_factory, prepare_argv):
    """prep(*extra, json_path=None, **collection) -> (out, json path): a collection made in tmp_path, prepared."""
    def run(*extra, json_path=None, **collection):
        json_path = json_path or collection_factory(str(tmp_path / "raw"), **collection)
        out = str(tmp_path / "out")
        create_input_files.main(prepare_argv(json_path, out, *extra))
        return out, json_path

    return run


@pytest.fixture
def load(tiny_base_name):
    """load(out, kind, split="TRAIN") -> the content of one prepared JSON file."""
    def read(out, kind, split="TRAIN"):
        with open(os.path.join(out, prepared_name(kind, tiny_base_name, split))) as f:
            return json.load(f)

    return read


@pytest.fixture
def cli(repo_root):
    """cli(*args) -> the CompletedProcess of `python *args`, run in the repository."""
    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True)

    return run


# ---------------------------------------------------------------------------
# Round trip and the tutorial's layout
# ---------------------------------------------------------------------------


def test_round_trip_through_spawned_workers(prepared):
    folder, base = prepared
    word_map = json.load(open(os.path.join(folder, f"WORDMAP_{base}.json")))
    rev = {v: k for k, v in word_map.items()}
    refs = load_references(folder, base, "TRAIN")
    data = CaptionDataset(folder, base, "TRAIN")
    loader = DataLoader(data, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    decoded = []
    for images, captions, caplens in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        for cap, n in zip(captions.tolist(), caplens.view(-1).tolist()):
            assert cap[0] == word_map["<start>"] and cap[n - 1] == word_map["<end>"]
            assert all(t == 0 for t in cap[n:])  # padded with <pad>
            decoded.append([rev[t] for t in cap[1 : n - 1]])
    # every image has exactly 5 references, so all of them are kept, in some order
    for i, image_refs in enumerate(refs):
        assert sorted(decoded[i * 5 : i * 5 + 5]) == sorted(image_refs)


def test_images_match_the_source_files(prepared, tmp_path, load):
    folder, base = prepared
    raw = os.path.join(os.path.dirname(folder), "raw")
    info = load(folder, "IMAGEINFO", "VAL")
    with h5py.File(os.path.join(folder, f"VAL_IMAGES_{base}.hdf5"), "r") as h5:
        for i, item in enumerate(info):
            expected = load_image(os.path.join(raw, item["file_name"]), 64)
            assert np.array_equal(h5["images"][i], expected)


def test_val_items_carry_all_captions(prepared):
    data = CaptionDataset(*prepared, "VAL")
    image, caption, caplen, all_captions = data[7]
    assert all_captions.shape == (5, 52)
    assert any(torch.equal(caption, c) for c in all_captions)


def test_image_view_yields_each_image_once(prepared):
    images = ImageDataset(*prepared, "TRAIN")
    assert len(images) == 8
    assert len(CaptionDataset(*prepared, "TRAIN")) == 40


def test_output_has_the_tutorial_layout(prepared, load):
    folder, base = prepared
    word_map = json.load(open(os.path.join(folder, f"WORDMAP_{base}.json")))
    assert word_map["<pad>"] == 0
    assert sorted(word_map.values()) == list(range(len(word_map)))
    assert [word_map[t] for t in ("<unk>", "<start>", "<end>")] == [len(word_map) - 3, len(word_map) - 2,
                                                                   len(word_map) - 1]
    for split, n in (("TRAIN", 8), ("VAL", 2), ("TEST", 2)):
        # read it the way the sgrvinod tutorial's CaptionDataset does
        h = h5py.File(os.path.join(folder, f"{split}_IMAGES_{base}.hdf5"), "r")
        imgs, cpi = h["images"], h.attrs["captions_per_image"]
        captions = load(folder, "CAPTIONS", split)
        caplens = load(folder, "CAPLENS", split)
        assert imgs.dtype == np.uint8 and imgs.shape == (n, 3, 64, 64) and cpi == 5
        assert len(captions) == len(caplens) == n * cpi
        assert all(len(c) == 52 for c in captions)  # max_len 50 + <start> + <end>
        h.close()


def test_tutorial_prepared_folder_loads(tmp_path):
    """A folder in the tutorial's layout: no REFS, no IMAGEINFO, its own word map."""
    base = "coco_5_cap_per_img_5_min_word_freq"
    word_map = {"<pad>": 0, "a": 1, "dog": 2, "<unk>": 3, "<start>": 4, "<end>": 5}
    for split in ("TRAIN", "VAL", "TEST"):
        with h5py.File(tmp_path / f"{split}_IMAGES_{base}.hdf5", "w") as h:
            h.attrs["captions_per_image"] = 5
            h.create_dataset("images", (2, 3, 32, 32), dtype="uint8")
        caps = [[4, 1, 2, 5] + [0] * 48] * 10
        json.dump(caps, open(tmp_path / f"{split}_CAPTIONS_{base}.json", "w"))
        json.dump([4] * 10, open(tmp_path / f"{split}_CAPLENS_{base}.json", "w"))
    json.dump(word_map, open(tmp_path / f"WORDMAP_{base}.json", "w"))
    data = CaptionDataset(str(tmp_path), base, "TEST")
    image, caption, caplen, all_caps = data[3]
    assert image.shape == (3, 32, 32) and caplen.item() == 4 and all_caps.shape == (5, 52)
    assert load_references(str(tmp_path), base, "TEST") is None
    refs = reference_sentences(str(tmp_path), base, "TEST", 2)
    assert refs[1] == ["a dog"] * 5


# ---------------------------------------------------------------------------
# Vocabulary, re-running, word maps
# ---------------------------------------------------------------------------


def test_vocabulary_ignores_val_and_test_words(tmp_path, prep, load, tiny_base_name):
    out, _ = prep(extra_words={"val": "zebra", "test": "giraffe", "train": "lamp"})
    word_map = json.load(open(os.path.join(out, f"WORDMAP_{tiny_base_name}.json")))
    assert "lamp" in word_map
    assert "zebra" not in word_map and "giraffe" not in word_map
    # the raw references keep the words the vocabulary does not know
    assert any("giraffe" in r for refs in load(out, "REFS", "TEST") for r in refs)


def test_rerun_replaces_the_output(tmp_path, prep, prepare_argv):
    out, json_path = prep()
    first = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".json")}
    create_input_files.main(prepare_argv(json_path, out))  # no "name already exists"
    second = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".json")}
    assert first == second  # deterministic too
    assert [f for f in os.listdir(out) if f.startswith(".")] == [".prepared"]  # no lock, no staging folder
    sets = sorted(os.listdir(os.path.join(out, ".prepared")))  # the link to the current set, and that set
    assert len(sets) == 2 and os.readlink(os.path.join(out, ".prepared", sets[0])) == sets[1]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, collection_factory, prepare_argv):
    json_path = collection_factory(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    real = create_input_files.write_split

    def interrupted(split, *args, **kwargs):
        if split == "VAL":
            raise KeyboardInterrupt
        return real(split, *args, **kwargs)

    monkeypatch.setattr(create_input_files, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create_input_files.main(prepare_argv(json_path, out))
    assert not os.path.exists(out)  # no TRAIN files, no staging folder, not even the folder it made


def test_word_map_reuse(tmp_path, prep, load, prepare_argv, tiny_base_name):
    out, json_path = prep()
    fixed = {"<pad>": 0, "red": 1, "<unk>": 2, "<start>": 3, "<end>": 4}
    wm_path = tmp_path / "wm.json"
    wm_path.write_text(json.dumps(fixed))
    out2 = str(tmp_path / "out2")
    create_input_files.main(prepare_argv(json_path, out2, "--word-map", str(wm_path)))
    assert json.load(open(os.path.join(out2, f"WORDMAP_{tiny_base_name}.json"))) == fixed
    caps = load(out2, "CAPTIONS")
    assert max(max(c) for c in caps) == 4


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _break_images(raw):
    imgs = os.path.join(raw, "imgs")
    os.remove(os.path.join(imgs, "img000.jpg"))  # missing
    data = open(os.path.join(imgs, "img001.jpg"), "rb").read()
    open(os.path.join(imgs, "img001.jpg"), "wb").write(data[: len(data) // 3])  # truncated
    open(os.path.join(imgs, "img002.jpg"), "w").write("this is not a picture")  # not an image


def test_missing_and_unreadable_images_are_skipped_and_counted(tmp_path, capsys, load, collection_factory,
                                                             prepare_argv, tiny_base_name):
    json_path = collection_factory(str(tmp_path / "raw"))
    _break_images(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    create_input_files.main(prepare_argv(json_path, out))
    text = capsys.readouterr().out
    assert "images missing (TRAIN): 1" in text and "img000.jpg" in text
    assert "images skipped: unreadable: 2" in text and "img001.jpg" in text and "img002.jpg" in text
    assert ImageDataset(out, tiny_base_name, "TRAIN").h5.num_images == 5
    info = load(out, "IMAGEINFO")
    assert [i["file_name"] for i in info] == [f"imgs/img{i:03d}.jpg" for i in range(3, 8)]
    assert len(load(out, "CAPTIONS")) == 25 and len(load(out, "REFS")) == 5


def test_strict_makes_a_bad_image_an_error(tmp_path, cli, collection_factory, prepare_argv):
    json_path = collection_factory(str(tmp_path / "raw"))
    _break_images(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    result = cli("create_input_files.py", *prepare_argv(json_path, out, "--strict"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not os.path.exists(out) or os.listdir(out) == []


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["images"][3].pop("split"), "missing field 'split'"),
    (lambda d: d["images"][2].update(split="holdout"), "unknown split 'holdout'"),
    (lambda d: d["images"][1]["sentences"][0].pop("tokens"), "missing field 'tokens'"),
    (lambda d: d.pop("images"), "missing field 'images'"),
])
def test_malformed_caption_file_is_one_line_exit_2(tmp_path, mutate, field, cli, collection_factory, prepare_argv):
    json_path = collection_factory(str(tmp_path / "raw"))
    data = json.load(open(json_path))
    mutate(data)
    json.dump(data, open(json_path, "w"))
    out = str(tmp_path / "out")
    result = cli("create_input_files.py", *prepare_argv(json_path, out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "dataset_tiny.json" in lines[0]
    assert not os.path.exists(out)


def test_karpathy_file_without_filepath(tmp_path, collection_factory, prepare_argv, load):
    """Flickr's Karpathy files name no 'filepath': the images lie directly in --image-folder."""
    json_path = collection_factory(str(tmp_path / "raw"))
    data = json.load(open(json_path))
    for img in data["images"]:
        del img["filepath"]
    json.dump(data, open(json_path, "w"))
    out = str(tmp_path / "out")
    argv = prepare_argv(json_path, out)
    argv[argv.index("--image-folder") + 1] = str(tmp_path / "raw" / "imgs")
    create_input_files.main(argv)
    assert [i["file_name"] for i in load(out, "IMAGEINFO")] == [f"img{i:03d}.jpg" for i in range(8)]


def test_not_json_is_one_line_exit_2(tmp_path, cli):
    bad = tmp_path / "captions.json"
    bad.write_text("{not json")
    result = cli("create_input_files.py", "--dataset", "coco", "--karpathy-json", str(bad),
                  "--image-folder", str(tmp_path), "--output-folder", str(tmp_path / "o"))
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_caption_filtering_and_sampling(tmp_path, capsys, prep, load, collection_factory, prepare_argv):
    json_path = collection_factory(str(tmp_path / "raw"))
    data = json.load(open(json_path))
    sents = data["images"][0]["sentences"]
    sents[0]["tokens"] = []  # empty: dropped
    sents[1]["tokens"] = ["word"] * 60  # too long: dropped
    data["images"][1]["sentences"] = data["images"][1]["sentences"][:2]  # fewer than 5: resampled
    data["images"][2]["sentences"] += [{"tokens": ["extra", "caption", str(i)]} for i in range(4)]  # more than 5
    data["images"][3]["sentences"] = [{"tokens": []}]  # no usable caption: image skipped
    json.dump(data, open(json_path, "w"))
    out, _ = prep(json_path=json_path)
    text = capsys.readouterr().out
    assert "captions dropped: empty: 2" in text and "captions dropped: longer than 50 words: 1" in text
    assert "images skipped: no usable caption: 1" in text
    refs, caplens = load(out, "REFS"), load(out, "CAPLENS")
    assert len(refs) == 7 and len(caplens) == 35
    assert len(refs[0]) == 5  # raw references: every original caption, before filtering
    again = str(tmp_path / "again")
    create_input_files.main(prepare_argv(json_path, again))
    assert load(again, "CAPTIONS") == load(out, "CAPTIONS")  # sampling is deterministic
    trunc = str(tmp_path / "trunc")
    create_input_files.main(prepare_argv(json_path, trunc, "--truncate-long", "--max-len", "20"))
    assert max(load(trunc, "CAPLENS")) == 22


# ---------------------------------------------------------------------------
# The other caption formats
# ---------------------------------------------------------------------------


def _flickr_files(tmp_path, collection_factory):
    json_path = collection_factory(str(tmp_path / "raw"))
    data = json.load(open(json_path))
    folder = tmp_path / "raw" / "imgs"
    lines, csv_rows, lists = [], ["image,caption"], {"train": [], "val": [], "test": []}
    for img in data["images"]:
        lists[img["split"]].append(img["filename"])
        for n, s in enumerate(img["sentences"]):
            lines.append(f"{img['filename']}#{n}\t{s['raw'].capitalize()} .")
            csv_rows.append(f'{img["filename"]},"{s["raw"].capitalize()}, indeed ."')
    lines.append("ghost.jpg.1#0\tA photo that is in no split list .")  # the Flickr8k quirk
    (tmp_path / "tokens.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "captions.txt").write_text("\n".join(csv_rows) + "\n")
    paths = []
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.txt").write_text("\n".join(lists[split]) + "\n")
        paths.append(str(tmp_path / f"{split}.txt"))
    return str(folder), paths


def test_flickr_token_file(tmp_path, capsys, load, collection_factory):
    folder, lists = _flickr_files(tmp_path, collection_factory)
    out = str(tmp_path / "out")
    create_input_files.main(["--dataset", "flickr8k", "--token-file", str(tmp_path / "tokens.txt"),
                             "--split-lists", *lists, "--image-folder", folder, "--output-folder", out,
                             "--image-size", "32", "--min-word-freq", "1", "--workers", "1"])
    text = capsys.readouterr().out
    assert "images in no split list, ignored: 1 (first: ghost.jpg)" in text
    refs = load(out, "REFS")
    assert len(refs) == 8 and refs[0][0][0] == "a"  # lower-cased, '.' dropped


def test_captions_csv_with_random_split(tmp_path, load, collection_factory):
    folder, lists = _flickr_files(tmp_path, collection_factory)
    out = str(tmp_path / "out")
    args = ["--dataset", "flickr8k", "--captions-csv", str(tmp_path / "captions.txt"), "--image-folder", folder,
            "--output-folder", out, "--image-size", "32", "--min-word-freq", "1", "--workers", "2",
            "--val-size", "3", "--test-size", "2"]
    create_input_files.main(args)
    sizes = [len(load(out, "IMAGEINFO", s)) for s in ("TRAIN", "VAL", "TEST")]
    assert sizes == [7, 3, 2]
    assert load(out, "REFS")[0][0][-1] == "indeed"  # the quoted comma did not split the caption
    first = load(out, "IMAGEINFO", "VAL")
    create_input_files.main(args)
    assert load(out, "IMAGEINFO", "VAL") == first  # the random split is seeded


def test_captions_csv_with_split_lists(tmp_path, load, collection_factory):
    folder, lists = _flickr_files(tmp_path, collection_factory)
    out = str(tmp_path / "out")
    create_input_files.main(["--dataset", "flickr8k", "--captions-csv", str(tmp_path / "captions.txt"),
                             "--split-lists", *lists, "--image-folder", folder, "--output-folder", out,
                             "--image-size", "32", "--min-word-freq", "1", "--workers", "1"])
    assert [len(load(out, "IMAGEINFO", s)) for s in ("TRAIN", "VAL", "TEST")] == [8, 2, 2]


# ---------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------


def test_image_modes_become_correct_rgb(tmp_path):
    cases = {
        "gray.png": (Image.new("L", (20, 10), 200), (200, 200, 200)),
        "rgba.png": (Image.new("RGBA", (20, 10), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        "cmyk.jpg": (Image.new("CMYK", (20, 10), (255, 0, 0, 0)), (0, 255, 255)),  # pure cyan
        "palette.png": (Image.new("RGB", (20, 10), (0, 0, 255)).convert("P"), (0, 0, 255)),
        "sixteen.png": (Image.new("I;16", (20, 10), 65535), (255, 255, 255)),
    }
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        arr = load_image(str(tmp_path / name), 8)
        assert arr.shape == (3, 8, 8) and arr.dtype == np.uint8, name
        assert np.abs(arr.reshape(3, -1).mean(1) - np.array(rgb)).max() <= 3, (name, arr.reshape(3, -1).mean(1))


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    arr = load_image(str(tmp_path / "rot.jpg"), 20)
    top, bottom = arr[:, :10].mean(), arr[:, 10:].mean()
    assert top > 200 and bottom < 50  # the white half is now on top


def test_pixels_are_scaled_once(prepared):
    """The HDF5 holds 0..255 bytes; the Encoder alone maps them to [0, 1] and normalises."""
    from models import Encoder

    encoder = Encoder("efficientnet_lite0", 0, pretrained=False).eval()
    seen = {}
    encoder.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    white = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    encoder(white)
    expected = (1.0 - encoder.mean) / encoder.std  # white after one scaling and normalisation
    assert torch.allclose(seen["x"][0, :, 0, 0], expected.view(3))
    images = ImageDataset(*prepared, "TRAIN")[0][0]
    assert images.dtype == torch.uint8 and images.max() > 1


def test_missing_prepared_files_are_a_user_error(tmp_path, tiny_base_name):
    with pytest.raises(UserError, match="create_input_files.py"):
        CaptionDataset(str(tmp_path), tiny_base_name, "TRAIN")


def test_progress_bars_redraw_rarely_when_written_to_a_log(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with open(tmp_path / "log.txt", "w") as log:
        assert progress(range(3), file=log).mininterval == 30  # a file: one redraw per 30 s
    assert progress(range(3), file=Terminal()).mininterval < 1  # a terminal: tqdm's lively default
