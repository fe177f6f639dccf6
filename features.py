"""Encoder features, cached once per run or kept on disk across runs, and the batches training and validation read.

While the encoder is frozen its output for an image never changes, so train.py encodes every image
once and each epoch only runs the decoder. The cache lives in host memory, on the GPU when it fits
there, or in an HDF5 file named by a hash of everything the features depend on (cache_key), which a
later run with the same key reads instead of encoding again.

Features are stored as bfloat16: half the memory of float32 with float32's exponent range, so even
an untrained ResNet's features (up to ~2e5, past float16's 65504) are kept finite.
"""
import hashlib
import json
import os

import h5py
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from dataset import ImageDataset
from models import normalise_images, resolve_precision
from utils import UserError, atomic_path, progress

# keep the cache on the GPU only while it leaves this share of the free memory to training
GPU_CACHE_SHARE = 0.5
STORE_DTYPE = torch.bfloat16
CACHE_FORMAT = 3  # bump when the file layout changes: files of another format get another name


def cache_device(num_bytes, device):
    """Where a cache of num_bytes should live: on a CUDA device if it fits comfortably, else host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if num_bytes <= GPU_CACHE_SHARE * free:
            return device
    return torch.device("cpu")


def loader_options(device):
    """Pinned host memory makes host-to-GPU copies asynchronous; it only helps (and only works) with CUDA."""
    return {"pin_memory": device.type == "cuda"}


def to_device(tensor, device):
    """Copy to `device`; asynchronous from pinned memory on CUDA, where the next kernel waits for it anyway."""
    return tensor.to(device, non_blocking=device.type == "cuda")


# ---------------------------------------------------------------------------
# Threads and workers for encoding
# ---------------------------------------------------------------------------


def available_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def encoding_plan(device, requested_workers):
    """(torch threads, DataLoader workers) for encoding. The CNN gets every core of this process' share (an
    OMP_NUM_THREADS setting, which torchrun makes, wins). On CUDA the CPU only feeds the GPU: workers up to
    the cores but one. On the CPU a loader worker competes with the CNN for the cores: on 2 cores caching
    Flickr8k VAL ran at 74 images/s without one and 66 with one, so a worker (reading and converting the
    next batch while the CNN runs) is used only where there are more cores than 2, and takes one of them."""
    share = max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type != "cpu":
        threads = torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else share
        return threads, max(0, min(requested_workers, share - 1))
    workers = max(0, min(requested_workers, 1 if share > 2 else 0))
    threads = torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else share - workers
    return threads, workers


def configure_encoding(device, requested_workers, quiet=False):
    """Apply encoding_plan (torch's thread count is process-wide) and say what was chosen. Returns the workers."""
    threads, workers = encoding_plan(device, requested_workers)
    torch.set_num_threads(threads)
    if not quiet:
        print(f"encoding on {device}: {threads} torch threads, {workers} loader workers "
              f"({available_cores()} cores available)")
    return workers


class NormalisedBatches:
    """DataLoader collate_fn: stack (uint8 image, index) items and normalise them in the worker, so the
    conversion to float overlaps the CNN. A class, not a closure, so spawned workers can pickle it."""

    def __init__(self, mean, std):
        self.mean, self.std = mean.to("cpu"), std.to("cpu")  # (1, 3, 1, 1) each

    def __call__(self, items):
        images = torch.stack([image for image, _ in items])  # (batch, 3, S, S) uint8
        indices = torch.tensor([index for _, index in items], device="cpu")  # (batch,)
        return normalise_images(images, self.mean, self.std), indices  # (batch, 3, S, S) float32


def encode_images(encoder, images, device, batch_size, workers, mirrored=False):
    """Yield (first image index, stored features) over `images` in order: (batch, num_pixels, encoder_dim),
    or the bottom's maps (batch, channels, h, w) when the encoder's top is fine-tuned (--fine-tune-top).
    mirrored: encode each image flipped left to right (train.py --hflip)."""
    in_workers = workers > 0 and device.type == "cpu"  # to a GPU, uint8 crosses the bus: 4x fewer bytes
    collate = NormalisedBatches(encoder.mean, encoder.std) if in_workers else None
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        **loader_options(device))
    with torch.no_grad():
        desc = f"caching {images.split} features{' (mirrored)' if mirrored else ''}"
        for batch, indices in progress(loader, desc=desc, unit="batch"):
            batch = to_device(batch, device)  # (batch, 3, S, S): normalised float32, or uint8
            if mirrored:
                batch = batch.flip(-1)  # (batch, 3, S, S): each row reversed
            if not in_workers:
                batch = normalise_images(batch, encoder.mean, encoder.std)  # (batch, 3, S, S) float32
            # (batch, num_pixels, encoder_dim) features, or (batch, channels, h, w) maps below --fine-tune-top
            feats = encoder.encode_for_cache(batch)
            yield int(indices[0]), checked_for_storage(feats, int(indices[0]))


