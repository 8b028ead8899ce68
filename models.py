"""The victim (a frozen torchvision classifier cut at a block boundary) and the attacker's decoder."""
import copy
import math
import os
import urllib.error
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision
from torch import nn

from utils import UsageError, progress, to_unit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_TAG = 'IMAGENET1K_V1'  # torchvision's original ImageNet weights for every arch here

RESNET_SPLITS = {f'layer{i}': i for i in range(1, 5)}
# MobileNet cuts: name -> (features[0..N-1] kept, keep also the 1x1 expansion conv of features[N]).
MOBILENET_V2_SPLITS = {'block3': (4, False), 'block6': (7, False), 'block10': (11, False),
                       'block13': (14, False), 'block16': (17, False)}
MOBILENET_V3_SPLITS = {'block3': (4, False), 'block6': (7, False), 'block12': (13, False),
                       'block13_expand': (13, True), 'block15': (16, False)}
SPLITS = {'resnet18': RESNET_SPLITS, 'resnet34': RESNET_SPLITS, 'resnet50': RESNET_SPLITS,
          'mobilenet_v2': MOBILENET_V2_SPLITS, 'mobilenet_v3_large': MOBILENET_V3_SPLITS}
ARCHS = tuple(SPLITS)
# block13_expand is the original work's cut: 672 channels at stride 16.
DEFAULT_SPLIT = {'resnet18': 'layer2', 'resnet34': 'layer2', 'resnet50': 'layer2',
                 'mobilenet_v2': 'block6', 'mobilenet_v3_large': 'block13_expand'}

DECODERS = ('original', 'residual')
# The original work's decoder: (base width, extra convs a stage) per --decoder_depth; x2 by 'transpose' or 'bicubic'.
DECODER_DEPTHS = {'light': (16, 0), 'medium': (32, 1), 'deep': (64, 2)}
# The residual decoder: (width where the tensor arrives, residual blocks there) per --decoder_depth.
RESIDUAL_DEPTHS = {'light': (64, 0), 'medium': (128, 1), 'deep': (256, 2)}
INTERPOLATIONS = {'original': ('transpose', 'bicubic'), 'residual': ('transpose', 'pixelshuffle', 'bicubic')}
NORMS = ('none', 'group', 'batch')
MIN_WIDTH = 32  # the residual decoder halves its width at each x2 stage, down to this


class SplitVictim(nn.Module):
    """The victim cut in two: `encoder` runs on the device, `tail` (the rest and the head) on the server.

    Always in eval mode, so its BatchNorm statistics never move, and frozen (no gradients to its weights) unless
    built with frozen=False, as defence training builds its own copy. `defended` is the record of a defended victim's
    file (defences.train_defence), None for a victim as torchvision ships it."""

    def __init__(self, encoder, tail, defended=None, frozen=True):
        super().__init__()
        self.encoder, self.tail, self.defended = encoder, tail, defended
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        return super().train(False)

    def encode(self, images):
        """[0, 1] images -> the intercepted tensor (the victim itself sees ImageNet-normalised input)."""
        return self.encoder((images - self.mean) / self.std)

    def classify(self, features):
        """Intercepted tensor -> the victim's logits."""
        return self.tail(features)

    def fingerprint(self):
        """A cheap checksum of the encoder's weights, stored with a decoder to catch a different victim."""
        return float(sum(p.double().abs().sum() for p in self.encoder.state_dict().values()
                         if p.is_floating_point()))


def random_victim(cfg):
    """A victim random-initialised from --victim_seed: its predictions mean nothing, so neither does its agreement."""
    return not cfg['pretrained'] and not cfg['weights']


def victim_label(cfg):
    """The victim's weights, as every table, figure and log names them."""
    if cfg['pretrained']:
        return 'ImageNet weights'
    if cfg['weights']:
        return f'weights {os.path.basename(cfg["weights"])}'
    return f'random-initialised, victim seed {cfg["victim_seed"]}'


def load_torchvision(arch, pretrained):
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None)
    weights = torchvision.models.get_model_weights(arch)[PRETRAINED_TAG]
    filename = os.path.basename(weights.url)
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, OSError) as e:
        cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UsageError(f'cannot download the ImageNet weights {filename} for {arch} ({e}); put the file in '
                         f'{cache}/ (torch hub cache, moved with TORCH_HOME) or pass --weights PATH') from None


DEFENDED_FORMAT = 'recon-attack/defended-victim/1'


