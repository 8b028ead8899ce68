"""Defences: what the device does to the tensor before sending it. Each defence is one object in DEFENCES that owns
its flags, their checks, the settings that switch it on, what it does and its name in outputs; main, sweep,
evaluate and visualize ask it. Fixed defences are arithmetic on the sent tensor. Trained ones fine-tune the device's
half of the victim (--train_defence, run by train.train_defence) into a defended victim that --weights loads and the
normal attack then attacks from scratch; they are charged against the original victim's predictions."""
import hashlib
import inspect
import math
import os

import torch
import torch.nn.functional as F

from fisher import calibrated_variance, jacobian_norms, rademacher
from models import (DecoderSpec, OnTensor, SplitAttack, SplitVictim, bottleneck, build_decoder, build_victim,
                    feature_shape, keep_count, probe_feature_shape, random_like, select_channels,
                    with_bottleneck)
from utils import UsageError, setting

DEFENDED_FILE, DEFENCE_RECORD = 'defended_victim.pth', 'defence.json'
REFERENCE_PRETRAINED = 'pretrained'  # --reference: torchvision's ImageNet weights
TRAINING_KEYS = ('defend_epochs', 'defend_lr', 'defend_server')  # defence training's own flags


def is_count(value):
    return value > 1 and value == int(value)


class Defence:
    """A defence as the flags describe it. `strength(cfg)` is its number where the configuration switches it on,
    None where it is off; `settings(strength)` the configuration that switches it on; `source` in a check names
    the flag or sweep value being checked, for the one-line error."""
    name = ''
    trained = False
    flag = ''  # the flag holding its strength, where it has one of its own
    keys = ()  # the flags of a fixed defence, part of what a decoder was trained against

    def add_arguments(self, group):
        pass

    def strength(self, cfg):
        raise NotImplementedError

    def check(self, cfg, strength, source):
        raise NotImplementedError

    def check_flags(self, cfg):
        """Its flags as given (a bad value is a mistake even where the defence is off)."""
        if self.flag:
            self.check(cfg, cfg[self.flag], f'argument --{self.flag}')

    def settings(self, strength):
        raise NotImplementedError

    def describe(self, cfg):
        raise NotImplementedError

    def apply(self, attack, cfg, calibration_images):
        """Switch the defence on in a built attack (fixed defences whose arithmetic SplitAttack.defend does)."""


def noise_flags(variance):
    """The same Gaussian noise while the attacker trains and when it is measured (none at variance 0): an attacker
    measured against noise it never trained with would flatter the noise."""
    return dict(train_noise=variance > 0, test_noise=variance > 0, noise_var=variance, test_noise_var=variance)


class FeatureNoise(Defence):
    """Gaussian noise on the intercepted tensor; its flags (--noise_at features, --test_noise_var...) are shared
    with input noise, so main owns them."""
    name = 'noise'

    def strength(self, cfg):
        return cfg['test_noise_var'] if cfg.get('test_noise') and cfg['noise_at'] == 'features' else None

    def check(self, cfg, strength, source):
        if strength < 0:
            raise UsageError(f'{source}: a variance cannot be negative, got {strength:g}')

    def settings(self, strength):
        return {**noise_flags(strength), 'noise_at': 'features', 'noise_mean': 0.0, 'test_noise_mean': 0.0}

    def describe(self, cfg):
        bound = (f', set for a {cfg["noise_for_bound"]:g} dB unbiased-attacker ceiling'
                 if cfg.get('noise_for_bound') is not None else '')
        return f'noise on the tensor (mean {cfg["test_noise_mean"]:g}, var {cfg["test_noise_var"]:.4g}{bound})'