def checked_for_storage(feats, first):
    """feats (batch, num_pixels, encoder_dim) -> the same in STORE_DTYPE; UserError if any is inf or NaN."""
    stored = feats.to(STORE_DTYPE)  # (batch, num_pixels, encoder_dim)
    if not torch.isfinite(stored).all():
        largest = feats.abs().nan_to_num(0.0, 0.0, 0.0).max().item()  # the largest finite magnitude
        raise UserError(f"the encoder gave inf or NaN features (images {first} to {first + len(feats) - 1}, "
                        f"largest finite {largest:.3g}): its weights are broken; try --encoder-precision fp32, "
                        "or other --encoder-weights")
    return stored


# ---------------------------------------------------------------------------
# Cache files: named by their key, written atomically
# ---------------------------------------------------------------------------


def cache_key(encoder, images, device, mirrored=False):
    """Everything the cached features of `images` (an ImageDataset) depend on."""
    path = images.h5.path
    stat = os.stat(path)
    mirror = {"mirrored": True} if mirrored else {}  # absent when False: older files keep their names
    return {**mirror, "format": CACHE_FORMAT, "encoder": encoder.name, "weights": encoder.weights_digest(),
            "feature_stride": encoder.feature_stride, "encoded_size": encoder.encoded_image_size,
            "input_size": encoder.input_size, "top_blocks": encoder.top_blocks,
            "precision": resolve_precision(encoder.precision, device.type, encoder.name),
            "image_size": images.h5.image_size,
            "prepared": [os.path.abspath(path), stat.st_size, stat.st_mtime_ns], "split": images.split}


def cache_file(cache_dir, key):
    """The file that holds `key`'s features: any change to the key gives another name."""
    text = json.dumps(key, sort_keys=True)
    return os.path.join(cache_dir, f"features_{key['split']}_{hashlib.sha256(text.encode()).hexdigest()[:16]}.hdf5")


def default_cache_dir(data_folder, out_dir):
    """cache/ beside the prepared data, shared by every run on it; under out_dir if that folder is read-only."""
    return os.path.join(data_folder if os.access(data_folder, os.W_OK) else out_dir, "cache")


def open_cache_file(path, key):
    """The features dataset of the file at `path` if it holds `key`'s features, else None."""
    if not os.path.exists(path):
        return None
    try:
        f = h5py.File(path, "r")
    except OSError:  # not HDF5 (a partial copy, say): encode again and replace it
        return None
    if f.attrs.get("key") != json.dumps(key, sort_keys=True) or "features" not in f:
        f.close()
        return None
    return f["features"]