def read_victim_weights(path, flag='--weights'):
    """A state dict file for the victim, or a defended victim's file (DEFENDED_FORMAT): (state dict, record or None).
    `flag`: the flag that named the file, for the one-line error."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UsageError(f'{flag} {path}: no such file') from None
    except Exception as e:
        raise UsageError(f'{flag} {path}: not a loadable state dict ({type(e).__name__})') from None
    if isinstance(state, dict) and state.get('format') == DEFENDED_FORMAT:
        return state['state_dict'], state
    return (state.get('state_dict', state) if isinstance(state, dict) else state), None


def defence_training_images(weights_path):
    """{name: content fingerprint} of the images a defended victim's file was fine-tuned on ({} for any other
    victim): never scored as held out against it."""
    record = read_victim_weights(weights_path)[1] if weights_path else None
    return (record or {}).get('data', {}).get('train', {})


def load_victim_weights(net, path, state, flag='--weights'):
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f'{flag} {path} does not fit {type(net).__name__}: {str(e).splitlines()[0]}') from None


def bottleneck(channels, narrow):
    """A learned narrow cut: a 1x1 conv to `narrow` channels on the device, one back to `channels` on the server."""
    return nn.Conv2d(channels, narrow, 1), nn.Conv2d(narrow, channels, 1)


def with_bottleneck(encoder, tail, squeeze, expand):
    return nn.Sequential(encoder, squeeze), nn.Sequential(expand, tail)


def check_defended(record, path, arch, split):
    if record['arch'] != arch or record['split'] != split:
        raise UsageError(f'--weights {path} is a {record["arch"]} defended at its {record["split"]} cut; pass '
                         f'--arch {record["arch"]} --split {record["split"]}')


def cut(net, arch, split):
    """Split a torchvision classifier into (encoder, tail) at a named block boundary."""
    if arch.startswith('resnet'):
        k = RESNET_SPLITS[split]
        stem = [net.conv1, net.bn1, net.relu, net.maxpool]
        layers = [net.layer1, net.layer2, net.layer3, net.layer4]
        return (nn.Sequential(*stem, *layers[:k]),
                nn.Sequential(*layers[k:], net.avgpool, nn.Flatten(1), net.fc))
    n_blocks, with_expansion = SPLITS[arch][split]
    blocks = list(net.features)
    encoder, rest = blocks[:n_blocks], blocks[n_blocks:]
    if with_expansion:  # cut inside the next inverted residual, after its 1x1 expansion
        inner = list(rest[0].block)
        encoder.append(inner[0])
        rest = [nn.Sequential(*inner[1:])] + rest[1:]
    return nn.Sequential(*encoder), nn.Sequential(*rest, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), net.classifier)


def load_network(arch, pretrained=False, weights_path=None, seed=0, flag='--weights'):
    """The whole torchvision classifier: torchvision's weights (or random ones from `seed`), or a file named by
    `flag`; and the file's record where it is a defended victim (else None)."""
    state, record = read_victim_weights(weights_path, flag) if weights_path else (None, None)
    with torch.random.fork_rng(devices=[]):  # a random-initialised victim is a pure function of the seed
        torch.manual_seed(seed)
        net = load_torchvision(arch, pretrained and state is None)
    if state is not None:
        load_victim_weights(net, weights_path, state, flag)
    return net, record


def build_victim(arch, split, pretrained=False, weights_path=None, seed=0, flag='--weights'):
    """The victim cut at `split` (a defended victim's file with its bottleneck, if it has one)."""
    net, record = load_network(arch, pretrained, weights_path, seed, flag)
    encoder, tail = cut(net, arch, split)
    if record is not None:
        check_defended(record, weights_path, arch, split)
        if record['bottleneck'] is not None:
            squeeze, expand = bottleneck(record['bottleneck']['channels'], record['bottleneck']['narrow'])
            squeeze.load_state_dict(record['bottleneck']['squeeze'])
            expand.load_state_dict(record['bottleneck']['expand'])
            encoder, tail = with_bottleneck(encoder, tail, squeeze, expand)
        record = {k: v for k, v in record.items() if k not in ('state_dict', 'bottleneck')}
    return SplitVictim(encoder, tail, record)


def probe_feature_shape(arch, split, image_size):
    """(C, H, W) at the cut, found on the meta device: no weights, no compute, milliseconds (for flag checks)."""
    with torch.device('meta'):  # eval mode, as the victim runs: a 1x1 map cannot be batch-normalised in training mode
        encoder, _ = cut(torchvision.models.get_model(arch, weights=None).eval(), arch, split)
        return tuple(encoder(torch.zeros(1, 3, image_size, image_size)).shape[1:])


