"""Stream prepared HDF5 images and encoded captions into PyTorch.

Images come out as uint8 tensors of shape (3, S, S); the Encoder scales them to [0, 1] and
normalises them itself, so pixels are scaled exactly once, in one place.
"""
import json
import os

import h5py
import torch
from torch.utils.data import Dataset

from utils import UserError

SPLITS = ("TRAIN", "VAL", "TEST")


def split_path(data_folder, kind, split, data_name, ext="json"):
    return os.path.join(data_folder, f"{split}_{kind}_{data_name}.{ext}")


def _check_split(split):
    split = split.upper()
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (expected TRAIN, VAL or TEST)")
    return split


def _load_json(path):
    with open(path) as f:
        return json.load(f)


class _LazyH5:
    """Opens the HDF5 file on first use in each process, so DataLoader workers (fork or spawn) are safe."""

    def __init__(self, path):
        self.path = path
        self._file, self._pid = None, None
        with h5py.File(path, "r") as f:
            if "images" not in f:
                raise UserError(f"{path}: no 'images' dataset; was it written by create_input_files.py?")
            self.num_images = f["images"].shape[0]
            self.image_size = f["images"].shape[-1]
            self.captions_per_image = int(f.attrs.get("captions_per_image", 0))

    def images(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["images"]

    def __getstate__(self):
        return dict(self.__dict__, _file=None, _pid=None)  # an open h5py handle cannot be pickled


class CaptionDataset(Dataset):
    """One item per caption.

    TRAIN yields (image, caption, caplen); VAL and TEST also yield all_captions, the
    (captions_per_image, max_len + 2) tensor of that image's captions, for BLEU.
    """

    def __init__(self, data_folder, data_name, split, transform=None):
        self.split = _check_split(split)
        self.transform = transform
        h5_path = split_path(data_folder, "IMAGES", self.split, data_name, "hdf5")
        paths = [h5_path] + [split_path(data_folder, k, self.split, data_name) for k in ("CAPTIONS", "CAPLENS")]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise UserError(f"{missing[0]}: not found; prepare the data with create_input_files.py first")
        self.h5 = _LazyH5(h5_path)
        self.cpi = self.h5.captions_per_image
        self.captions = torch.tensor(_load_json(paths[1]), dtype=torch.long)  # (num_images * cpi, max_len + 2)
        self.caplens = torch.tensor(_load_json(paths[2]), dtype=torch.long)  # (num_images * cpi,)
        if self.cpi < 1 or len(self.captions) != self.h5.num_images * self.cpi or len(self.caplens) != len(self.captions):
            raise UserError(f"{data_folder}: {self.split} files disagree ({self.h5.num_images} images x "
                            f"{self.cpi} captions vs {len(self.captions)} captions); prepare it again")

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        # EXERCISE 1 >>> Load item i: its image, caption and length (and, outside TRAIN, all of the image's captions).
        # Hint: caption i belongs to image i // self.cpi; read the image with self.h5.images()[...] and keep it uint8.
        image = torch.from_numpy(self.h5.images()[i // self.cpi])  # (3, S, S) uint8
        if self.transform is not None:
            image = self.transform(image)
        caption = self.captions[i]  # (max_len + 2,)
        caplen = self.caplens[i : i + 1]  # (1,)
        if self.split == "TRAIN":
            return image, caption, caplen
        first = (i // self.cpi) * self.cpi
        all_captions = self.captions[first : first + self.cpi]  # (cpi, max_len + 2)
        return image, caption, caplen, all_captions
        # <<< EXERCISE 1


class ImageDataset(Dataset):
    """One item per image, (image, index): for evaluation and feature caching, where
    decoding every image once per caption would repeat work captions_per_image times."""

    def __init__(self, data_folder, data_name, split):
        self.split = _check_split(split)
        path = split_path(data_folder, "IMAGES", self.split, data_name, "hdf5")
        if not os.path.exists(path):
            raise UserError(f"{path}: not found; prepare the data with create_input_files.py first")
        self.h5 = _LazyH5(path)

    def __len__(self):
        return self.h5.num_images

    def __getitem__(self, i):
        return torch.from_numpy(self.h5.images()[i]), i  # (3, S, S) uint8, image index


def load_references(data_folder, data_name, split):
    """Each image's raw reference captions as token lists, or None if the folder has no REFS file."""
    path = split_path(data_folder, "REFS", _check_split(split), data_name)
    return _load_json(path) if os.path.exists(path) else None


def load_image_info(data_folder, data_name, split, num_images):
    """[{"file_name", "image_id"}] per image; row indices stand in when the folder has no IMAGEINFO file."""
    path = split_path(data_folder, "IMAGEINFO", _check_split(split), data_name)
    if os.path.exists(path):
        return _load_json(path)
    return [{"file_name": str(i), "image_id": i} for i in range(num_images)]


def find_data_name(data_folder):
    """The single base name prepared in `data_folder` (from its WORDMAP_*.json)."""
    if not os.path.isdir(data_folder):
        raise UserError(f"{data_folder}: data folder not found")
    names = sorted(f[len("WORDMAP_"):-len(".json")] for f in os.listdir(data_folder)
                   if f.startswith("WORDMAP_") and f.endswith(".json"))
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        raise UserError(f"{data_folder}: expected one WORDMAP_*.json, found {found}; pass --data-name")
    return names[0]