def write_cache_file(path, key, batches, num_images):
    """Write the stored features of `batches` to `path`: under a temporary name, renamed only once complete,
    so an interrupted run leaves no file that a later one could load."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["key"] = json.dumps(key, sort_keys=True)
        data = None
        for first, stored in batches:
            if data is None:  # HDF5 has no bfloat16: the file keeps its bits as int16
                shape = (num_images,) + tuple(stored.shape[1:])
                data = f.create_dataset("features", shape, dtype="int16", chunks=(1,) + shape[1:])
            bits = stored.cpu().view(torch.int16)  # (batch, num_pixels, encoder_dim)
            data[first : first + len(stored)] = bits.numpy()


def from_file(rows):
    """int16 rows read from a cache file -> (rows, num_pixels, encoder_dim) bfloat16."""
    return torch.from_numpy(rows).view(STORE_DTYPE)  # (rows, num_pixels, encoder_dim)


class FeatureCache:
    """Encoder features of every image of a split, bfloat16: in memory (host or GPU) or in an HDF5 file.

    Without cache_dir they are encoded into memory. With cache_dir they are read from the key's file
    there (cache_key), or encoded and written to it first; in_memory=False then reads each batch from the file.
    `loaded` says whether the file was there already. mirrored: features of the images flipped left to right.
    """

    def __init__(self, encoder, data_folder, data_name, split, device, batch_size=32, workers=0, cache_dir=None,
                 in_memory=True, mirrored=False):
        images = ImageDataset(data_folder, data_name, split)
        self.file, self.tensor, self.path, self.loaded = None, None, None, False
        batches = encode_images(encoder, images, device, batch_size, workers, mirrored)  # runs only if iterated
        if cache_dir is None:
            self.tensor = self._fill(batches, len(images), device)
        else:
            key = cache_key(encoder, images, device, mirrored)
            self._use_file(key, cache_dir, batches, len(images), device, in_memory)

    def _use_file(self, key, cache_dir, batches, num_images, device, in_memory):
        """Read the key's file, writing it first if it is not there (or not readable)."""
        self.path = cache_file(cache_dir, key)
        data = open_cache_file(self.path, key)
        self.loaded = data is not None
        if data is None:
            write_cache_file(self.path, key, batches, num_images)
            data = open_cache_file(self.path, key)
        kind = "mirrored features" if key.get("mirrored") else "features"
        print(f"{key['split']} {kind} {'read from' if self.loaded else 'written to'} {self.path}")
        if in_memory:
            home = cache_device(data.size * 2, device)
            self.tensor = from_file(data[...]).to(home)  # (num_images, num_pixels, encoder_dim)
            data.file.close()
        else:
            self.file = data

    @staticmethod
    def _fill(batches, num_images, device):
        tensor = None
        for first, stored in batches:
            if tensor is None:
                home = cache_device(2 * num_images * stored[0].numel(), device)
                shape = (num_images,) + tuple(stored.shape[1:])
                tensor = torch.empty(shape, dtype=STORE_DTYPE, device=home)  # (num_images, num_pixels, encoder_dim)
            tensor[first : first + len(stored)] = stored.to(tensor.device)  # (batch, num_pixels, encoder_dim)
        return tensor

    def __len__(self):
        return len(self.tensor) if self.tensor is not None else self.file.shape[0]

    def __getitem__(self, image_index):
        """image_index (batch,) on the CPU -> (batch, num_pixels, encoder_dim) bfloat16, where the cache lives."""
        if self.tensor is not None:
            return self.tensor[image_index.to(self.tensor.device)]
        order, inverse = torch.unique(image_index, return_inverse=True)  # h5py wants increasing indices
        return from_file(self.file[order.numpy()])[inverse]

    def image_batches(self, batch_size):
        """(features, image indices) batches over every image, for decoding."""
        for first in range(0, len(self), batch_size):
            index = torch.arange(first, min(first + batch_size, len(self)), device="cpu")  # (batch,)
            yield self[index], index