def nominal_stride(arch, split):
    """Image side / feature side at the cut, measured where every stride divides the image exactly."""
    return 256 // probe_feature_shape(arch, split, 256)[1]


def check_cut(arch, split, image_size):
    """An image size that cannot work with this cut, caught before anything is built."""
    stride = nominal_stride(arch, split)
    if image_size % stride:
        raise UsageError(f'--image_size {image_size}: {arch} cut at {split} has stride {stride}, so the image side must '
                         f'be a multiple of {stride} (e.g. {max(stride, image_size // stride * stride)})')


@torch.no_grad()
def feature_shape(victim, image_size):
    """(C, H, W) of the intercepted tensor for square images of `image_size` pixels."""
    device = next(victim.parameters()).device
    return tuple(victim.encode(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])


@dataclass(frozen=True)
class DecoderSpec:
    """The attacker's decoder, as the --decoder* flags describe it (stored in every checkpoint's config)."""
    kind: str = 'original'  # 'original' (the original work's, unchanged) | 'residual' (this tool's)
    interpolation: str = 'transpose'  # how each x2 stage upsamples: INTERPOLATIONS[kind]
    depth: str = 'medium'  # capacity preset: DECODER_DEPTHS or RESIDUAL_DEPTHS
    width: int = None  # residual: channels where the tensor arrives (default from depth)
    blocks: int = None  # residual: residual blocks at that resolution (default from depth)
    norm: str = 'batch'  # residual: normalisation after each conv

    @classmethod
    def from_config(cls, cfg):
        kind = cfg.get('decoder', 'original')  # configurations from before --decoder had only the original
        spec = cls(kind, cfg['interpolation'] or INTERPOLATIONS[kind][0], cfg['decoder_depth'])
        if kind == 'residual':
            width, blocks = RESIDUAL_DEPTHS[spec.depth]
            spec = cls(kind, spec.interpolation, spec.depth, cfg.get('decoder_width') or width,
                       cfg.get('decoder_blocks') if cfg.get('decoder_blocks') is not None else blocks,
                       cfg.get('decoder_norm', 'batch'))
        return spec

    def settings(self):
        """The configuration keys the defaults that depend on --decoder resolved to, written down."""
        widths = {'decoder_width': self.width, 'decoder_blocks': self.blocks} if self.kind == 'residual' else {}
        return {'interpolation': self.interpolation, **widths}

    def check(self):
        if self.interpolation not in INTERPOLATIONS[self.kind]:
            raise UsageError(f'--interpolation {self.interpolation}: the {self.kind} decoder upsamples by '
                             f'{" or ".join(INTERPOLATIONS[self.kind])}')

    def label(self):
        """Its name in tables and figure titles."""
        if self.kind == 'original':
            return f'original {self.interpolation} decoder ({self.depth})'
        return f'residual {self.interpolation} decoder (width {self.width}, {self.blocks} blocks, {self.norm} norm)'

    def build(self, in_channels, stride):
        if self.kind == 'original':
            return Decoder(in_channels, stride, self.interpolation, self.depth)
        return ResidualDecoder(in_channels, stride, self.interpolation, self.width, self.blocks, self.norm)


def decoder_stages(stride):
    n_stages = int(round(math.log2(stride)))
    if stride < 2 or 2 ** n_stages != stride:
        raise UsageError(f'the decoder needs a power-of-two stride >= 2 between image and features, got {stride}')
    return n_stages


