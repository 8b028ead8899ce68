"""Defences: what the device does to the tensor before sending it. Each defence is one object in DEFENCES that owns
its flags, their checks, the settings that switch it on, what it does and its name in outputs; main, sweep,
evaluate and visualize ask it. Fixed defences are arithmetic on the sent tensor. Trained ones fine-tune the device's
half of the victim (--defend) into a defended victim that --weights loads and the normal attack then attacks from
scratch; they are charged against the original victim's predictions."""
import math
import os
import time

import torch
import torch.nn.functional as F

from data import full_batches, load_splits
from models import (DEFENDED_FORMAT, DecoderSpec, SplitAttack, Sparsify, SplitVictim, bottleneck,
                    build_decoder, build_victim, cut, feature_shape, keep_count, load_network, probe_feature_shape,
                    select_channels, with_bottleneck)
from utils import UsageError, progress, save_json, save_torch

DEFENDED_FILE, DEFENCE_RECORD = 'defended_victim.pth', 'defence.json'
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
        return None

    def check(self, cfg, strength, source):
        pass

    def check_flags(self, cfg):
        """Its flags as given (a bad value is a mistake even where the defence is off)."""
        if self.flag:
            self.check(cfg, cfg[self.flag], f'argument --{self.flag}')

    def settings(self, strength):
        return {}

    def describe(self, cfg):
        return f'{self.name} {self.strength(cfg):g}'

    def apply(self, attack, cfg, calibration_images):
        """Switch the defence on in a built attack (fixed defences whose arithmetic SplitAttack.defend does)."""


class FeatureNoise(Defence):
    """Gaussian noise on the intercepted tensor; its flags (--noise_at features, --test_noise_var...) are shared
    with input noise, so main owns them."""
    name = 'noise'

    def strength(self, cfg):
        return cfg['test_noise_var'] if cfg.get('test_noise') and cfg['noise_at'] == 'features' else None

    def check(self, cfg, strength, source):
        if strength < 0:
            raise UsageError(f'{source}: a variance cannot be negative, got {strength:g}')

    def settings(self, strength):  # the same noise while the attacker trains and when it is measured
        return dict(aug=True, test_noise=True, noise_at='features', noise_var=strength, test_noise_var=strength,
                    noise_mean=0.0, test_noise_mean=0.0)

    def describe(self, cfg):
        return f'noise on the tensor (mean {cfg["test_noise_mean"]:g}, var {cfg["test_noise_var"]:g})'


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
        channels = attack.feature_shape[0]
        if cfg.get('channel_indices') is None:
            if calibration_images is None:
                raise ValueError('--keep_channels needs calibration images to choose its channels')
            calibration = attack.encode(attack.to_images(calibration_images)).cpu()
            count = keep_count(cfg['keep_channels'], channels)
            cfg['channel_indices'] = select_channels(cfg['channel_select'], count, calibration, cfg['seed'])
            print(f'defence: the device sends {count} of {channels} channels ({cfg["channel_select"]}), the rest '
                  'as zeros')
        attack.keep_only(cfg['channel_indices'], channels)


class Sparsifying(Defence):
    """Zeroes elements of the tensor (--defence KIND with its own strength flag)."""

    @property
    def keys(self):
        return 'defence', self.flag

    def strength(self, cfg):
        return cfg[self.flag] if cfg.get('defence') == self.name else None

    def settings(self, strength):
        return {'defence': self.name, self.flag: strength}

    def apply(self, attack, cfg, calibration_images):
        attack.sparsify = Sparsify(self.name, cfg[self.flag])


class Dropout(Sparsifying):
    name, flag = 'dropout', 'defence_p'

    def add_arguments(self, group):
        group.add_argument('--defence_p', type=float, default=0.5, help='dropout probability, in [0, 1)')

    def check(self, cfg, strength, source):
        if not 0 <= strength < 1:
            raise UsageError(f'{source}: a dropout probability in [0, 1), got {strength:g}')

    def describe(self, cfg):
        return f'dropout p={cfg["defence_p"]:g}'


class TopK(Sparsifying):
    name, flag = 'topk', 'defence_k'

    def add_arguments(self, group):
        group.add_argument('--defence_k', type=float, default=0.1,
                           help='elements kept by topk: a fraction in (0, 1] of C*H*W, or a count above 1')

    def check(self, cfg, strength, source):
        if strength <= 0 or (strength > 1 and not is_count(strength)):
            raise UsageError(f'{source}: a fraction in (0, 1] or a whole count, got {strength:g}')

    def describe(self, cfg):
        return f'top-k {cfg["defence_k"]:g}'


