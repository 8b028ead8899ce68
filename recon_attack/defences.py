"""Defences: what the device does to the tensor before sending it. Each defence is one object in DEFENCES that owns
its flag, the check of its value, the flags that switch it on, what it does and its name in outputs; the CLI, the
sweeps, the attack and the tables ask it. Fixed defences are arithmetic on the sent tensor. Trained ones fine-tune
the device's half of the victim (--train_defence, run by defence_training.py) into a defended victim that --weights
loads and the normal attack then attacks from scratch; they are charged against the original victim's predictions.

A defence's methods receive the parts of the configuration they read: `defence` (a config.DefenceConfig, which
holds each defence's own flag in `strengths`) and `noise` (a config.NoiseConfig: the noise defence's settings)."""
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .bound import centred_power, jacobian_norms
from .models.decoders import build_decoder
from .models.layouts import DESCRIPTIONS
from .models.victims import SplitVictim, bottleneck, with_bottleneck
from .config import DecoderSpec, NoiseConfig
from .noise import rademacher, random_like, stream_seed
from .utils import UsageError

DEFENDED_FILE, DEFENCE_RECORD = 'defended_victim.pth', 'defence.json'
REFERENCE_PRETRAINED = 'pretrained'  # --reference: torchvision's ImageNet weights
TRAINING_FLAGS = ('defend_epochs', 'defend_lr', 'defend_server')  # defence training's own flags


def is_count(value):
    return value > 1 and value == int(value)


def keep_count(keep_channels, channels):
    """--keep_channels as a channel count: a fraction in (0, 1] of the channels, or a count above 1."""
    count = round(keep_channels * channels) if keep_channels <= 1 else int(keep_channels)
    return max(1, count)


def select_channels(how, count, calibration_features=None, seed=0):
    """The `count` channels the device keeps (sorted indices): the first ones, a seeded random subset, or the
    highest-variance ones over a calibration batch (N, C, ...) of training images."""
    channels = calibration_features.shape[1]
    if how == 'first':
        chosen = torch.arange(count)
    elif how == 'random':
        chosen = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))[:count]
    else:
        variance = calibration_features.float().transpose(0, 1).flatten(1).var(1)
        chosen = variance.topk(count).indices
    return sorted(chosen.tolist())


def strength_flag(config, defence):
    """The value of `defence`'s own flag in a config.DefenceConfig (its default where the configuration does not set
    it)."""
    return config.strengths.get(defence.flag, defence.default)


class Defence:
    """A defence as the flags describe it. `strength(defence, noise)` is its number where the configuration switches
    it on, None where it is off; `settings(strength)` the flags that switch it on; `source` in a check names the
    flag or sweep value being checked, and `cut` (a models.cuts.Cut) the victim's cut, for the one-line error."""
    name = ''
    trained = False
    flag = ''  # the flag holding its strength, where it has one of its own
    default = None  # that flag's default
    keys = ()  # the flags of a fixed defence, part of what a decoder was trained against

    def add_arguments(self, group):
        pass

    def strength(self, defence, noise):
        raise NotImplementedError

    def check(self, strength, source, cut):
        raise NotImplementedError

    def settings(self, strength):
        raise NotImplementedError

    def describe(self, strength, defence, noise):
        raise NotImplementedError

    def apply(self, attack, strength):
        """Switch the defence on in a built attack (fixed defences whose arithmetic SplitAttack.defend does)."""

    def fits(self, cut):
        """Refuse, in one line, a cut (models.cuts.Cut) whose tensor the defence cannot act on; asked where it is on."""


def noise_flags(variance):
    """The same Gaussian noise while the attacker trains and when it is measured (none at variance 0): an attacker
    measured against noise it never trained with would flatter the noise."""
    return dict(train_noise=variance > 0, test_noise=variance > 0, noise_var=variance, test_noise_var=variance)


class FeatureNoise(Defence):
    """Gaussian noise on the intercepted tensor; its flags (--noise_at features, --test_noise_var...) are shared
    with input noise, so they belong to the noise settings (config.NoiseConfig)."""
    name = 'noise'

    def strength(self, defence, noise):
        return noise.test_var if noise.test and noise.at == 'features' else None

    def check(self, strength, source, cut):
        if strength < 0:
            raise UsageError(f'{source}: a variance cannot be negative, got {strength:g}')

    def settings(self, strength):
        return {**noise_flags(strength), 'noise_at': 'features', 'noise_mean': 0.0, 'test_noise_mean': 0.0}

    def describe(self, strength, defence, noise):
        return f'noise on the tensor (mean {noise.test_mean:g}, var {strength:.4g}{calibration(noise)})'


