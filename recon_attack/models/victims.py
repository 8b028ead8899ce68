"""The victim: a frozen classifier cut in two (models.cuts): any torchvision classifier, with torchvision's weights,
random ones from a seed, a state-dict file, or a defended victim's file written by --train_defence; or a network of
the researcher's own, built by a function of theirs that --victim names (imported only when named there)."""
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import urllib.error

import torch
import torchvision
from torch import nn
from torchvision.models import vision_transformer

from ..utils import UsageError
from .cuts import cut

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS = {'imagenet': (IMAGENET_MEAN, IMAGENET_STD), 'none': ((0.0,) * 3, (1.0,) * 3)}
PRETRAINED_TAG = 'IMAGENET1K_V1'  # torchvision's original ImageNet weights for every arch here
DEFENDED_FORMAT = 'recon-attack/defended-victim/1'


def normalisation(spec):
    """(mean, std) per channel of --normalize: imagenet, none, or MEAN,STD (two numbers, or three means then three
    standard deviations)."""
    if spec in NORMALISATIONS:
        return NORMALISATIONS[spec]
    try:
        numbers = [float(v) for v in spec.split(',')]
    except ValueError:
        numbers = []
    if len(numbers) == 2:
        numbers = [numbers[0]] * 3 + [numbers[1]] * 3
    if len(numbers) != 6 or min(numbers[3:]) <= 0:
        raise UsageError(f'--normalize {spec}: imagenet, none, or MEAN,STD (two numbers, or three means and three '
                         'positive standard deviations)')
    return tuple(numbers[:3]), tuple(numbers[3:])


