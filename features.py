"""Encoder features cached once per run, and the batches that training and validation read.

While the encoder is frozen its output for an image never changes, so train.py encodes every image
once and each epoch only runs the decoder. The cache lives in host memory, on the GPU when it fits
there, or in an HDF5 file.
"""
import contextlib

import h5py
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from dataset import ImageDataset
from utils import progress

# keep the cache on the GPU only while it leaves this share of the free memory to training
GPU_CACHE_SHARE = 0.5


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


class FeatureCache:
    """Encoder features of every image of a split, float16: in memory (host or GPU) or in an HDF5 file."""

    def __init__(self, encoder, data_folder, data_name, split, device, batch_size, workers, disk_path=None):
        images = ImageDataset(data_folder, data_name, split)
        loader = DataLoader(images, batch_size=batch_size, num_workers=workers, **loader_options(device))
        self.file, self.tensor = None, None
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for batch, indices in progress(loader, desc=f"caching {split} features", unit="batch"):
                feats = encoder(to_device(batch, device)).half()  # (batch, num_pixels, encoder_dim)
                if self.tensor is None and self.file is None:
                    shape = (len(images),) + tuple(feats.shape[1:])
                    if disk_path:
                        self.file = stack.enter_context(h5py.File(disk_path, "w"))
                        self.file.create_dataset("features", shape, dtype="float16", chunks=(1,) + shape[1:])
                    else:
                        home = cache_device(2 * shape[0] * feats[0].numel(), device)
                        self.tensor = torch.empty(shape, dtype=torch.float16, device=home)  # (num_images, num_pixels, encoder_dim)
                if disk_path:
                    self.file["features"][int(indices[0]) : int(indices[-1]) + 1] = feats.cpu().numpy()
                else:
                    self.tensor[indices.to(self.tensor.device)] = feats.to(self.tensor.device)
        if disk_path:
            self.file = h5py.File(disk_path, "r")["features"]

    def __len__(self):
        return len(self.tensor) if self.tensor is not None else self.file.shape[0]

    def __getitem__(self, image_index):
        """image_index (batch,) on the CPU -> (batch, num_pixels, encoder_dim) float16, where the cache lives."""
        if self.tensor is not None:
            return self.tensor[image_index.to(self.tensor.device)]
        order, inverse = torch.unique(image_index, return_inverse=True)  # h5py wants increasing indices
        return torch.from_numpy(self.file[order.numpy()])[inverse]

    def image_batches(self, batch_size):
        """(features, image indices) batches over every image, for decoding."""
        for first in range(0, len(self), batch_size):
            index = torch.arange(first, min(first + batch_size, len(self)), device="cpu")  # (batch,)
            yield self[index], index


def epoch_order(num_items, epoch, seed, rank, world):
    """This rank's shuffled item indices (on the CPU) for `epoch`: the same on every run, so resuming is exact."""
    if world > 1:
        sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), device="cpu")
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.tensor(list(RandomSampler(range(num_items), generator=generator)), device="cpu")


def caption_batches(dataset, order, batch_size, cache, workers, device=torch.device("cpu")):
    """Yield (inputs, captions, caplens): inputs are cached features if `cache` is set, else uint8 images."""
    if cache is not None:
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]  # (batch,) caption indices
            yield cache[idx // dataset.cpi], dataset.captions[idx], dataset.caplens[idx]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=workers,
                            **loader_options(device))
        for batch in loader:
            yield batch[0], batch[1], batch[2].view(-1)