def calibration(noise):
    """How the noise's variance was set, where a run calibrated it (a config.NoiseConfig)."""
    if noise.for_bound is not None:
        share = f' on a share {noise.quantile:g} of images' if noise.quantile is not None else ' on average'
        return f', set for a {noise.for_bound:g} dB unbiased-attacker ceiling{share}'
    if noise.snr is not None:
        return f', {noise.snr:g} dB below the tensor\'s centred power'
    return ''


class KeepChannels(Defence):
    """The device sends only some channels, the rest as zeros; which ones is chosen once per run (choose) and
    recorded, so that every attack of the run and every later evaluation sees the same tensor."""
    name, keys = 'keep_channels', ('keep_channels', 'channel_select')

    def add_arguments(self, group):
        group.add_argument('--keep_channels', type=float,
                           help='send only K channels (a fraction in (0, 1] or a count above 1), the rest as zeros')
        group.add_argument('--channel_select', choices=('first', 'random', 'topvar'), default='topvar',
                           help='which channels: the first K, K at random (seeded), or the K of highest variance '
                                'over a calibration batch of training images')

    def strength(self, defence, noise):
        return defence.keep_channels

    def check(self, strength, source, cut):
        if strength <= 0:
            raise UsageError(f'{source}: must be positive, got {strength:g}')
        if strength > 1 and not is_count(strength):
            raise UsageError(f'{source}: a fraction in (0, 1] or a whole number of channels, got {strength:g}')
        if cut.channels is not None and keep_count(strength, cut.channels) > cut.channels:
            raise UsageError(f'{source}: {cut.name} sends only {cut.channels} channels, got {strength:g}')

    def settings(self, strength):
        return {'keep_channels': strength}

    def fits(self, cut):
        if cut.channels is None:
            raise UsageError(f'--{self.name}: {cut.name} sends {DESCRIPTIONS[cut.layout]}, which has no channels to '
                             'keep')

    def describe(self, strength, defence, noise):
        return f'{strength:g} of channels ({defence.channel_select})'

    def choose(self, features, axis, strength, how, seed):
        """The channels kept, chosen on `features`: the calibration batch's clean tensors, channels on `axis`."""
        features = features.movedim(axis, 1)
        count = keep_count(strength, features.shape[1])
        print(f'defence: the device sends {count} of {features.shape[1]} channels ({how}), the rest as zeros')
        return select_channels(how, count, features, seed)


class OnTensor(NamedTuple):
    """A fixed defence switched on at `strength`: its arithmetic on the intercepted tensor, which
    SplitAttack.defend applies on the device, and what a white-box attacker, who knows it, undoes."""
    defence: object  # a Selected
    strength: float

    def __call__(self, features, generator=None):
        return self.defence.transform(features, self.strength, generator)

    def as_seen(self, sent):
        return self.defence.as_seen(sent, self.strength)


class Selected(Defence):
    """Arithmetic on the sent tensor, switched on by --defence NAME with its own strength flag. A new one is a
    subclass with its flag, check, describe and transform, and a docstring whose first paragraph says what it does
    for --defence's help (docs/extending.md)."""
    zeroes = False  # True where the elements it zeroes are known not to be sent: the white-box attack skips them

    @property
    def summary(self):
        """What it does, in --defence's help: its docstring's first paragraph."""
        text = ' '.join(inspect.getdoc(self).split('\n\n')[0].split())
        return text[0].lower() + text[1:]

    @property
    def keys(self):
        return 'defence', self.flag

    def strength(self, defence, noise):
        return strength_flag(defence, self) if defence.defence == self.name else None

    def settings(self, strength):
        return {'defence': self.name, self.flag: strength}

    def apply(self, attack, strength):
        attack.on_tensor.append(OnTensor(self, strength))

    def transform(self, features, strength, generator=None):
        """What the device sends instead of `features`; `generator`: one, a list of one per image (see
        noise.random_like), or None for a fixed seed."""
        raise NotImplementedError

    def as_seen(self, sent, strength):
        """The sent tensor as a white-box attacker, who knows the defence, reads it (e.g. dropout's scaling undone)."""
        return sent


class Dropout(Selected):
    """Zero each element with probability --defence_p (survivors scaled by 1/(1-p))

    The scaling is dropout's: the server's layers see the same expected activation."""
    name, flag, default, zeroes = 'dropout', 'defence_p', 0.5, True

    def add_arguments(self, group):
        group.add_argument('--defence_p', type=float, default=self.default, help='dropout probability, in [0, 1)')

    def transform(self, features, strength, generator=None):
        if strength == 0:
            return features
        generator = generator or torch.Generator(device=features.device).manual_seed(0)
        kept = random_like(features, torch.rand, generator) >= strength
        return features * kept / (1 - strength)

    def as_seen(self, sent, strength):
        return sent * (1 - strength)

    def check(self, strength, source, cut):
        if not 0 <= strength < 1:
            raise UsageError(f'{source}: a dropout probability in [0, 1), got {strength:g}')

    def describe(self, strength, defence, noise):
        return f'dropout p={strength:g}'


