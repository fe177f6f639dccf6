"""Exercise 1 (dataset.py): CaptionDataset.__getitem__, checked against a tiny collection read
straight from the files the copy's create_input_files.py writes."""
import contextlib
import io
import json
import os
import tempfile
import types

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .common import CheckFailed, expect, expect_tensor, load


CAPTIONS_PER_IMAGE = 3


def write_tiny_collection(folder):
    """Five 16 x 16 PNGs (3 TRAIN, 2 VAL), each different, with 3 captions of different lengths each."""
    os.makedirs(folder, exist_ok=True)
    images = []
    for i in range(5):
        pixels = np.zeros((16, 16, 3), np.uint8)  # (H, W, 3)
        pixels[:, :, 0] = 40 * i + 20  # each image its own red level
        pixels[:, :8, 1] = 200  # left half differs from right half, so a flip shows
        name = f"img{i}.png"
        Image.fromarray(pixels).save(os.path.join(folder, name))
        sentences = [["pic", f"n{i}"] + ["and"] * j + [f"c{j}"] for j in range(CAPTIONS_PER_IMAGE)]
        images.append({"filename": name, "imgid": i, "split": "train" if i < 3 else "val",
                       "sentences": [{"tokens": tokens} for tokens in sentences]})
    path = os.path.join(folder, "dataset_tiny.json")
    with open(path, "w") as f:
        json.dump({"images": images}, f)
    return path


def prepare_tiny_folder(folder, tmp):
    """The tiny collection prepared by the copy's create_input_files.py; returns (data folder, base name)."""
    create_input_files = load(folder, "create_input_files")
    json_path = write_tiny_collection(os.path.join(tmp, "raw"))
    out = os.path.join(tmp, "prepared")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        create_input_files.main(["--dataset", "flickr8k", "--karpathy-json", json_path,
                                 "--image-folder", os.path.dirname(json_path), "--output-folder", out,
                                 "--image-size", "16", "--min-word-freq", "1", "--workers", "1", "--max-len", "8",
                                 "--captions-per-image", str(CAPTIONS_PER_IMAGE)])
    base = next(n[len("WORDMAP_"):-len(".json")] for n in os.listdir(out) if n.startswith("WORDMAP_"))
    return out, base


def read_prepared_split(data_folder, base, split):
    """A split read straight from its files, without dataset.py."""
    with h5py.File(os.path.join(data_folder, f"{split}_IMAGES_{base}.hdf5"), "r") as f:
        images = torch.from_numpy(f["images"][:])  # (num_images, 3, S, S) uint8
        cpi = int(f.attrs["captions_per_image"])
    with open(os.path.join(data_folder, f"{split}_CAPTIONS_{base}.json")) as f:
        captions = torch.tensor(json.load(f))  # (num_images * cpi, max_len + 2)
    with open(os.path.join(data_folder, f"{split}_CAPLENS_{base}.json")) as f:
        caplens = torch.tensor(json.load(f))  # (num_images * cpi,)
    return types.SimpleNamespace(images=images, captions=captions, caplens=caplens, cpi=cpi)


def expect_right_image(where, image, i, truth):
    wanted = i // truth.cpi  # captions are stored image by image, cpi of them per image
    expect(isinstance(image, torch.Tensor), f"{where}: the image should be a tensor; got {type(image).__name__}")
    expect(tuple(image.shape) == tuple(truth.images.shape[1:]),
           f"{where}: the image has shape {tuple(image.shape)}; expected {tuple(truth.images.shape[1:])} (3, S, S)")
    expect(image.dtype == torch.uint8, f"{where}: the image has dtype {image.dtype}; keep it uint8 "
                                       "(the Encoder scales pixels itself)")
    if not torch.equal(image, truth.images[wanted]):
        got = [k for k in range(len(truth.images)) if torch.equal(image, truth.images[k])]
        read = f"image {got[0]}" if got else "no image"
        raise CheckFailed(f"{where}: got {read} of the HDF5 file; caption {i} belongs to image "
                          f"{i} // captions_per_image = {wanted}")


def expect_right_item(item, i, truth, split):
    where = f"{split} item {i}"
    names = "image, caption, caplen" + (", all_captions" if split != "TRAIN" else "")
    got = f"a tuple of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
    expect(isinstance(item, (tuple, list)) and len(item) == len(names.split(", ")),
           f"{where}: expected the tuple ({names}); got {got}")
    image, caption, caplen = item[:3]
    expect_right_image(where, image, i, truth)
    expect(isinstance(caption, torch.Tensor) and caption.dtype == torch.long,
           f"{where}: the caption should be a torch.long tensor")
    expect(torch.equal(caption, truth.captions[i]), f"{where}: the caption is not row {i} of the CAPTIONS file")
    expect(isinstance(caplen, torch.Tensor) and caplen.numel() == 1,
           f"{where}: caplen should be a one-element tensor, like torch.tensor([length])")
    expect(int(caplen.reshape(-1)[0]) == int(truth.caplens[i]),
           f"{where}: caplen is {int(caplen.reshape(-1)[0])}; expected {int(truth.caplens[i])}, entry {i} of CAPLENS")
    if split != "TRAIN":
        first = (i // truth.cpi) * truth.cpi
        all_captions = item[3]
        expect_tensor(f"{where}: all_captions", all_captions, (truth.cpi, truth.captions.shape[1]),
                      "(captions_per_image, max_len + 2)")
        expect(torch.equal(all_captions, truth.captions[first : first + truth.cpi]),
               f"{where}: all_captions should be caption rows {first}..{first + truth.cpi - 1}, "
               f"every caption of image {i // truth.cpi}")


def check(folder):
    dataset = load(folder, "dataset")
    with tempfile.TemporaryDirectory() as tmp:
        data_folder, base = prepare_tiny_folder(folder, tmp)
        for split in ("TRAIN", "VAL"):
            truth = read_prepared_split(data_folder, base, split)
            items = dataset.CaptionDataset(data_folder, base, split)
            for i in range(len(items)):
                expect_right_item(items[i], i, truth, split)

        truth = read_prepared_split(data_folder, base, "TRAIN")
        flipped = dataset.CaptionDataset(data_folder, base, "TRAIN", transform=lambda image: image.flip(2))
        image = flipped[4][0]  # (3, S, S)
        expect(torch.equal(image, truth.images[4 // truth.cpi].flip(2)),
               "the dataset's transform was not applied to the image")

        loader = DataLoader(dataset.CaptionDataset(data_folder, base, "TRAIN"), batch_size=4)
        images, captions, caplens = next(iter(loader))  # (4, 3, S, S), (4, max_len + 2), (4, 1)
        expect(images.shape == (4,) + tuple(truth.images.shape[1:]) and captions.shape == (4, truth.captions.shape[1])
               and caplens.numel() == 4, "a DataLoader cannot batch the items into (4, 3, S, S), (4, L), (4 or 4 x 1)")