class KeepChannels(Defence):
    """The device sends only some channels, the rest as zeros."""
    name, keys = 'keep_channels', ('keep_channels', 'channel_select')

    def add_arguments(self, group):
        group.add_argument('--keep_channels', type=float,
                           help='send only K channels (a fraction in (0, 1] or a count above 1), the rest as zeros')
        group.add_argument('--channel_select', choices=('first', 'random', 'topvar'), default='topvar',
                           help='which channels: the first K, K at random (seeded), or the K of highest variance '
                                'over a calibration batch of training images')

    def strength(self, cfg):
        return cfg.get('keep_channels')

    def check(self, cfg, strength, source):
        if strength <= 0:
            raise UsageError(f'{source}: must be positive, got {strength:g}')
        if strength > 1 and not is_count(strength):
            raise UsageError(f'{source}: a fraction in (0, 1] or a whole number of channels, got {strength:g}')
        channels = probe_feature_shape(cfg['arch'], cfg['split'], cfg['image_size'])[0]
        if keep_count(strength, channels) > channels:
            raise UsageError(f'{source}: {cfg["arch"]} cut at {cfg["split"]} sends only {channels} channels, '
                             f'got {strength:g}')

    def check_flags(self, cfg):
        if cfg.get('keep_channels') is not None:
            self.check(cfg, cfg['keep_channels'], 'argument --keep_channels')

    def settings(self, strength):
        return {'keep_channels': strength}

    def describe(self, cfg):
        return f'{cfg["keep_channels"]:g} of channels ({cfg["channel_select"]})'

    def apply(self, attack, cfg, calibration_images):
        """The channels are chosen once per run, on `calibration_images` (uint8, training images), and stored in
        cfg['channel_indices'], so that every attack of the run and every later evaluation sees the same tensor."""
        channels = cfg['sent_shape'][0]
        if cfg.get('channel_indices') is None:
            if calibration_images is None:
                raise ValueError('--keep_channels needs calibration images to choose its channels')
            calibration = attack.encode(attack.to_images(calibration_images)).cpu()
            count = keep_count(cfg['keep_channels'], channels)
            cfg['channel_indices'] = select_channels(cfg['channel_select'], count, calibration, cfg['seed'])
            print(f'defence: the device sends {count} of {channels} channels ({cfg["channel_select"]}), the rest '
                  'as zeros')
        attack.keep_only(cfg['channel_indices'], channels)


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

    def strength(self, cfg):
        return cfg[self.flag] if cfg.get('defence') == self.name else None

    def settings(self, strength):
        return {'defence': self.name, self.flag: strength}

    def apply(self, attack, cfg, calibration_images):
        attack.on_tensor.append(OnTensor(self, cfg[self.flag]))

    def transform(self, features, strength, generator=None):
        """What the device sends instead of `features`; `generator`: one, a list of one per image (see
        models.random_like), or None for a fixed seed."""
        raise NotImplementedError

    def as_seen(self, sent, strength):
        """The sent tensor as a white-box attacker, who knows the defence, reads it (e.g. dropout's scaling undone)."""
        return sent


class Dropout(Selected):
    """Zero each element with probability --defence_p (survivors scaled by 1/(1-p))

    The scaling is dropout's: the server's layers see the same expected activation."""
    name, flag, zeroes = 'dropout', 'defence_p', True

    def add_arguments(self, group):
        group.add_argument('--defence_p', type=float, default=0.5, help='dropout probability, in [0, 1)')

    def transform(self, features, strength, generator=None):
        if strength == 0:
            return features
        generator = generator or torch.Generator(device=features.device).manual_seed(0)
        kept = random_like(features, torch.rand, generator) >= strength
        return features * kept / (1 - strength)

    def as_seen(self, sent, strength):
        return sent * (1 - strength)

    def check(self, cfg, strength, source):
        if not 0 <= strength < 1:
            raise UsageError(f'{source}: a dropout probability in [0, 1), got {strength:g}')

    def describe(self, cfg):
        return f'dropout p={cfg["defence_p"]:g}'


class TopK(Selected):
    """Keep the --defence_k largest-magnitude elements of each sample

    Exactly k (a fraction of C x H x W, or a count) are sent, even where magnitudes tie."""
    name, flag, zeroes = 'topk', 'defence_k', True

    def add_arguments(self, group):
        group.add_argument('--defence_k', type=float, default=0.1,
                           help='elements kept by topk: a fraction in (0, 1] of C*H*W, or a count above 1')

    def check(self, cfg, strength, source):
        if strength <= 0 or (strength > 1 and not is_count(strength)):
            raise UsageError(f'{source}: a fraction in (0, 1] or a whole count, got {strength:g}')

    def describe(self, cfg):
        return f'top-k {cfg["defence_k"]:g}'

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

    def strength(self, cfg):
        return cfg[self.flag] if cfg.get('train_defence') == self.name else None

    def check(self, cfg, strength, source):
        if strength < 0:
            raise UsageError(f'{source}: a weight cannot be negative, got {strength:g}')

    def settings(self, strength):
        return {'train_defence': self.name, self.flag: strength}

    def describe(self, cfg):
        return f'{self.name} ({self.meaning} {self.strength(cfg):g})'

    def prepare(self, victim, strength, calibration):
        """The victim to fine-tune, with any modules the defence adds at the cut."""
        return victim

    def privacy_term(self, cfg, shape, device, victim):
        """A function (images, sent) -> the privacy loss to add, weighted; None for distillation alone. `victim`:
        the one being fine-tuned."""
        return None