class TopK(Selected):
    """Keep the --defence_k largest-magnitude elements of each sample

    Exactly k (a fraction of C x H x W, or a count) are sent, even where magnitudes tie."""
    name, flag, default, zeroes = 'topk', 'defence_k', 0.1, True

    def add_arguments(self, group):
        group.add_argument('--defence_k', type=float, default=self.default,
                           help='elements kept by topk: a fraction in (0, 1] of C*H*W, or a count above 1')

    def check(self, strength, source, cut):
        if strength <= 0 or (strength > 1 and not is_count(strength)):
            raise UsageError(f'{source}: a fraction in (0, 1] or a whole count, got {strength:g}')

    def describe(self, strength, defence, noise):
        return f'top-k {strength:g}'

    def transform(self, features, strength, generator=None):
        flat = features.flatten(1)
        k = min(keep_count(strength, flat.shape[1]), flat.shape[1])
        kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(k, dim=1).indices, True)
        return (flat * kept).view_as(features)  # exactly k per sample, even where magnitudes tie


class Trained(Defence):
    """Fine-tunes the device's half (and with --defend_server the server's) so that the defended victim keeps the
    original's predictions (KL to its outputs on the same images: no labels) while the privacy term, weighted by
    the defence's flag, pushes the sent tensor away from the image."""
    trained = True
    default, meaning = 1.0, 'weight'

    def add_arguments(self, group):
        group.add_argument(f'--{self.flag}', type=float, default=self.default, help=self.__doc__.split('\n\n')[0])

    def strength(self, defence, noise):
        return strength_flag(defence, self) if defence.train_defence == self.name else None

    def check(self, strength, source, cut):
        if strength < 0:
            raise UsageError(f'{source}: a weight cannot be negative, got {strength:g}')

    def settings(self, strength):
        return {'train_defence': self.name, self.flag: strength}

    def describe(self, strength, defence=None, noise=None):
        return f'{self.name} ({self.meaning} {strength:g})'

    def prepare(self, victim, strength, calibration):
        """The victim to fine-tune, with any modules the defence adds at the cut."""
        return victim

    def privacy_term(self, strength, victim, reference, shape, seed, image_size):
        """A function (images, sent) -> the privacy loss to add, weighted by `strength`; None for distillation alone.
        `victim`: the one being fine-tuned; `reference`: the original, frozen; `shape`: its sent tensor's; `seed`:
        defence training's."""
        return None


class NoPeek(Trained):
    """nopeek: weight of the distance correlation between the input batch and the sent tensor (Vepakomma et al.
    2020)"""
    name, flag = 'nopeek', 'nopeek_weight'

    def privacy_term(self, strength, victim, reference, shape, seed, image_size):
        return lambda images, sent: strength * distance_correlation(images, sent)


class Adversarial(Trained):
    """adversarial: weight of the reconstruction error of a decoder trained alongside, in alternation, that the
    device's half is trained to raise (the ResSFL / adversarial-representation recipe)"""
    name, flag = 'adversarial', 'adversarial_weight'

    def privacy_term(self, strength, victim, reference, shape, seed, image_size):
        return SimulatedAttacker(seed, image_size, shape, next(victim.parameters()).device, strength)


