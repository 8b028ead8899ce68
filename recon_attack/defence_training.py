"""--train_defence: the victim fine-tuned into a defended one (distillation to the original beside the defence's
privacy term), written as a file --weights loads, with the record of what it cost the victim."""
import copy
import os
import time

import torch
import torch.nn.functional as F

from .attacks import SplitAttack
from .config import AttackPlan
from .data import full_batches, load_splits
from .defences import (DEFENCE_RECORD, DEFENCES, DEFENDED_FILE, TRAINING_FLAGS, SimulatedAttacker,
                       distance_correlation)
from .bound import centred_power, fisher_ceilings
from .evaluate import evaluate
from .metrics import UTILITY
from .models.cuts import cut
from .models.victims import DEFENDED_FORMAT, SplitVictim, feature_shape, load_network, normalisation
from .records import to_record
from .stopping import Plateau, stopping_note
from .utils import UsageError, progress, provenance, save_json, save_torch, to_unit
from .visualize import live_curves, plot_defence_history


def trainable_victim(victim, image_size, server=False):
    """A copy of the victim a config.VictimConfig describes, to fine-tune (gradients to the device's half, and the
    server's with `server`), its frozen original (the reference for agreement), and the whole network the copy
    shares its weights with."""
    net, record = load_network(victim, image_size)
    if record is not None:
        raise UsageError(f'--weights {victim.weights} is already a defended victim; defend the original instead')
    mean, std = normalisation(victim.normalize)
    reference = SplitVictim(*cut(copy.deepcopy(net), victim, image_size), mean=mean, std=std)
    student = SplitVictim(*cut(net, victim, image_size), frozen=False, mean=mean, std=std)
    student.tail.requires_grad_(server)
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


def defence_epoch(student, reference, term, optimizer, splits, batch_size, device, generator,
                  desc='defence training'):
    """One pass over the training split in full batches; the mean distillation and privacy losses."""
    order = splits.train_idx[torch.randperm(len(splits.train_idx), generator=generator)]
    starts = full_batches(len(order), batch_size)
    totals = torch.zeros(2, device=device)  # summed on the device: no host sync per step
    for start in progress(starts, desc=desc):
        images = to_unit(splits.images[order[start:start + batch_size]].to(device))
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


def batch_dependence(images, sent, positions, recon):
    """The distance correlation between a batch of images and the tensor sent for them, for each image."""
    return {'distance_correlation': distance_correlation(images, sent).expand(len(images))}


def held_out_utility(student, reference, splits, batch_size, device, bf16, attacker=None):
    """Means over the held-out images, measured by the evaluation every attack gets (the same precision, the same
    path): the defended victim's agreement with the original, the distance correlation between those images and
    the tensor it sends (batch by batch), and the PSNR of the adversarial defence's own `attacker` where given."""
    measured_by = SplitAttack(student, attacker.decoder if attacker else None, device, bf16)
    measured_by.charge_against(reference)
    measured = evaluate(measured_by, splits.images, splits.val_idx, batch_size, desc='held-out utility',
                        utility=True, plan=AttackPlan() if attacker else None, measures=[batch_dependence])
    if attacker is not None:  # the decoder it was trained against: kept apart, under a name of its own
        measured = {**{k: measured[k] for k in (*UTILITY, 'distance_correlation')},
                    'simulated_attacker_psnr': measured['psnr']}
    return {name: values.mean().item() for name, values in measured.items()}


FISHER_IMAGES = 256  # held-out images the Fisher ceilings are measured on (the first ones)


@torch.no_grad()
def held_out_fisher(student, reference, splits, device, probes, batch_size):
    """The unbiased ceiling (dB, mean over held-out images, Hutchinson with `probes` probes) of the original and
    the defended victim under two noise models: relative (noise at each one's own centred power on calibration
    training images: 0 dB SNR, what --noise_snr scales) and absolute (noise at the original's variance, fixed)."""
    calibration = to_unit(splits.calibration_images(FISHER_IMAGES).to(device))
    power = {name: centred_power(victim.encode(calibration).double()).item()
             for name, victim in (('original', reference), ('defended', student))}
    held_out = splits.val_idx[:FISHER_IMAGES]

    def ceiling(victim, variance):
        return torch.cat([fisher_ceilings(victim.encode, to_unit(splits.images[held_out[i:i + batch_size]].to(device)),
                                          variance, probes, first=i)
                          for i in range(0, len(held_out), batch_size)]).mean().item()
    original = ceiling(reference, power['original'])
    return {'original_db': original, 'relative_db': ceiling(student, power['defended']),
            'absolute_db': ceiling(student, power['original']), 'centred_power': power, 'images': len(held_out),
            'probes': probes, 'what': 'mean unbiased ceiling (dFIL) on held-out images at 0 dB SNR: relative_db at '
                                      'noise of the defended tensor\'s own centred power, absolute_db at the '
                                      'original\'s (a fixed variance); lower is less Fisher information'}


