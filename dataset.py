"""Stream prepared HDF5 images and encoded captions into PyTorch.

Images come out as uint8 tensors of shape (3, S, S); the Encoder scales them to [0, 1] and
normalises them itself, so pixels are scaled exactly once, in one place.
"""
import os
import sys

import h5py
import torch
from torch.utils.data import Dataset

from utils import SPLITS, UserError, decode_tokens, prepared_name, read_json


def _check_split(split):
    split = split.upper()
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (expected TRAIN, VAL or TEST)")
    return split


def snapshot_folder(data_folder, data_name):
    """The folder holding the current whole set of `data_name`'s files.

    create_input_files.py writes each new set into a folder of its own, swaps it in with one rename,
    and makes the public names links into it. A reader that resolves this once and reads every file
    from it sees one whole set, old or new, even if a new one is swapped in meanwhile. A folder
    prepared elsewhere (plain files) is its own snapshot."""
    word_map = os.path.realpath(os.path.join(data_folder, prepared_name("WORDMAP", data_name)))
    return os.path.dirname(word_map) if os.path.exists(word_map) else data_folder


class _LazyH5:
    """Opens the HDF5 file on first use in each process, so DataLoader workers (fork or spawn) are safe."""

    def __init__(self, path):
        self.path = path
        self._file, self._pid = None, None
        with self._open() as f:
            if "images" not in f or len(f["images"].shape) != 4:
                raise UserError(f"{path}: no 'images' dataset of shape (N, 3, S, S); was it written by "
                                "create_input_files.py?")
            self.num_images = f["images"].shape[0]
            self.image_size = f["images"].shape[-1]
            self.captions_per_image = int(f.attrs.get("captions_per_image", 0))

    def _open(self):
        try:
            return h5py.File(self.path, "r")
        except FileNotFoundError:
            raise UserError(f"{self.path}: not found (was the folder prepared again while in use?)") from None
        except OSError as err:  # truncated or damaged: HDF5 checks the file's length against its header
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{self.path}: not a readable HDF5 file ({first}); prepare the data again") from None

    def images(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = self._open(), os.getpid()
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
        self.folder = snapshot_folder(data_folder, data_name)  # every file from one set
        paths = [_existing(self.folder, data_folder, kind, data_name, self.split)
                 for kind in ("IMAGES", "CAPTIONS", "CAPLENS")]
        self.h5 = _LazyH5(paths[0])
        self.cpi = self.h5.captions_per_image
        # host memory: batches are copied to the model's device in the training loop
        self.captions = _id_tensor(paths[1], 2)  # (num_images * cpi, max_len + 2)
        self.caplens = _id_tensor(paths[2], 1)  # (num_images * cpi,)
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
        self.folder = snapshot_folder(data_folder, data_name)
        self.h5 = _LazyH5(_existing(self.folder, data_folder, "IMAGES", data_name, self.split))

    def __len__(self):
        return self.h5.num_images

    def __getitem__(self, i):
        return torch.from_numpy(self.h5.images()[i]), i  # (3, S, S) uint8, image index


def _existing(folder, data_folder, kind, data_name, split):
    """Path of a prepared file of the snapshot `folder`; UserError naming the public path if it is missing."""
    name = prepared_name(kind, data_name, split)
    if not os.path.exists(os.path.join(folder, name)):
        raise UserError(f"{os.path.join(data_folder, name)}: not found; prepare the data with "
                        "create_input_files.py first (a split none of whose images were found is not written)")
    return os.path.join(folder, name)


def _id_tensor(path, dims):
    """A CAPTIONS (dims 2) or CAPLENS (dims 1) file as a CPU long tensor; UserError if it is not one."""
    try:
        ids = torch.tensor(read_json(path), dtype=torch.long, device="cpu")
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ids = None
    if ids is None or ids.dim() != dims:
        shape = "a list of equal-length lists of word ids" if dims == 2 else "a list of caption lengths"
        raise UserError(f"{path}: not {shape}; prepare the data again")
    return ids


def load_references(data_folder, data_name, split):
    """Each image's raw reference captions as token lists, or None if the folder has no REFS file."""
    path = os.path.join(snapshot_folder(data_folder, data_name), prepared_name("REFS", data_name, _check_split(split)))
    return read_json(path) if os.path.exists(path) else None


def reference_sentences(data_folder, data_name, split, num_images):
    """{image index: [reference sentence, ...]}: the raw REFS file, or else the encoded captions with a notice."""
    split, folder = _check_split(split), snapshot_folder(data_folder, data_name)
    refs = load_references(folder, data_name, split)
    if refs is not None:
        if not isinstance(refs, list) or len(refs) != num_images:
            raise UserError(f"{os.path.join(folder, prepared_name('REFS', data_name, split))}: expected the "
                            f"references of {num_images} images; prepare the data again")
        return {i: [" ".join(tokens) for tokens in r] for i, r in enumerate(refs)}
    print(f"note: {data_folder} has no {split}_REFS file (prepared elsewhere?): scoring against its encoded "
          "captions, where rare words read <unk>", file=sys.stderr)
    word_map = read_json(os.path.join(folder, prepared_name("WORDMAP", data_name)))
    rev = {v: k for k, v in word_map.items()}
    captions = CaptionDataset(folder, data_name, split)
    cpi = captions.cpi
    return {i: [" ".join(decode_tokens(c, rev, word_map)) for c in captions.captions[i * cpi : (i + 1) * cpi].tolist()]
            for i in range(num_images)}


def load_image_info(data_folder, data_name, split, num_images):
    """[{"file_name", "image_id"}] per image; row indices stand in when the folder has no IMAGEINFO file."""
    name = prepared_name("IMAGEINFO", data_name, _check_split(split))
    path = os.path.join(snapshot_folder(data_folder, data_name), name)
    if os.path.exists(path):
        return read_json(path)
    return [{"file_name": str(i), "image_id": i} for i in range(num_images)]


def find_data_name(data_folder):
    """The single base name prepared in `data_folder` (from its WORDMAP_*.json)."""
    if not os.path.isdir(data_folder):
        raise UserError(f"{data_folder}: data folder not found")
    names = sorted(f[len("WORDMAP_"):-len(".json")] for f in os.listdir(data_folder)
                   if f.startswith("WORDMAP_") and f.endswith(".json")
                   and os.path.exists(os.path.join(data_folder, f)))  # not a link left dangling by a crash
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        raise UserError(f"{data_folder}: expected one WORDMAP_*.json, found {found}; pass --data-name")
    return names[0]