class FisherPenalty(Trained):
    """fil: weight of the Fisher information the sent tensor carries about the image (dFIL, Maeng et al. 2023; one
    random probe a step), as a fraction of the original victim's on the same images and probe, under the worse of two
    noise models: a fixed variance, and noise scaled to the tensor's centred power (--noise_snr)

    Centred, so no constant added to the tensor lowers it; the worse of the two, so no scale of the tensor does
    (scaling up raises the first, scaling down the second)."""
    name, flag, default = 'fil', 'fil_weight', 0.1

    def privacy_term(self, strength, victim, reference, shape, seed, image_size):
        device = next(victim.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)

        def penalty(images, sent):
            probes = rademacher(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            with torch.no_grad():
                original_trace = jacobian_norms(reference.encode, images, probes).sum()
                original_power = centred_power(reference.encode(images))
            fixed_noise = jacobian_norms(victim.encode, images, probes).sum() / original_trace
            power = centred_power(sent).clamp_min(1e-12)
            return strength * fixed_noise * (original_power / power).clamp_min(1)  # x P0 / P where the power fell
        return penalty


class Bottleneck(Trained):
    """bottleneck: channels of a learned 1x1 conv pair around the cut (a fraction in (0, 1] of the cut's channels
    or a count above 1), initialised by PCA of the features and trained by distillation alone"""
    name, flag, default, meaning = 'bottleneck', 'bottleneck_channels', 0.125, 'channels'

    def check(self, strength, source, cut):
        KEEP_CHANNELS.check(strength, source, cut)

    def fits(self, cut):
        if cut.layout != 'map':
            raise UsageError(f'--train_defence bottleneck: a 1x1 conv pair narrows a feature map (C x H x W); '
                             f'{cut.name} sends {DESCRIPTIONS[cut.layout]}')

    def prepare(self, victim, strength, calibration):
        channels = calibration.shape[1]
        squeeze, expand = bottleneck(channels, keep_count(strength, channels))
        initialise_by_pca(squeeze, expand, calibration)
        return SplitVictim(*with_bottleneck(victim.encoder, victim.tail, squeeze, expand), frozen=False)


KEEP_CHANNELS = KeepChannels()
DEFENCES = {d.name: d for d in (FeatureNoise(), KEEP_CHANNELS, Dropout(), TopK(), NoPeek(), Adversarial(),
                                FisherPenalty(), Bottleneck())}
SELECTED = tuple(name for name, d in DEFENCES.items() if isinstance(d, Selected))
FIXED_KEYS = tuple(dict.fromkeys(key for d in DEFENCES.values() for key in d.keys))
TRAINED = tuple(name for name, d in DEFENCES.items() if d.trained)
NOISE_KEYS = frozenset(DEFENCES['noise'].settings(0))  # the flags the noise defence (and --noise_for_bound) sets
# The flags that switch every defence off.
NO_DEFENCE = {'train_noise': False, 'test_noise': False, 'keep_channels': None, 'defence': 'none',
              'train_defence': None}


def add_arguments(parser, modes):
    """The defences' flags; --train_defence, a mode of its own, into `modes`."""
    modes.add_argument('--train_defence', choices=TRAINED, metavar='{' + ','.join(TRAINED) + '}',
                       help='fine-tune the victim into a defended victim for --weights (its strength: the kind\'s '
                            'flag under "trained defences")')
    fixed = parser.flag_group('defences (on the device, before the tensor is sent)')
    fixed.add_argument('--defence', choices=('none',) + SELECTED, default='none',
                       help='; '.join(f'{name}: {DEFENCES[name].summary}' for name in SELECTED))
    trained = parser.flag_group('trained defences (--train_defence KIND)')
    for defence in DEFENCES.values():
        defence.add_arguments(trained if defence.trained else fixed)
    trained.add_argument('--reference', metavar='pretrained|FILE',
                         help='testing a defended victim of your own (--weights): the original victim it was made '
                              'from, which its utility is charged against (pretrained: torchvision\'s ImageNet '
                              'weights; or a state-dict file)')
    trained.add_argument('--defend_epochs', type=int, default=10, help='epochs of defence training')
    trained.add_argument('--defend_lr', type=float, default=1e-4, help='Adam learning rate of defence training')
    trained.switch('--defend_server', "fine-tune the server's half too (a real deployment retrains both)")


def strengths(flags):
    """The defences' own flags (DefenceConfig.strengths) out of a configuration's flags, at their defaults where
    the flags predate them."""
    return {d.flag: flags.get(d.flag, d.default) for d in DEFENCES.values() if d.flag}


def training_flags():
    """The flags that matter only where a victim is trained into a defended one."""
    return set(TRAINING_FLAGS) | {DEFENCES[name].flag for name in TRAINED}


def active(defence, noise):
    """(defence, strength) for every defence the configuration switches on."""
    return [(d, d.strength(defence, noise)) for d in DEFENCES.values() if d.strength(defence, noise) is not None]


def check_flags(defence, cut):
    """Each defence's own flag as given (a bad value is a mistake even where the defence is off), checked by the
    defence itself, then defence training's."""
    for d in DEFENCES.values():
        if d.flag:
            d.check(strength_flag(defence, d), f'argument --{d.flag}', cut)
    if defence.keep_channels is not None:
        KEEP_CHANNELS.check(defence.keep_channels, 'argument --keep_channels', cut)
    for d, _ in active(defence, NoiseConfig()):
        d.fits(cut)
    if defence.epochs < 1:
        raise UsageError(f'argument --defend_epochs: must be at least 1, got {defence.epochs}')
    if defence.lr <= 0:
        raise UsageError(f'argument --defend_lr: must be positive, got {defence.lr:g}')


def describe(defence, noise, victim_defence=None):
    """The defences on the sent tensor, for titles and tables: those the configuration switches on, and a defended
    victim's training (`victim_defence`, recorded when its file was loaded)."""
    return [d.describe(s, defence, noise) for d, s in active(defence, noise) if not d.trained] + (
        [victim_defence] if victim_defence else [])


def family(defence, noise, victim_defence=None):
    """'trained' for a defended victim, 'fixed' for defences on the sent tensor, '' for none: a frontier each."""
    if victim_defence or any(d.trained for d, _ in active(defence, noise)):
        return 'trained'
    return 'fixed' if active(defence, noise) else ''


def idle_flags(defence, noise, victim_defence=None):
    """The flags of the defences the configuration leaves off (defence training's too where it trains none): set
    or not, they changed nothing in the run."""
    def flags(d):
        return {k for k in (*d.keys, d.flag) if k}
    used = set().union(*(flags(d) for d, _ in active(defence, noise)))
    idle = set().union(*(flags(d) for d in DEFENCES.values())) - used
    return idle | (set() if family(defence, noise, victim_defence) == 'trained' else set(TRAINING_FLAGS))


def parse_sweep_value(value):
    """'dropout:0.5' -> (DEFENCES['dropout'], 0.5); 'none' -> (None, None)."""
    kind, _, strength = value.partition(':')
    if value == 'none':
        return None, None
    if kind not in DEFENCES or not strength:
        raise UsageError(f'--sweep_values for --sweep defence: {value!r} is not none or KIND:STRENGTH with KIND one '
                         f'of {", ".join(DEFENCES)}')
    try:
        return DEFENCES[kind], float(strength)
    except ValueError:
        raise UsageError(f'--sweep_values for --sweep defence: {value!r} needs a number after the colon') from None


def check_sweep_value(value, cut):
    defence, strength = parse_sweep_value(value)
    if defence is not None:
        defence.check(strength, f'--sweep_values {value}', cut)


def recorded_defence(record):
    """The flags a defended victim's file was trained with, shown as those of every run that attacks it (so tables
    show what acted, not this command's defaults); defence training's own flags are None where the file predates
    recording them."""
    return {**DEFENCES[record['kind']].settings(record['strength']),
            **(record.get('training') or dict.fromkeys(TRAINING_FLAGS))}


def double_centred(distances):
    return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()


def distance_correlation(x, z):
    """Sample distance correlation (Szekely, Rizzo & Bakirov 2007) between the rows of x and z (n samples each,
    flattened): 0 when independent, 1 when z is a similarity transform of x; NoPeek's leakage measure."""
    def centred(v):
        v = v.flatten(1).float()
        return double_centred(torch.cdist(v, v, compute_mode='donot_use_mm_for_euclid_dist'))
    a, b = centred(x), centred(z)
    covariance = (a * b).mean()
    variances = (a * a).mean() * (b * b).mean()
    return (covariance.clamp_min(0) / variances.sqrt().clamp_min(1e-12)).sqrt()


@torch.no_grad()
def initialise_by_pca(squeeze, expand, features):
    """The narrow cut's best linear start: project onto the features' top principal directions and back."""
    pixels = features.float().permute(0, 2, 3, 1).flatten(0, 2)
    mean = pixels.mean(0)
    directions = torch.linalg.eigh(torch.cov((pixels - mean).T))[1].flip(1)[:, :squeeze.out_channels]
    squeeze.weight.copy_(directions.T[:, :, None, None])
    squeeze.bias.copy_(-directions.T @ mean)
    expand.weight.copy_(directions[:, :, None, None])
    expand.bias.copy_(mean)


def simulated_attacker_seed(seed):
    """The adversarial defence's own attacker starts from this seed, never `seed` itself, from which the fresh
    attacker that later measures the defence starts: the two must not share their initial weights."""
    return stream_seed('simulated attacker', seed)


class SimulatedAttacker:
    """The decoder the adversarial defence trains against (the original work's, light, for speed): one attacker
    step on the detached tensor, then the device's term, minus the weighted reconstruction error of the updated
    attacker."""

    def __init__(self, seed, image_size, shape, device, weight):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(simulated_attacker_seed(seed))
            self.decoder = build_decoder(shape, image_size, DecoderSpec(depth='light')).to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=1e-3)
        self.weight = weight

    def __call__(self, images, sent):
        loss = F.mse_loss(self.decoder(sent.detach()), images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return -self.weight * F.mse_loss(self.decoder(sent), images)