def defended_record(victim, defence_config, defence, net, student, splits):
    """What --weights loads: the fine-tuned network, any bottleneck, and what was done (the defence and defence
    training's settings, the images it was fine-tuned on, and the original victim (a config.VictimConfig), the
    reference its predictions are charged against)."""
    narrow = student.encoder[1] if defence.name == 'bottleneck' else None
    strength = defence.strength(defence_config, None)
    training = {'defend_epochs': defence_config.epochs, 'defend_lr': defence_config.lr,
                'defend_server': defence_config.server}
    return {'format': DEFENDED_FORMAT, 'arch': victim.arch, 'split': victim.split, 'state_dict': net.state_dict(),
            'bottleneck': None if narrow is None else {
                'channels': narrow.in_channels, 'narrow': narrow.out_channels, 'squeeze': narrow.state_dict(),
                'expand': student.tail[0].state_dict()},
            'kind': defence.name, 'strength': strength, 'label': f'trained defence: {defence.describe(strength)}',
            'training': {key: training[key] for key in TRAINING_FLAGS}, 'data': splits.record(),
            'reference': {'pretrained': victim.pretrained, 'seed': victim.seed,
                          'weights': os.path.abspath(victim.weights) if victim.weights else None}}


def train_defence(config, device):
    """--train_defence KIND (config: a config.Config): fine-tune the victim with the defence's privacy term beside
    distillation to the original, then write defended_victim.pth (for --weights) and defence.json (settings,
    per-epoch losses, held-out utility, time). Its privacy is measured by attacking it afresh, never by its own
    simulated attacker."""
    settings, training, batch_size = config.defence, config.training, config.data.batch_size
    defence = DEFENCES[settings.train_defence]
    strength, save_dir = defence.strength(settings, None), config.outputs.save_dir
    bf16 = config.runtime.precision == 'bf16'
    splits = load_splits(config.data, weights=config.victim.weights, stopping=bool(training.stop_patience))
    net, student, reference = trainable_victim(config.victim, config.data.image_size, settings.server)
    reference, student = reference.to(device), student.to(device)
    with torch.no_grad():
        calibration = student.encode(to_unit(splits.calibration_images(256).to(device)))
    student = defence.prepare(student, strength, calibration)
    shape = feature_shape(student, config.data.image_size)
    term = defence.privacy_term(strength, student, reference, shape, training.seed, config.data.image_size)
    optimizer = torch.optim.Adam(parameter_groups(student, net, settings.lr))
    before = held_out_utility(student, reference, splits, batch_size, device, bf16)
    generator, history, started = torch.Generator().manual_seed(training.seed), [], time.perf_counter()
    plateau = Plateau(training.stop_patience, training.stop_delta, 'objective', rising=False, relative=True)
    with live_curves(config, to_record(config)) as curves:
        for epoch in range(1, settings.epochs + 1):
            losses = defence_epoch(student, reference, term, optimizer, splits, batch_size, device, generator,
                                   f'{defence.name} defence, epoch {epoch}/{settings.epochs}')
            history.append({'epoch': epoch, **losses, 'objective': losses['kl'] + losses['privacy'],
                            'seconds': time.perf_counter() - started})
            plateau.update(history[-1])
            if curves is not None:
                curves.log(epoch, {f'defence/{name}': value for name, value in losses.items()})
            if plateau.reached(epoch):
                break
    simulated = term if isinstance(term, SimulatedAttacker) else None
    after = held_out_utility(student, reference, splits, batch_size, device, bf16, simulated)
    fisher = held_out_fisher(student, reference, splits, device, config.noise.probes, batch_size)
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, DEFENDED_FILE)
    save_torch(defended_record(config.victim, settings, defence, net, student, splits), path)
    label = defence.describe(strength)
    record = {'defence': label, 'sent_shape': list(shape), 'minutes': history[-1]['seconds'] / 60,
              'held_out': {'before': before, 'after': after, 'data': splits.description}, 'fisher': fisher,
              'history': history,
              'config': to_record(config), 'weights': path, 'provenance': provenance(device),
              'precision': SplitAttack(student, None, device, bf16).precision}
    if plateau.patience:
        record['stopping'] = plateau.record(len(history), settings.epochs)
        print(stopping_note(record['stopping'], 'defence training'))
    plot_defence_history(history, label, os.path.join(save_dir, 'defence.png'))
    if simulated is not None:
        record['simulated_attacker_note'] = ('held_out.after.simulated_attacker_psnr is the decoder it was trained '
                                             'against: not a privacy measure; attack the defended victim afresh')
    save_json(record, os.path.join(save_dir, DEFENCE_RECORD))
    print(f'{label}: {len(history)} epochs in {record["minutes"]:.1f} min; held-out top-1 agreement with the '
          f'original {after["top1_agreement"]:.3f}, KL {after["kl"]:.4f} nats, distance correlation '
          f'{before["distance_correlation"]:.3f} -> {after["distance_correlation"]:.3f}')
    print(f'unbiased ceiling on {fisher["images"]} held-out images at 0 dB SNR: original {fisher["original_db"]:.2f} '
          f'dB; defended {fisher["relative_db"]:.2f} dB (noise at its own centred power), {fisher["absolute_db"]:.2f} '
          'dB (at the original\'s noise variance)')
    victim = f'--victim {config.victim.model}' if config.victim.model else f'--arch {config.victim.arch}'
    print(f'defended victim: {path}; attack it with --train {victim} --split {config.victim.split} --weights {path}')
    return record