class NoPeek(Trained):
    """nopeek: weight of the distance correlation between the input batch and the sent tensor (Vepakomma et al.
    2020)"""
    name, flag = 'nopeek', 'nopeek_weight'

    def privacy_term(self, cfg, shape, device, victim):
        return lambda images, sent: cfg[self.flag] * distance_correlation(images, sent)


class Adversarial(Trained):
    """adversarial: weight of the reconstruction error of a decoder trained alongside, in alternation, that the
    device's half is trained to raise (the ResSFL / adversarial-representation recipe)"""
    name, flag = 'adversarial', 'adversarial_weight'

    def privacy_term(self, cfg, shape, device, victim):
        return SimulatedAttacker(cfg, shape, device, cfg[self.flag])


class FisherPenalty(Trained):
    """fil: weight of the Jacobian penalty tr(J^T J) / ||z||^2 of the device's half (one random probe a step), which
    lowers the Fisher information its sent tensor z carries about the image under noise (dFIL, Maeng et al. 2023);
    relative to z's energy, so that scaling z up or down does not change it"""
    name, flag = 'fil', 'fil_weight'

    def privacy_term(self, cfg, shape, device, victim):
        generator = torch.Generator(device=device).manual_seed(cfg['seed'])

        def penalty(images, sent):
            probes = rademacher(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            energy = sent.pow(2).flatten(1).sum(1).clamp_min(1e-12)
            return cfg[self.flag] * (jacobian_norms(victim.encode, images, probes) / energy).mean()
        return penalty


class Bottleneck(Trained):
    """bottleneck: channels of a learned 1x1 conv pair around the cut (a fraction in (0, 1] of the cut's channels
    or a count above 1), initialised by PCA of the features and trained by distillation alone"""
    name, flag, default, meaning = 'bottleneck', 'bottleneck_channels', 0.125, 'channels'

    def check(self, cfg, strength, source):
        KEEP_CHANNELS.check(cfg, strength, source)

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
    setting(trained, '--defend_server', "fine-tune the server's half too (a real deployment retrains both)")


def training_keys():
    """The flags that matter only where a victim is trained into a defended one."""
    return set(TRAINING_KEYS) | {DEFENCES[name].flag for name in TRAINED}


def active(cfg):
    """(defence, strength) for every defence the configuration switches on."""
    return [(d, d.strength(cfg)) for d in DEFENCES.values() if d.strength(cfg) is not None]


def check_flags(cfg):
    """Each defence's flags, checked by the defence itself, then defence training's."""
    for defence in DEFENCES.values():
        defence.check_flags(cfg)
    if cfg.get('reference') and not cfg['weights']:
        raise UsageError('--reference names the original victim that a defended --weights file is charged against: '
                         'give --weights too')
    if cfg['defend_epochs'] < 1:
        raise UsageError(f'argument --defend_epochs: must be at least 1, got {cfg["defend_epochs"]}')
    if cfg['defend_lr'] <= 0:
        raise UsageError(f'argument --defend_lr: must be positive, got {cfg["defend_lr"]:g}')


def describe(cfg):
    """The defences on the sent tensor, for titles and tables: those the flags switch on, and a defended
    victim's training (recorded when its file was loaded)."""
    return [d.describe(cfg) for d, _ in active(cfg) if not d.trained] + (
        [cfg['victim_defence']] if cfg.get('victim_defence') else [])


def family(cfg):
    """'trained' for a defended victim, 'fixed' for defences on the sent tensor, '' for none: a frontier each."""
    if cfg.get('victim_defence') or any(d.trained for d, _ in active(cfg)):
        return 'trained'
    return 'fixed' if active(cfg) else ''


def idle_keys(cfg):
    """The flags of the defences the configuration leaves off (defence training's too where it trains none): set
    or not, they changed nothing in the run."""
    def flags(defence):
        return {k for k in (*defence.keys, defence.flag) if k}
    used = set().union(*(flags(d) for d, _ in active(cfg)))
    idle = set().union(*(flags(d) for d in DEFENCES.values())) - used
    return idle | (set() if family(cfg) == 'trained' else set(TRAINING_KEYS))


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


def check_sweep_value(cfg, value):
    defence, strength = parse_sweep_value(value)
    if defence is not None:
        defence.check(cfg, strength, f'--sweep_values {value}')


def without_defences(cfg):
    return {**cfg, 'train_noise': False, 'test_noise': False, 'keep_channels': None, 'defence': 'none',
            'train_defence': None}


def build_attack(cfg, device, calibration_images=None):
    """Victim, decoder and defences as the configuration describes them; decoder initialised from cfg['seed'].
    What the run derives is written into cfg: the channels kept, the victim's fingerprint and, for a defended
    victim, its defence."""
    victim = build_victim(cfg['arch'], cfg['split'], cfg['pretrained'], cfg['weights'], cfg['victim_seed'])
    expected = cfg.get('victim_fingerprint')
    if expected is not None and not math.isclose(victim.fingerprint(), expected, rel_tol=1e-6):
        raise UsageError('the victim rebuilt from the checkpoint\'s settings (arch, --use_pretrained/--weights, seed) '
                         'is not the one this decoder was trained against; pass the same victim weights')
    if victim.defended is not None:
        cfg.update(recorded_defence(victim.defended))
    torch.manual_seed(cfg['seed'])
    shape = feature_shape(victim, cfg['image_size'])
    decoder = build_decoder(shape, cfg['image_size'], DecoderSpec.from_config(cfg))
    attack = SplitAttack(victim, decoder, device, bf16=cfg['precision'] == 'bf16', compile=cfg.get('compile', False))
    cfg['sent_shape'] = list(shape)
    for defence, _ in active(cfg):
        defence.apply(attack, cfg, calibration_images)
    if cfg.get('noise_for_bound') is not None and cfg.get('bound_calibration') is None:
        calibrate_noise(attack, cfg, calibration_images)
    if victim.defended is not None:
        if cfg.get('reference'):
            raise UsageError(f'--reference: --weights {cfg["weights"]} is a defended victim written by '
                             '--train_defence, which names the original victim it is charged against itself; drop '
                             '--reference')
        reference = victim.defended['reference']
        attack.charge_against(build_victim(cfg['arch'], cfg['split'], reference['pretrained'], reference['weights'],
                                           reference['seed']))
        cfg['victim_defence'] = victim.defended['label']
    elif cfg.get('reference'):
        attack.charge_against(reference_victim(cfg))
        cfg['victim_defence'] = (f'your defence: --weights {os.path.basename(cfg["weights"])}, charged against '
                                 f'--reference {cfg["reference"]}')
    return attack


def calibrate_noise(attack, cfg, calibration_images):
    """--noise_for_bound DB: the noise defence, on while the attacker trains and when it is measured, at the variance
    where the mean unbiased-attacker PSNR ceiling on `calibration_images` (uint8, training images) is DB; the
    variance and how it was found go into cfg, so every later evaluation of the run sees the same noise."""
    if calibration_images is None:
        raise ValueError('--noise_for_bound needs calibration images to set its noise')
    variance, record = calibrated_variance(attack, attack.to_images(calibration_images), cfg['noise_for_bound'],
                                           cfg['fil_probes'])
    cfg.update(DEFENCES['noise'].settings(variance), bound_calibration=record)
    print(f'--noise_for_bound {cfg["noise_for_bound"]:g}: noise of variance {variance:.4g} (sigma '
          f'{record["sigma"]:.4g}) on the tensor, where the mean unbiased-attacker PSNR ceiling on {record["images"]} '
          f'training images is {cfg["noise_for_bound"]:g} dB')


def reference_victim(cfg):
    """--reference: the original victim a defence of your own (--weights) is charged against: torchvision's
    ImageNet weights ('pretrained') or a state-dict file."""
    pretrained = cfg['reference'] == REFERENCE_PRETRAINED
    return build_victim(cfg['arch'], cfg['split'], pretrained, None if pretrained else cfg['reference'],
                        cfg['victim_seed'], flag='--reference')


def recorded_defence(record):
    """The settings a defended victim's file was trained with, in the configuration of every run that attacks it
    (so tables show what acted, not this command's defaults); defence training's own flags are None where the
    file predates recording them."""
    return {**DEFENCES[record['kind']].settings(record['strength']),
            **(record.get('training') or dict.fromkeys(TRAINING_KEYS))}


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
    return int.from_bytes(hashlib.blake2b(f'simulated attacker {seed}'.encode(), digest_size=7).digest(), 'big')


class SimulatedAttacker:
    """The decoder the adversarial defence trains against (the original work's, light, for speed): one attacker
    step on the detached tensor, then the device's term, minus the weighted reconstruction error of the updated
    attacker."""

    def __init__(self, cfg, shape, device, weight):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(simulated_attacker_seed(cfg['seed']))
            self.decoder = build_decoder(shape, cfg['image_size'], DecoderSpec(depth='light')).to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=1e-3)
        self.weight = weight

    def __call__(self, images, sent):
        loss = F.mse_loss(self.decoder(sent.detach()), images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return -self.weight * F.mse_loss(self.decoder(sent), images)