class Trained(Defence):
    """Fine-tunes the device's half (and with --defend_server the server's) so that the defended victim keeps the
    original's predictions (KL to its outputs on the same images: no labels) while the privacy term, weighted by
    the defence's flag, pushes the sent tensor away from the image."""
    trained = True
    default, meaning = 1.0, 'weight'

    def add_arguments(self, group):
        group.add_argument(f'--{self.flag}', type=float, default=self.default, help=self.__doc__.split('\n\n')[0])

    def strength(self, cfg):
        return cfg[self.flag] if cfg.get('defend') == self.name else None

    def check(self, cfg, strength, source):
        if strength < 0:
            raise UsageError(f'{source}: a weight cannot be negative, got {strength:g}')

    def settings(self, strength):
        return {'defend': self.name, self.flag: strength}

    def describe(self, cfg):
        return f'{self.name} ({self.meaning} {self.strength(cfg):g})'

    def prepare(self, victim, strength, calibration):
        """The victim to fine-tune, with any modules the defence adds at the cut."""
        return victim

    def privacy_term(self, cfg, shape, device):
        """A function (images, sent) -> the privacy loss to add, weighted; None for distillation alone."""
        return None


class NoPeek(Trained):
    """nopeek: weight of the distance correlation between the input batch and the sent tensor (Vepakomma et al.
    2020)"""
    name, flag = 'nopeek', 'nopeek_weight'

    def privacy_term(self, cfg, shape, device):
        return lambda images, sent: cfg[self.flag] * distance_correlation(images, sent)


class Adversarial(Trained):
    """adversarial: weight of the reconstruction error of a decoder trained alongside, in alternation, that the
    device's half is trained to raise (the ResSFL / adversarial-representation recipe)"""
    name, flag = 'adversarial', 'adversarial_weight'

    def privacy_term(self, cfg, shape, device):
        return SimulatedAttacker(cfg, shape, device, cfg[self.flag])


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
                                Bottleneck())}
SPARSIFYING = tuple(name for name, d in DEFENCES.items() if isinstance(d, Sparsifying))
FIXED_KEYS = tuple(dict.fromkeys(key for d in DEFENCES.values() for key in d.keys))
TRAINED = tuple(name for name, d in DEFENCES.items() if d.trained)


def add_arguments(parser):
    fixed = parser.add_argument_group('defences (on the device, before the tensor is sent)')
    fixed.add_argument('--defence', choices=('none',) + SPARSIFYING, default='none',
                       help='dropout: zero each element with probability --defence_p (survivors scaled by 1/(1-p)); '
                            'topk: keep the --defence_k largest-magnitude elements of each sample')
    trained = parser.add_argument_group('defence training (--defend KIND writes a defended victim for --weights)')
    trained.add_argument('--defend', choices=TRAINED,
                         help='fine-tune the victim into a defended one (a mode of its own); each kind\'s strength is '
                              'its flag below')
    for defence in DEFENCES.values():
        defence.add_arguments(trained if defence.trained else fixed)
    trained.add_argument('--defend_epochs', type=int, default=10, help='epochs of defence training')
    trained.add_argument('--defend_lr', type=float, default=1e-4, help='Adam learning rate of defence training')
    trained.add_argument('--defend_server', action='store_true',
                         help="fine-tune the server's half too (a real deployment retrains both)")


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
    if cfg['defend_epochs'] < 1:
        raise UsageError(f'argument --defend_epochs: must be at least 1, got {cfg["defend_epochs"]}')
    if cfg['defend_lr'] <= 0:
        raise UsageError(f'argument --defend_lr: must be positive, got {cfg["defend_lr"]:g}')


def describe(cfg):
    """The defences on the sent tensor, for titles and tables: those the flags switch on, and a defended
    victim's training (recorded when its file was loaded)."""
    return [d.describe(cfg) for d, _ in active(cfg) if not d.trained] + (
        [cfg['victim_defence']] if cfg.get('victim_defence') else [])


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
    return {**cfg, 'aug': False, 'test_noise': False, 'keep_channels': None, 'defence': 'none', 'defend': None}


def build_attack(cfg, device, calibration_images=None):
    """Victim, decoder and defences as the configuration describes them; decoder initialised from cfg['seed'].
    What the run derives is written into cfg: the channels kept, the victim's fingerprint and, for a defended
    victim, its defence."""
    victim = build_victim(cfg['arch'], cfg['split'], cfg['pretrained'], cfg['weights'], cfg['seed'])
    expected = cfg.get('victim_fingerprint')
    if expected is not None and not math.isclose(victim.fingerprint(), expected, rel_tol=1e-6):
        raise UsageError('the victim rebuilt from the checkpoint\'s settings (arch, --use_pretrained/--weights, seed) '
                         'is not the one this decoder was trained against; pass the same victim weights')
    torch.manual_seed(cfg['seed'])
    shape = feature_shape(victim, cfg['image_size'])
    decoder = build_decoder(shape, cfg['image_size'], DecoderSpec.from_config(cfg))
    attack = SplitAttack(victim, decoder, device, bf16=cfg['precision'] == 'bf16', compile=cfg.get('compile', False))
    attack.feature_shape, cfg['sent_shape'] = shape, list(shape)
    for defence, _ in active(cfg):
        defence.apply(attack, cfg, calibration_images)
    if victim.defended is not None:
        reference = victim.defended['reference']
        attack.reference = build_victim(cfg['arch'], cfg['split'], reference['pretrained'], reference['weights'],
                                        reference['seed']).to(device)
        cfg['victim_defence'] = victim.defended['label']
    return attack


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