class SplitVictim(nn.Module):
    """The victim cut in two: `encoder` runs on the device, `tail` (the rest and the head) on the server.

    Always in eval mode, so its BatchNorm statistics never move, and frozen (no gradients to its weights) unless
    built with frozen=False, as defence training builds its own copy. `defended` is the record of a defended victim's
    file (defence_training.defended_record), None for a victim as torchvision ships it. It takes [0, 1] images and
    normalises them as the network expects (`mean`, `std`)."""

    def __init__(self, encoder, tail, defended=None, frozen=True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.encoder, self.tail, self.defended = encoder, tail, defended
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        return super().train(False)

    def encode(self, images):
        """[0, 1] images -> the intercepted tensor (the victim itself sees normalised input)."""
        return self.encoder((images - self.mean) / self.std)

    def classify(self, features):
        """Intercepted tensor -> the victim's logits."""
        return self.tail(features)

    def fingerprint(self):
        """A cheap checksum of the encoder's weights, stored with a decoder to catch a different victim."""
        return float(sum(p.double().abs().sum() for p in self.encoder.state_dict().values()
                         if p.is_floating_point()))


def victim_label(victim):
    """The weights of the victim a config.VictimConfig describes, as every table, figure and log names them."""
    if victim.pretrained:
        return 'ImageNet weights'
    if victim.weights:
        return f'weights {os.path.basename(victim.weights)}'
    return f'random-initialised, victim seed {victim.seed}'


def is_entry_point(value):
    """Whether a flag's value names a function (FILE.py:FUNCTION or package.module:FUNCTION), not a file."""
    where, colon, function = value.rpartition(':')
    if not colon or not function.isidentifier():
        return False
    module = all(part.isidentifier() for part in where.split('.'))
    return where.endswith('.py') or (module and importlib.util.find_spec(where.split('.')[0]) is not None)


def entry_file(entry):
    """The file of an entry point ('path/to/file.py:function' or 'package.module:function') and its function's name."""
    where, _, function = entry.rpartition(':')
    if not where or not function:
        raise UsageError(f'--victim {entry}: FILE.py:FUNCTION or package.module:FUNCTION')
    if where.endswith('.py'):
        if not os.path.isfile(where):
            raise UsageError(f'--victim {entry}: no such file {where}')
        return os.path.abspath(where), function
    spec = importlib.util.find_spec(where)
    if spec is None or spec.origin is None:
        raise UsageError(f'--victim {entry}: no module {where} on the Python path')
    return spec.origin, function


def entry_digest(entry):
    """The sha256 of the file an entry point is read from: a checkpoint records it, and a changed file is refused."""
    path, _ = entry_file(entry)
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_entry(entry):
    """The function an entry point names, its file imported (user code: only ever when --victim names it)."""
    path, function = entry_file(entry)
    where = entry.rpartition(':')[0]
    try:
        if where.endswith('.py'):
            name = 'recon_attack_victim_' + hashlib.sha1(path.encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:
        raise UsageError(f'--victim {entry}: importing {where} failed ({type(e).__name__}: '
                         f'{str(e).splitlines()[0] if str(e) else ""})') from None
    if not callable(getattr(module, function, None)):
        raise UsageError(f'--victim {entry}: {where} has no function {function}')
    return getattr(module, function)


def size_arguments(arch, image_size):
    """What a torchvision architecture whose size is fixed when it is built (its position embeddings: ViT, MaxViT)
    is built with to run at `image_size`; nothing for the others."""
    if image_size is None:
        return {}
    parameters = inspect.signature(model_class(arch).__init__).parameters
    if 'image_size' in parameters:
        return {'image_size': image_size}
    if 'input_size' in parameters:
        return {'input_size': (image_size, image_size)}
    return {}


def model_class(arch):
    """The class a torchvision builder returns (read from its annotation, without building the network)."""
    return inspect.signature(torchvision.models.get_model_builder(arch)).return_annotation


def architecture(victim, image_size):
    """The whole network a config.VictimConfig names, its weights random (from the current random state)."""
    if victim.model:
        net = load_entry(victim.model)()
        if not isinstance(net, nn.Module):
            raise UsageError(f'--victim {victim.model}: returned a {type(net).__name__}, not an nn.Module')
        return net
    if victim.arch not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(f'--arch {victim.arch}: not one of torchvision\'s image classifiers '
                         f'(torchvision.models.list_models(module=torchvision.models)), and no --victim given')
    return torchvision.models.get_model(victim.arch, weights=None, **size_arguments(victim.arch, image_size))


def network(victim, image_size, meta=False):
    """The network to probe (`meta`: its architecture on the current device, no weights) or to cut."""
    return architecture(victim, image_size).eval() if meta else load_network(victim, image_size)[0]


def pretrained_state(arch, net, image_size):
    """torchvision's ImageNet weights of `arch` for `net`, through its hub cache; a ViT's position embeddings
    interpolated to `image_size` where it runs at another size than its weights'."""
    weights = torchvision.models.get_model_weights(arch)[PRETRAINED_TAG]
    filename = os.path.basename(weights.url)
    try:
        state = weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError) as e:
        cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UsageError(f'cannot download the ImageNet weights {filename} for {arch} ({e}); put the file in '
                         f'{cache}/ (torch hub cache, moved with TORCH_HOME) or pass --weights PATH') from None
    native = weights.meta.get('min_size', (None,))[0]
    if isinstance(net, vision_transformer.VisionTransformer) and image_size not in (None, native):
        state = vision_transformer.interpolate_embeddings(image_size, net.patch_size, state)
    return state


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


def check_defended(record, path, victim):
    if record['arch'] != victim.arch or record['split'] != victim.split:
        raise UsageError(f'--weights {path} is a {record["arch"]} defended at its {record["split"]} cut; pass '
                         f'--arch {record["arch"]} --split {record["split"]}')


def load_network(victim, image_size=None, flag='--weights'):
    """The whole network a config.VictimConfig names: torchvision's weights (or random ones from its seed), or the
    file `victim.weights` names (by `flag`); and the file's record where it is a defended victim (else None)."""
    if victim.pretrained and victim.model:
        raise UsageError(f'--use_pretrained loads torchvision\'s weights; for --victim {victim.model} pass --weights')
    state, record = read_victim_weights(victim.weights, flag) if victim.weights else (None, None)
    with torch.random.fork_rng(devices=[]):  # a random-initialised victim is a pure function of the seed
        torch.manual_seed(victim.seed)
        net = architecture(victim, image_size)
    if victim.pretrained and state is None:
        state = pretrained_state(victim.arch, net, image_size)
    if state is not None:
        load_victim_weights(net, victim.weights or f'(torchvision\'s {victim.arch})', state, flag)
    return net.eval(), record


def build_victim(victim, image_size, flag='--weights'):
    """The victim a config.VictimConfig describes, cut at its split, for square images of `image_size` pixels (a
    defended victim's file with its bottleneck, if it has one)."""
    net, record = load_network(victim, image_size, flag)
    encoder, tail = cut(net, victim, image_size)
    if record is not None:
        check_defended(record, victim.weights, victim)
        if record['bottleneck'] is not None:
            squeeze, expand = bottleneck(record['bottleneck']['channels'], record['bottleneck']['narrow'])
            squeeze.load_state_dict(record['bottleneck']['squeeze'])
            expand.load_state_dict(record['bottleneck']['expand'])
            encoder, tail = with_bottleneck(encoder, tail, squeeze, expand)
        record = {k: v for k, v in record.items() if k not in ('state_dict', 'bottleneck')}
    mean, std = normalisation(victim.normalize)
    return SplitVictim(encoder, tail, record, mean=mean, std=std)


@torch.no_grad()
def feature_shape(victim, image_size):
    """The shape (no batch) of the intercepted tensor for square images of `image_size` pixels."""
    device = next(victim.parameters()).device
    return tuple(victim.encode(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])