def conv_bn_relu(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def upsampling_stage(c_in, c_out, interpolation, extra_convs):
    """x2 in resolution: a stride-2 transposed conv, or bicubic upsampling followed by a conv."""
    if interpolation == 'transpose':
        layers = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                  nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    else:
        layers = [nn.Upsample(scale_factor=2, mode='bicubic', align_corners=False), *conv_bn_relu(c_in, c_out)]
    for _ in range(extra_convs):
        layers += conv_bn_relu(c_out, c_out)
    return nn.Sequential(*layers)


class StagedDecoder(nn.Module):
    """Intercepted tensor (C, H, W) -> image in [0, 1] through `stages`, then `to_image`.

    Built from the shape of the intercepted tensor alone: the attack is black-box."""

    def forward(self, features, activations=None):
        """`activations`, a list, collects each stage's output (for the sparsity penalty)."""
        x = features
        for stage in self.stages:
            x = stage(x)
            if activations is not None:
                activations.append(x)
        return self.to_image(x)


class Decoder(StagedDecoder):
    """The original work's attacker: intercepted tensor (C, H, W) -> image in [0, 1], log2(stride) x2 stages."""

    def __init__(self, in_channels, stride, interpolation='transpose', depth='medium'):
        super().__init__()
        n_stages = decoder_stages(stride)
        base, extra_convs = DECODER_DEPTHS[depth]
        widths = [in_channels] + [min(512, base * 2 ** (n_stages - 1 - i)) for i in range(n_stages)]
        self.stages = nn.ModuleList(upsampling_stage(widths[i], widths[i + 1], interpolation, extra_convs)
                                    for i in range(n_stages))
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], 3, 3, padding=1), nn.Sigmoid())


def norm_layer(kind, channels):
    if kind == 'group':
        return nn.GroupNorm(min(32, channels // 4), channels)  # independent of the batch size
    return nn.BatchNorm2d(channels) if kind == 'batch' else nn.Identity()


class ResidualBlock(nn.Module):
    """x + norm(conv(relu(norm(conv(x))))), the block of EDSR (which drops the norms) and ResNet."""

    def __init__(self, channels, norm):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm_layer(norm, channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1),
                                  norm_layer(norm, channels))

    def forward(self, x):
        return x + self.body(x)


def residual_upsampling(c_in, c_out, interpolation):
    """x2 in resolution: a conv to 4x the channels rearranged into space (pixel shuffle, ESPCN / EDSR), bicubic
    upsampling then a conv, or a stride-2 transposed conv."""
    if interpolation == 'pixelshuffle':
        return [nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2)]
    if interpolation == 'bicubic':
        return [nn.Upsample(scale_factor=2, mode='bicubic', align_corners=False), nn.Conv2d(c_in, c_out, 3, padding=1)]
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]


class ResidualDecoder(StagedDecoder):
    """This tool's attacker: residual blocks where the tensor arrives (where convolutions are cheap), then per x2
    stage an upsampling step and a residual block, the width halving towards the image.

    Stage 0 works at the arriving resolution; `stages` and `to_image` are what the figures hook."""

    def __init__(self, in_channels, stride, interpolation='transpose', width=128, blocks=1, norm='batch'):
        super().__init__()
        n_stages = decoder_stages(stride)
        widths = [max(MIN_WIDTH, width // 2 ** i) for i in range(n_stages + 1)]
        first = [nn.Conv2d(in_channels, widths[0], 3, padding=1), norm_layer(norm, widths[0]), nn.ReLU(inplace=True)]
        self.stages = nn.ModuleList([nn.Sequential(*first, *(ResidualBlock(widths[0], norm) for _ in range(blocks)))] + [
            nn.Sequential(*residual_upsampling(widths[i], widths[i + 1], interpolation), norm_layer(norm, widths[i + 1]),
                          nn.ReLU(inplace=True), ResidualBlock(widths[i + 1], norm)) for i in range(n_stages)])
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], 3, 3, padding=1), nn.Sigmoid())