class SimulatedAttacker:
    """The decoder the adversarial defence trains against (the original work's, light, for speed): one attacker
    step on the detached tensor, then the device's term, minus the weighted reconstruction error of the updated
    attacker."""

    def __init__(self, cfg, shape, device, weight):
        torch.manual_seed(cfg['seed'])
        self.decoder = build_decoder(shape, cfg['image_size'], DecoderSpec(depth='light')).to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=1e-3)
        self.weight = weight

    def __call__(self, images, sent):
        loss = F.mse_loss(self.decoder(sent.detach()), images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return -self.weight * F.mse_loss(self.decoder(sent), images)

    @torch.no_grad()
    def psnr(self, images, sent):
        """Per image: its own reconstruction's PSNR (not a privacy measure: the defence was trained against it)."""
        self.decoder.eval()
        mse = (self.decoder(sent) - images).pow(2).flatten(1).mean(1)
        self.decoder.train()
        return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def trainable_victim(cfg):
    """A copy of the victim to fine-tune (gradients to the device's half, and the server's with --defend_server)
    and its frozen original, the reference for agreement."""
    reference = build_victim(cfg['arch'], cfg['split'], cfg['pretrained'], cfg['weights'], cfg['seed'])
    if reference.defended is not None:
        raise UsageError(f'--weights {cfg["weights"]} is already a defended victim; defend the original instead')
    net = load_network(cfg['arch'], cfg['pretrained'], cfg['weights'], cfg['seed'])[0]
    student = SplitVictim(*cut(net, cfg['arch'], cfg['split']), frozen=False)
    student.tail.requires_grad_(cfg['defend_server'])
    return net, student, reference


def parameter_groups(student, net, lr):
    """The victim's own weights (`net`'s) at --defend_lr; layers the defence adds, new, at 10x."""
    inherited = {id(p) for p in net.parameters()}
    trainable = [p for p in student.parameters() if p.requires_grad]
    return [{'params': [p for p in trainable if id(p) in inherited], 'lr': lr},
            {'params': [p for p in trainable if id(p) not in inherited], 'lr': 10 * lr}]


def kl_to_reference(logits, reference_logits):
    """KL(original || defended) per batch, in nats: the distillation term, with no labels needed."""
    return F.kl_div(logits.log_softmax(1), reference_logits.log_softmax(1), log_target=True, reduction='batchmean')


def defence_epoch(student, reference, term, optimizer, splits, cfg, device, generator, desc='defence training'):
    """One pass over the training split in full batches; the mean distillation and privacy losses."""
    order = splits.train_idx[torch.randperm(len(splits.train_idx), generator=generator)]
    starts = full_batches(len(order), cfg['batch_size'])
    totals = torch.zeros(2, device=device)  # summed on the device: no host sync per step
    for start in progress(starts, desc=desc):
        images = splits.images[order[start:start + cfg['batch_size']]].to(device).float() / 255
        with torch.no_grad():
            target = reference.classify(reference.encode(images))
        sent = student.encode(images)
        kl = kl_to_reference(student.classify(sent), target)
        privacy = term(images, sent) if term is not None else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        (kl + privacy).backward()
        optimizer.step()
        totals += torch.stack([kl.detach(), privacy.detach()])
    kl, privacy = (totals / len(starts)).tolist()
    return {'kl': kl, 'privacy': privacy}


def victim_agreement(clean_logits, defended_logits):
    """Per image: does the defended victim still predict the undefended top-1 class (at top-1, within its top-5),
    and KL(undefended || defended) between the two output distributions, in nats."""
    reference = clean_logits.argmax(1, keepdim=True)
    top5 = defended_logits.topk(min(5, defended_logits.shape[1]), dim=1).indices
    kl = F.kl_div(defended_logits.log_softmax(1), clean_logits.log_softmax(1), log_target=True, reduction='none')
    return {'top1_agreement': (defended_logits.argmax(1, keepdim=True) == reference).float().squeeze(1),
            'top5_agreement': (top5 == reference).any(1).float(), 'kl': kl.sum(1)}


@torch.no_grad()
def held_out_utility(student, reference, splits, cfg, device, attacker=None):
    """Means over the held-out images: the defended victim's agreement with the original, the distance
    correlation between those images and the tensor it sends (batch by batch), and the PSNR of the adversarial
    defence's own `attacker` where given."""
    measured = {}
    for start in range(0, len(splits.val_idx), cfg['batch_size']):
        images = splits.images[splits.val_idx[start:start + cfg['batch_size']]].to(device).float() / 255
        sent = student.encode(images)
        scores = victim_agreement(reference.classify(reference.encode(images)), student.classify(sent))
        scores['distance_correlation'] = distance_correlation(images, sent).expand(len(images))
        if attacker is not None:
            scores['simulated_attacker_psnr'] = attacker.psnr(images, sent)
        for name, values in scores.items():
            measured.setdefault(name, []).append(values.cpu())
    return {name: torch.cat(values).mean().item() for name, values in measured.items()}


def defended_record(cfg, defence, net, student):
    """What --weights loads: the fine-tuned network, any bottleneck, and what was done (with the original victim,
    the reference its predictions are charged against)."""
    narrow = student.encoder[1] if defence.name == 'bottleneck' else None
    return {'format': DEFENDED_FORMAT, 'arch': cfg['arch'], 'split': cfg['split'], 'state_dict': net.state_dict(),
            'bottleneck': None if narrow is None else {
                'channels': narrow.in_channels, 'narrow': narrow.out_channels, 'squeeze': narrow.state_dict(),
                'expand': student.tail[0].state_dict()},
            'kind': defence.name, 'strength': cfg[defence.flag], 'label': f'trained defence: {defence.describe(cfg)}',
            'reference': {'pretrained': cfg['pretrained'], 'seed': cfg['seed'],
                          'weights': os.path.abspath(cfg['weights']) if cfg['weights'] else None}}


def train_defence(cfg, device):
    """--defend KIND: fine-tune the victim with the defence's privacy term beside distillation to the original,
    then write defended_victim.pth (for --weights) and defence.json (settings, per-epoch losses, held-out
    utility, time). Its privacy is measured by attacking it afresh, never by its own simulated attacker."""
    defence = DEFENCES[cfg['defend']]
    splits = load_splits(cfg)
    net, student, reference = trainable_victim(cfg)
    reference, student = reference.to(device), student.to(device)
    calibration = student.encode(splits.images[splits.train_idx[:256]].to(device).float() / 255).detach()
    student = defence.prepare(student, cfg[defence.flag], calibration)
    shape = tuple(student.encode(torch.zeros(1, 3, cfg['image_size'], cfg['image_size'], device=device)).shape[1:])
    term = defence.privacy_term(cfg, shape, device)
    optimizer = torch.optim.Adam(parameter_groups(student, net, cfg['defend_lr']))
    generator, history, started = torch.Generator().manual_seed(cfg['seed']), [], time.perf_counter()
    before = held_out_utility(student, reference, splits, cfg, device)
    for epoch in range(1, cfg['defend_epochs'] + 1):
        losses = defence_epoch(student, reference, term, optimizer, splits, cfg, device, generator,
                               f'{defence.name} defence, epoch {epoch}/{cfg["defend_epochs"]}')
        history.append({'epoch': epoch, **losses, 'seconds': time.perf_counter() - started})
    after = held_out_utility(student, reference, splits, cfg, device,
                             term if isinstance(term, SimulatedAttacker) else None)
    os.makedirs(cfg['save_dir'], exist_ok=True)
    path = os.path.join(cfg['save_dir'], DEFENDED_FILE)
    save_torch(defended_record(cfg, defence, net, student), path)
    record = {'defence': defence.describe(cfg), 'sent_shape': list(shape), 'minutes': history[-1]['seconds'] / 60,
              'held_out': {'before': before, 'after': after, 'data': splits.description}, 'history': history,
              'config': cfg, 'weights': path}
    if isinstance(term, SimulatedAttacker):
        record['simulated_attacker_note'] = ('held_out.after.simulated_attacker_psnr is the decoder it was trained '
                                             'against: not a privacy measure; attack the defended victim afresh')
    save_json(record, os.path.join(cfg['save_dir'], DEFENCE_RECORD))
    print(f'{defence.describe(cfg)}: {cfg["defend_epochs"]} epochs in {record["minutes"]:.1f} min; held-out top-1 '
          f'agreement with the original {after["top1_agreement"]:.3f}, KL {after["kl"]:.4f} nats, distance '
          f'correlation {before["distance_correlation"]:.3f} -> {after["distance_correlation"]:.3f}')
    print(f'defended victim: {path}; attack it with --train --arch {cfg["arch"]} --split {cfg["split"]} '
          f'--weights {path}')
    return record
