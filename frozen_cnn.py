"""A frozen CNN rewritten for inference: the same function in fewer passes over memory.

Once the encoder is frozen (models.Encoder), three rewrites leave its output unchanged, up to rounding:

1. Fold each BatchNorm into the convolution before it. In eval mode a BatchNorm is a fixed per-channel
   scale s = gamma / sqrt(running_var + eps) and shift, so conv-then-BN is one convolution with weights
   w * s and bias (b - running_mean) * s + beta.
2. Move zero padding into the convolution. EfficientNet-Lite pads like TensorFlow's "SAME" with an
   explicit pad layer before each convolution, which copies the feature map; the convolution's own
   `padding` does the same without a copy (see merge_padding for the uneven case).
3. Fuse the ReLU6 after a convolution into it: one oneDNN kernel on x86 CPUs, else an in-place clamp.
   (EfficientNet-Lite only; ResNet's ReLUs already work in place, and it keeps its plain convolutions.)

On a 2-core CPU, BatchNorm, ReLU6 and padding took about half of EfficientNet-Lite0's time in bf16 (torch
profiler): each is a full pass over a feature map, as long as the depthwise convolution itself takes.
The rewrite works on a copy (inference_copy): the encoder's own modules, which checkpoints save and
fine-tuning trains, are never changed.
"""
import copy
import platform

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

# oneDNN's convolution with a fused elementwise epilogue: what torch.compile itself emits on x86 CPUs
_FUSED_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


class FusedConv(nn.Module):
    """A convolution with its bias, and optionally clamp(low, high) after it (ReLU6 is clamp(0, 6)), as one
    oneDNN kernel on x86 CPUs. There the bias is added in float32 even when the convolution runs in bf16: a
    folded BatchNorm's shift can be far larger than the output it is added to (with shifts 100 times the
    products, rounding them to bf16 first raised the output's error from 0.16 % to 0.24 %).
    Elsewhere (CUDA, ARM): F.conv2d, then an in-place clamp."""

    def __init__(self, conv, clamp=None):
        super().__init__()
        self.conv, self.clamp = conv, clamp
        self.pad = getattr(conv, "static_padding", nn.Identity())  # asymmetric "SAME" padding stays a layer
        self._weights = {}  # dtype -> the weight in that dtype, made once: an inference copy never changes

    def forward(self, x):
        x = self.pad(x)  # (batch, in_channels, H + pad, W + pad)
        c = self.conv
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if _FUSED_CONV is not None and _X86 and x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            attr, scalars = ("hardtanh", list(self.clamp)) if self.clamp else ("none", [])
            return _FUSED_CONV(x.to(dtype), self._weight(dtype), c.bias.float(), list(c.padding), list(c.stride),
                               list(c.dilation), c.groups, attr, scalars, "")  # (batch, out_channels, h, w)
        out = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)  # (batch, out_channels, h, w)
        return out.clamp_(*self.clamp) if self.clamp else out

    def _weight(self, dtype):
        if dtype not in self._weights:
            self._weights[dtype] = self.conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        return self._weights[dtype]


def merge_padding(conv):
    """A "SAME"-padded EfficientNet convolution: let the convolution pad, instead of a pad layer that copies
    the feature map. Equal padding on both sides moves over as it is. TensorFlow's "SAME" pads one pixel
    more at the bottom and right for even inputs at stride 2 (top 0, bottom 1, say); PyTorch's convolutions
    pad symmetrically, so pad the larger amount on both sides and give the kernel as many zero rows (columns)
    at the top (left): every output then sees exactly the pixels it saw before, times the same weights.
    The kernel grows by one row and column, which on the CPU is far cheaper than the copy (5.9x measured
    on Lite0's first depthwise layer). Any other padding keeps its layer."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d) or conv.padding != (0, 0):
        return conv
    left, right, top, bottom = pad.padding
    if right < left or bottom < top:
        return conv
    weight = F.pad(conv.weight.detach(), (right - left, 0, bottom - top, 0))  # (out, in / groups, kh + 1?, kw + 1?)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.kernel_size = tuple(weight.shape[-2:])
    conv.padding = (bottom, right)
    conv.static_padding = nn.Identity()
    return conv


def folded(conv, bn):
    """conv then eval-mode bn -> conv computing both. conv belongs to the copy: its weights are replaced here."""
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias)
    return merge_padding(conv)


def _lite_inference(net):
    """EfficientNet-Lite (efficientnet_lite_pytorch): fold every BatchNorm, fuse every ReLU6."""
    relu6 = isinstance(net._swish, nn.ReLU6)
    act = (0.0, 6.0) if relu6 else None  # another activation (swish) stays a module of its own

    def fuse(conv, bn, clamp=act):
        return FusedConv(folded(conv, bn), clamp), nn.Identity()

    net._conv_stem, net._bn0 = fuse(net._conv_stem, net._bn0)
    net._conv_head, net._bn1 = fuse(net._conv_head, net._bn1)
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            block._expand_conv, block._bn0 = fuse(block._expand_conv, block._bn0)
        block._depthwise_conv, block._bn1 = fuse(block._depthwise_conv, block._bn1)
        block._project_conv, block._bn2 = fuse(block._project_conv, block._bn2, clamp=None)  # no activation
        if relu6 and not block.has_se:  # the activation now happens inside the convolutions
            block._swish = nn.Identity()
    if relu6:
        net._swish = nn.Identity()
    return net


def _resnet_inference(backbone):
    """torchvision ResNet (an nn.Sequential of its children): fold every BatchNorm into its convolution.
    Its ReLUs already work in place, and the one after each residual sum cannot join a convolution."""
    children = list(backbone.children())
    if isinstance(children[0], nn.Conv2d) and isinstance(children[1], nn.BatchNorm2d):
        backbone[0], backbone[1] = folded(children[0], children[1]), nn.Identity()
    for layer in children:
        for block in layer.children() if isinstance(layer, nn.Sequential) else []:
            for i in (1, 2, 3):
                conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(block, f"conv{i}", folded(conv, bn))
                    setattr(block, f"bn{i}", nn.Identity())
            down = getattr(block, "downsample", None)
            if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[1], nn.BatchNorm2d):
                block.downsample = nn.Sequential(folded(down[0], down[1]), nn.Identity())
    return backbone


def inference_copy(backbone):
    """A copy of the frozen backbone (models._LiteFeatures, or a ResNet nn.Sequential) with BatchNorm folded,
    padding merged and activations fused, in eval mode, channels_last, without gradients."""
    fast = copy.deepcopy(backbone).eval()
    if hasattr(fast, "net") and hasattr(fast.net, "_blocks"):
        _lite_inference(fast.net)
    else:
        _resnet_inference(fast)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)