def build_decoder(shape, image_size, spec):
    channels, height, width = shape
    if height != width or image_size % height:
        raise UsageError(f'--image_size {image_size} gives {height}x{width} features, not an exact fraction; '
                         f'use a multiple of {image_size // max(height, 1)}')
    return spec.build(channels, image_size // height)


class Noise(NamedTuple):
    """Gaussian noise the device adds, on the input image or on the intercepted tensor."""
    at: str  # 'input' | 'features'
    mean: float
    var: float  # variance, as the flags say, not the standard deviation


class OnTensor(NamedTuple):
    """A fixed defence switched on at `strength`: its arithmetic on the intercepted tensor, which
    SplitAttack.defend applies on the device, and what a white-box attacker, who knows it, undoes."""
    defence: object  # a defences.Selected: transform(features, strength, generator), as_seen(sent, strength), zeroes
    strength: float

    def __call__(self, features, generator=None):
        return self.defence.transform(features, self.strength, generator)

    def as_seen(self, sent):
        return self.defence.as_seen(sent, self.strength)


def random_like(x, draw, generator):
    """`draw` (torch.rand or torch.randn) of x's shape from one generator, or, given a list of generators (one per
    image), each image's from its own: then an image's draws do not depend on the batch it is in."""
    if isinstance(generator, list):
        return torch.stack([draw(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def add_noise(x, noise, generator):
    """`generator`: one, or a list of one per image (see random_like)."""
    return x + noise.mean + math.sqrt(noise.var) * random_like(x, torch.randn, generator)


def keep_count(keep_channels, channels):
    """--keep_channels as a channel count: a fraction in (0, 1] of the channels, or a count above 1."""
    count = round(keep_channels * channels) if keep_channels <= 1 else int(keep_channels)
    return max(1, count)


def select_channels(how, count, calibration_features=None, seed=0):
    """The `count` channels the device keeps (sorted indices): the first ones, a seeded random subset, or the
    highest-variance ones over a calibration batch (N, C, H, W) of training images."""
    channels = calibration_features.shape[1]
    if how == 'first':
        chosen = torch.arange(count)
    elif how == 'random':
        chosen = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))[:count]
    else:
        variance = calibration_features.float().transpose(0, 1).flatten(1).var(1)
        chosen = variance.topk(count).indices
    return sorted(chosen.tolist())


def bf16_is_fast(device):
    """bf16 autocast pays only where the hardware has bf16 arithmetic: CUDA GPUs that support it, and CPUs with
    AVX512-BF16 or AMX (measured 1.7-2.4x faster decoder steps on such a CPU); elsewhere it would be emulated."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    try:  # torch has no public query for it; this oneDNN one is what torch's own test helpers ask
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class SplitAttack:
    """What crosses the cut (the device's encoder output after any defence) and the attacker's decoder.

    The victim runs under inference mode; only the decoder is trained. Both use channels_last (measured 1.4-2x
    faster convolutions on the CPU as on CUDA); `bf16` adds bf16 autocast where the hardware has bf16 arithmetic,
    and `compile` runs both through torch.compile. `decoder` is the module itself (its state dict, evaluation); training may swap
    `decoder_step` for a DistributedDataParallel wrapper."""

    def __init__(self, victim, decoder, device, bf16=False, compile=False):
        self.device, self.bf16 = device, bf16 and bf16_is_fast(device)
        self.victim = victim.to(device, memory_format=torch.channels_last)
        self.decoder = decoder.to(device, memory_format=torch.channels_last) if decoder is not None else None
        self.run_victim = torch.compile(self.victim.encode) if compile else self.victim.encode
        self.decoder_step = torch.compile(self.decoder) if compile and decoder is not None else self.decoder
        self.channel_mask = None  # (1, C, 1, 1) of 0 / 1 when the device sends a subset of the channels
        self.on_tensor = []  # the fixed defences' arithmetic (OnTensor), in order
        self.reference = None  # for a defended victim: the original one, what its predictions are charged against

    def charge_against(self, reference):
        """A defended victim's utility is charged against `reference`, the original victim, run exactly as the
        victim is (memory format, autocast), so that an unchanged victim costs nothing."""
        self.reference = reference.to(self.device, memory_format=torch.channels_last)

    def using(self, decoder):
        """The same attack (victim, defences) with another decoder, e.g. the average of the trained weights."""
        other = copy.copy(self)
        other.decoder = other.decoder_step = decoder
        return other

    def keep_only(self, channel_indices, channels):
        self.channel_mask = torch.zeros(1, channels, 1, 1, device=self.device)
        self.channel_mask[:, channel_indices] = 1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def precision(self):
        """The arithmetic the victim and decoder ran in, as every record names it (--precision bf16 falls back to
        fp32 where the hardware has no bf16 arithmetic, so the flag alone does not say)."""
        return f'bf16 autocast on {self.device.type}' if self.bf16 else f'fp32 on {self.device.type}'

    def noise_generator(self, seed):
        return torch.Generator(device=self.device).manual_seed(seed)

    def to_images(self, uint8_images):
        """uint8 batch (on the CPU) -> float [0, 1] on the device."""
        if self.device.type == 'cuda':
            uint8_images = uint8_images.pin_memory()
        images = to_unit(uint8_images.to(self.device, non_blocking=True))
        return images.contiguous(memory_format=torch.channels_last)

    def encode(self, images, noise=None, generator=None):
        """The victim's intercepted tensor, with the device's input noise if any."""
        if noise is not None and noise.at == 'input':
            images = add_noise(images, noise, generator)
        return self.run_encoder(self.run_victim, images)

    def run_encoder(self, encode, images):
        """A device half `encode` on [0, 1] images as the device runs it: inference mode, bf16 autocast where on,
        fp32 out."""
        with torch.inference_mode(), self.autocast():
            features = encode(images).float()
        return features.clone()  # a normal tensor again, which autograd may save (the decoder's first layer does)

    def defend(self, features, noise=None, generator=None):
        """What the device sends: the intercepted tensor after its feature-side defences (noise, then the fixed
        defences' arithmetic such as dropout or top-k, then the channel subset), so that dropped elements reach the
        server as exact zeros. `generator`: one, a list of one per image (see random_like), or None."""
        if noise is not None and noise.at == 'features':
            features = add_noise(features, noise, generator)
        for defence in self.on_tensor:
            features = defence(features, generator)
        if self.channel_mask is not None:
            features = features * self.channel_mask
        return features

    def send(self, images, noise=None, generator=None):
        return self.defend(self.encode(images, noise, generator), noise, generator)

    def decode(self, features, activations=None, training=False):
        with self.autocast():
            return (self.decoder_step if training else self.decoder)(features, activations).float()

    def reconstruct(self, images, noise=None, generator=None):
        return self.decode(self.send(images, noise, generator))

    @torch.no_grad()
    def classify(self, features, victim=None):
        """The logits of `victim` (default: this attack's) from a tensor that crossed the cut (the server's half of
        the inference), in fp32: they are the victim's utility metrics, which bf16 rounding would blur."""
        with torch.autocast(self.device.type, enabled=False):
            return (self.victim if victim is None else victim).classify(features.float())

    @torch.no_grad()
    def undefended_logits(self, images, undefended):
        """What the victim would predict without any defence: from the `undefended` tensor, or, for a defended
        victim, the original victim's prediction of the images, computed the same way as the defended one's."""
        if self.reference is None:
            return self.classify(undefended)
        return self.classify(self.run_encoder(self.reference.encode, images), self.reference)


def total_variation(images):
    """Per image: the mean absolute difference between vertically and between horizontally adjacent pixels."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
            + (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1))


def feature_error(attack, images, sent):
    """Per image: ||f(x) - z||^2 / ||z||^2 between the frozen victim's encoding of `images` and the sent tensor z,
    over the elements the attacker can see (a defence's zeros are not matched; dropout's 1 / (1 - p) undone).
    Relative, so a weight on it means the same for every cut. Gradients flow to `images` only."""
    trusted = (sent != 0) if any(d.defence.zeroes for d in attack.on_tensor) else attack.channel_mask
    for defence in attack.on_tensor:
        sent = defence.as_seen(sent)
    with attack.autocast():
        features = attack.victim.encode(images.contiguous(memory_format=torch.channels_last)).float()
    error = features - sent if trusted is None else (features - sent) * trusted
    return error.pow(2).flatten(1).sum(1) / sent.pow(2).flatten(1).sum(1).clamp_min(1e-12)


def invert_features(attack, sent, start, steps, lr, tv_weight, desc='optimising'):
    """The white-box attack (rMLE, He, Zhang & Lee 2019): knowing the victim's weights, find the image x in
    [0, 1] (through a sigmoid) that minimises feature_error(x, z) + tv_weight * TV(x) for the sent tensor z, by
    Adam from `start`. Only the image receives gradients; the victim stays frozen."""
    logits = torch.logit(start.detach().float().clamp(1e-3, 1 - 1e-3)).contiguous(memory_format=torch.channels_last)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in progress(range(steps), desc=desc, unit='step'):
        images = torch.sigmoid(logits)
        loss = feature_error(attack, images, sent) + tv_weight * total_variation(images)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # a sum of per-image losses: every image is optimised as if alone
        optimizer.step()
    return torch.sigmoid(logits).detach()


def attacker_label(cfg):
    """The attacker, named in every output: black-box (the device's half queried, its weights unknown) unless it
    trained with the victim's weights in its loss (--feature_weight)."""
    knowledge = (f'white-box (feature consistency {cfg["feature_weight"]:g})' if cfg.get('feature_weight')
                 else 'black-box')
    return f'{knowledge} {DecoderSpec.from_config(cfg).label()}'


def train_noise(cfg):
    return Noise(cfg['noise_at'], cfg['noise_mean'], cfg['noise_var']) if cfg['train_noise'] else None


def test_noise(cfg):
    return Noise(cfg['noise_at'], cfg['test_noise_mean'], cfg['test_noise_var']) if cfg['test_noise'] else None