class FinishedFeatures(FeatureCache):
    """A cache of the encoder bottom's maps (--fine-tune-top), read as finished features: each batch goes
    through the encoder's top as it is now, without gradients. Validation and decoding read this."""

    def __init__(self, maps, encoder):  # no encoding here: `maps` is a FeatureCache filled already
        self.maps, self.encoder = maps, encoder

    def __len__(self):
        return len(self.maps)

    @torch.no_grad()
    def __getitem__(self, image_index):
        """image_index (batch,) on the CPU -> (batch, num_pixels, encoder_dim) float32 on the encoder's device."""
        device = self.encoder.mean.device
        return self.encoder.top(self.maps[image_index].to(device))  # (batch, num_pixels, encoder_dim)


def epoch_order(num_items, epoch, seed, rank, world):
    """This rank's shuffled item indices (on the CPU) for `epoch`: the same on every run, so resuming is exact."""
    if world > 1:
        sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), device="cpu")
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.tensor(list(RandomSampler(range(num_items), generator=generator)), device="cpu")


# the words a left-right mirror swaps in a caption (train.py --hflip)
MIRROR_SWAPS = [("left", "right")]


def mirror_flags(num_items, epoch, seed, rank):
    """(num_items,) bool on the CPU: which of this epoch's items see their image mirrored, each with
    probability 1/2; the same on every run, so resuming is exact."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch + 7919 * (rank + 1))
    return torch.rand(num_items, generator=generator) < 0.5  # (num_items,)


class Mirror:
    """train.py --hflip for one epoch: the flags (aligned with the epoch's order) of the captions whose image
    is mirrored, the mirrored images' feature cache (None when the encoder runs every batch), and a word
    table that swaps left and right in those captions."""

    def __init__(self, flags, cache, word_map):
        self.flags, self.cache = flags, cache  # (len(order),) bool; FeatureCache or None
        self.table = torch.arange(len(word_map), device="cpu")  # (vocab,): word id -> its mirror image's id
        for a, b in MIRROR_SWAPS:
            if a in word_map and b in word_map:
                self.table[word_map[a]], self.table[word_map[b]] = word_map[b], word_map[a]

    def features(self, cache, images, flags):
        """Cached features (or maps) of `images` (batch,), the flagged rows from the mirrored cache."""
        feats = cache[images]  # (batch, num_pixels, encoder_dim): a copy, safe to overwrite
        if flags.any():
            feats[flags.to(feats.device)] = self.cache[images[flags]].to(feats.device)
        return feats

    @staticmethod
    def images(images, flags):
        """uint8 images (batch, 3, S, S) with the flagged ones flipped left to right."""
        images = images.clone()  # (batch, 3, S, S)
        images[flags] = images[flags].flip(-1)  # (flagged, 3, S, S)
        return images

    def captions(self, captions, flags):
        """captions (batch, L) with left and right swapped in the flagged rows."""
        captions = captions.clone()  # (batch, L)
        captions[flags] = self.table[captions[flags]]  # (flagged, L)
        return captions


def caption_batches(dataset, order, batch_size, cache, workers, device=torch.device("cpu"), mirror=None):
    """Yield (inputs, captions, caplens): inputs are cached features if `cache` is set, else uint8 images.
    mirror (a Mirror, or None): the flagged captions come with their image mirrored."""
    if cache is not None:
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]  # (batch,) caption indices
            images, captions = idx // dataset.cpi, dataset.captions[idx]  # (batch,), (batch, L)
            if mirror is None:
                yield cache[images], captions, dataset.caplens[idx]
            else:
                flags = mirror.flags[first : first + batch_size]  # (batch,)
                yield mirror.features(cache, images, flags), mirror.captions(captions, flags), dataset.caplens[idx]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=workers,
                            **loader_options(device))
        for first, batch in zip(range(0, len(order), batch_size), loader):
            images, captions, caplens = batch[0], batch[1], batch[2].view(-1)  # (batch, 3, S, S), (batch, L), (batch,)
            if mirror is not None:
                flags = mirror.flags[first : first + batch_size]  # (batch,)
                images, captions = mirror.images(images, flags), mirror.captions(captions, flags)
            yield images, captions, caplens
