"""The frozen CNN rewritten for inference (frozen_cnn.py): same features, made and remade when it should be."""
import copy
import os

import pytest
import torch
from torch import nn

import frozen_cnn
import utils
from models import Encoder, normalise_images


def images(size, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator, device="cpu")


def plain_and_fast(encoder, x):
    """Features from the encoder's own backbone and from its inference copy, fp32, (batch, num_pixels, dim) each."""
    x = normalise_images(x, encoder.mean, encoder.std)  # (batch, 3, S, S)
    with torch.no_grad():
        plain = encoder.top(encoder.bottom(x))
        fast_net = encoder.inference_backbone()
        fast = encoder.top(encoder.bottom(x, fast_net), fast_net)
    return plain, fast


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name, size, stride, top, pretrained", [
    ("efficientnet_lite0", 224, 32, 0, True),  # the default encoder, its ImageNet weights (shipped with pip)
    ("efficientnet_lite0", 160, 16, 0, True),
    ("efficientnet_lite2", 128, 32, 2, True),  # --fine-tune-top: the copy's bottom and top
    ("resnet50", 96, 32, 0, False),
    ("resnet50", 96, 16, 1, False),
])
def test_the_inference_copy_computes_what_the_backbone_computes(name, size, stride, top, pretrained):
    torch.manual_seed(0)
    encoder = Encoder(name, 0, pretrained=pretrained, feature_stride=stride, top_blocks=top).eval()
    plain, fast = plain_and_fast(encoder, images(size))
    assert fast.shape == plain.shape
    # fp32 rounding only: folding a BatchNorm changes the order of a few multiplications (measured ~4e-6)
    assert relative_error(fast, plain) < 5e-5
    fast_net = encoder.inference_backbone()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast_net.modules())  # every BatchNorm was folded
    assert not any(isinstance(m, nn.ZeroPad2d) for m in fast_net.modules())  # every pad layer was merged
    assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.backbone.modules())  # the original is untouched


@pytest.mark.parametrize("padding, kernel, stride", [
    ((0, 1, 0, 1), 3, 2),  # TensorFlow "SAME" at stride 2 on an even input: one more at the bottom and right
    ((1, 2, 1, 2), 5, 2),
    ((1, 1, 1, 1), 3, 1),  # even padding moves over as it is
    ((0, 1, 1, 1), 3, 2),  # uneven in one direction only
])
def test_merged_padding_gives_the_same_output(padding, kernel, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, stride=stride, groups=8, bias=False)
    conv.static_padding = nn.ZeroPad2d(padding)
    x = torch.randn(2, 8, 14, 14)  # (batch, channels, H, W)
    expected = conv(conv.static_padding(x))  # what the EfficientNet layer computes
    merged = frozen_cnn.merge_padding(copy.deepcopy(conv))
    assert isinstance(merged.static_padding, nn.Identity)
    assert torch.allclose(merged(x), expected, atol=1e-6, rtol=0)


def test_padding_larger_on_the_top_left_keeps_its_layer():
    conv = nn.Conv2d(4, 4, 3, stride=2, bias=False)
    conv.static_padding = nn.ZeroPad2d((1, 0, 1, 0))  # no "SAME" padding looks like this
    assert isinstance(frozen_cnn.merge_padding(conv).static_padding, nn.ZeroPad2d)


def test_the_fused_kernel_and_the_portable_fallback_agree(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1)
    with torch.no_grad():
        conv.bias.mul_(10)  # both sides of the clamp are reached
    fused = frozen_cnn.FusedConv(conv, (0.0, 6.0))
    x = torch.randn(2, 6, 10, 10).contiguous(memory_format=torch.channels_last) * 4  # (batch, 6, 10, 10)
    with torch.no_grad():
        reference = conv(x).clamp(0.0, 6.0)  # (batch, 12, 10, 10)
        kernel = fused(x)
        monkeypatch.setattr(frozen_cnn, "_FUSED_CONV", None)  # a CPU or build without the oneDNN kernel
        fallback = fused(x)
    assert (reference == 0).any() and (reference == 6).any()
    assert torch.allclose(kernel, reference, atol=1e-5, rtol=0)
    assert torch.allclose(fallback, reference, atol=1e-5, rtol=0)


def test_the_copy_is_made_once_and_again_after_any_weight_change():
    torch.manual_seed(0)
    encoder = Encoder("efficientnet_lite0", 0, pretrained=False).eval()
    x = images(64)
    with torch.no_grad():
        first = encoder(x)  # (2, 4, 1280)
        made = encoder.inference_backbone()
        assert encoder(x).equal(first) and encoder.inference_backbone() is made  # reused
        encoder.backbone.net._conv_head.weight.mul_(2)  # an optimiser step changes weights in place like this
    assert encoder.inference_backbone() is not made
    other = Encoder("efficientnet_lite0", 0, pretrained=False).eval()
    encoder.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert relative_error(encoder(x), other(x)) < 1e-6  # the copy follows the loaded weights
    assert not any("_inference" in key for key in encoder.state_dict())  # never saved in a checkpoint


def test_training_mode_runs_the_backbone_itself():
    """Fine-tuning trains the backbone's own modules; in train mode no inference copy is made."""
    encoder = Encoder("efficientnet_lite0", 0, pretrained=False).train()
    with torch.no_grad():
        encoder(images(64))
    assert "_inference" not in encoder.__dict__


def test_freed_memory_is_kept_for_reuse_on_glibc(monkeypatch):
    import platform

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's: elsewhere reuse_freed_memory changes nothing, by design")
    assert utils.reuse_freed_memory() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    assert utils.reuse_freed_memory() is False  # the user's own setting is left alone
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
