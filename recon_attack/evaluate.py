"""The evaluation of an attack: every held-out image's reconstruction scored from the tensor the device sent (the
same tensor for every attack), the victim's utility under the defences, the bound beside it, and the record of it
all (eval{_attack}.json and its per-image CSV)."""
import dataclasses
import os

import torch

from .attacks import attacker_name, received, recover
from .bound import Bound, no_bound
from .config import AttackPlan
from .defences import active
from .models.decoders import build_decoder
from .prior import prior_fisher
from .metrics import (METRICS, format_summary, format_utility, load_lpips, msssim_note, score, summarise,
                      victim_agreement)
from .records import to_record
from .stopping import training_record
from .utils import progress, provenance, save_csv, save_json, to_unit
from .worst_case import ALL, NOTE as WORST_CASE_NOTE, attacks_in, run_all, shares, split_attacks


@torch.no_grad()
def evaluate(attack, images, indices, batch_size, noise=None, desc='evaluating', utility=False, plan=AttackPlan(),
             perceptual=None, first=0, measures=()):
    """Per-image metrics (CPU tensors) of the attack's reconstructions of images[indices] (none with plan None);
    with `utility`, also the victim's agreement between what the device sends and the undefended tensor; LPIPS
    with `perceptual`; each of `measures(images, sent, positions, recon)`: more per-image figures (a dict) from
    each batch (`recon`: for --attack all, {row label: images}, worst_case.run_all). `noise`: the device's test
    noise (a config.Noise); `first`: the position of images[indices[0]] among the images scored (a slice of them
    under torchrun)."""
    if attack.decoder is not None:
        attack.decoder.eval()
    results = {}
    for start in progress(range(0, len(indices), batch_size), desc=desc):
        target = attack.to_images(images[indices[start:start + batch_size]])
        positions = range(first + start, first + start + len(target))
        encoded, sent = received(attack, target, positions, noise)
        if plan is not None and plan.kind == ALL:  # recon: each attack's images, the worst case's, the pick's
            measured, recon = run_all(attack, sent, plan, target, perceptual)
        else:
            recon = None if plan is None else recover(attack, sent, plan, target.shape)
            measured = {} if recon is None else score(recon, target, perceptual)
        if utility:  # against the undefended tensor: what was encoded, unless the input itself was noised
            undefended = attack.encode(target) if noise is not None and noise.at == 'input' else encoded
            measured.update(victim_agreement(attack.undefended_logits(target, undefended), attack.classify(sent)))
        for measure in measures:
            measured.update(measure(target, sent, positions, recon))
        for name, values in measured.items():
            results.setdefault(name, []).append(values.cpu())
    return {m: torch.cat(v) for m, v in results.items()}


def attack_slug(kind):
    """The attack's name in file names: '' for the decoder (eval.json), '_optimize', '_decoder_optimize', '_all'."""
    return '' if kind == 'decoder' else '_' + kind.replace('+', '_')


def evaluation_file(kind):
    """The name of the json an evaluation of attack `kind` writes into its folder (the per-image CSV beside it)."""
    return f'eval{attack_slug(kind)}.json'


def evaluated_plans(plan):
    """The attacks a decoder's training run evaluates: the decoder alone, then the attack `plan` (a
    config.AttackPlan) where it is another (each into its own evaluation_file)."""
    return [AttackPlan()] + ([plan] if plan.kind != 'decoder' else [])


def write_evaluation(per_image, names, extra, save_dir, kind):
    """The evaluation_file of attack `kind` (means, stds, the baselines' and, for --attack all, each attack's apart,
    the flags, settings) and the per-image CSV beside it (eval{_attack}_per_image.csv, every column); returns the
    summary."""
    summary = summarise(per_image)
    path = os.path.join(save_dir, evaluation_file(kind))
    own, baselines = split_baselines(summary)
    own, attacks = split_attacks(own)
    save_json({**extra, 'n_images': len(names), 'metrics': own, **({'attacks': attacks} if attacks else {}),
               'baselines': baselines,
               'flags': result_flags(own['psnr']['mean'], baselines, len(names))}, path)
    rows = [{'image': n, **{m: f'{per_image[m][i].item():.6g}' for m in per_image}} for i, n in enumerate(names)]
    save_csv(rows, path.removesuffix('.json') + '_per_image.csv')
    return summary


def mean_training_image(splits, batch_size=256):
    """The mean of the attacker's training images, (3, S, S) in [0, 1]: the trivial attack every attack stands
    beside."""
    total = torch.zeros(splits.images.shape[1:], dtype=torch.float64)
    for start in range(0, len(splits.train_idx), batch_size):
        total += splits.images[splits.train_idx[start:start + batch_size]].double().sum(0)
    return to_unit(total / len(splits.train_idx)).float()


def mean_image_baseline(mean, splits, batch_size=256):
    """Per-image metrics of the trivial attack that always answers `mean` (the mean training image) on the held-out
    images of `splits`."""
    results = {m: [] for m in METRICS}
    for start in range(0, len(splits.val_idx), batch_size):
        target = to_unit(splits.images[splits.val_idx[start:start + batch_size]])
        for name, values in score(mean.expand_as(target), target).items():
            results[name].append(values)
    return {m: torch.cat(v) for m, v in results.items()}


def untrained_decoder(config, derived, device):
    """A decoder of the attacker's architecture at the weights its training started from (the attacker's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.training.seed)
        decoder = build_decoder(derived.sent_shape, config.data.image_size, config.decoder)
    return decoder.to(device, memory_format=torch.channels_last).eval()


class Baselines:
    """Two trivial attacks scored on the images and from the tensor every attack is, as one of `evaluate`'s
    measures: the mean training image (where it is known) and an untrained decoder of the attacker's architecture.
    A leak is only what an attack recovers beyond them."""

    def __init__(self, attack, config, derived, mean_image=None):
        self.mean = None if mean_image is None else mean_image.to(attack.device)
        self.untrained = attack.using(untrained_decoder(config, derived, attack.device))

    def __call__(self, images, sent, positions, recon=None):
        guesses = {'untrained_decoder': self.untrained.decode(sent)}
        if self.mean is not None:
            guesses['mean_image'] = self.mean.expand_as(images)
        scores = {name: score(guess, images) for name, guess in guesses.items()}
        return {f'{name}_{metric}': values[metric] for name, values in scores.items() for metric in ('psnr', 'ssim')}


PRIOR_IMAGES = 4096  # training images the attacker's prior is fitted on (the first ones)


def run_bound(attack, noise, training_images, seed):
    """The Bound of a run's scored images under its noise (a config.NoiseConfig, as the run derived it), with the
    attacker's prior fitted on `training_images` (uint8, the first PRIOR_IMAGES of them are used; None where they
    are not known) where the tensor carries noise."""
    test = noise.testing()
    prior = None
    if no_bound(test) is None and training_images is not None:
        prior = prior_fisher(training_images[:PRIOR_IMAGES], noise.prior_sigma, seed, attack.device)
    return Bound(attack, test, noise.probes, prior)


BASELINES = {'mean_image': 'mean training image', 'untrained_decoder': 'untrained decoder'}
MIN_IMAGES = 16  # fewer scored images say too little of how much leaks


def split_baselines(summary):
    """(the attack's summary, {baseline: {metric: summary}}) of a summary that holds the baselines' figures."""
    own = {m: v for m, v in summary.items() if not m.startswith(tuple(BASELINES))}
    baselines = {name: {metric: summary[f'{name}_{metric}'] for metric in ('psnr', 'ssim')}
                 for name in BASELINES if f'{name}_psnr' in summary}
    return own, baselines


def baseline_line(baselines):
    """The baselines' PSNR, as logs and figure titles give it."""
    return 'baselines on these images: ' + ', '.join(
        f'{BASELINES[name]} {figures["psnr"]["mean"]:.2f} dB' for name, figures in baselines.items())


def result_flags(psnr, baselines, n_images):
    """Why a result shows no leak to trust, {short name: why}: too few images, or an attack's mean PSNR within one
    per-image standard deviation of a baseline's mean (the strongest baseline's)."""
    found = {'few images': f'scored on {n_images} images, fewer than {MIN_IMAGES}'} if n_images < MIN_IMAGES else {}
    if baselines:
        name, best = max(baselines.items(), key=lambda item: item[1]['psnr']['mean'])
        if psnr <= best['psnr']['mean'] + best['psnr']['std']:
            found['within baseline'] = (f'within the spread of the {BASELINES[name]} baseline '
                                        f'({best["psnr"]["mean"]:.2f} ± {best["psnr"]["std"]:.2f} dB): no leak shown '
                                        'beyond it')
    return found


def utility_charged(config, derived):
    """False where the victim's agreement would compare a --weights victim with itself: no defence acts on its
    tensor and no original victim is named (--reference), so 1.000 would say nothing about a defended file."""
    noise = derived.noise(config.noise)
    return not (config.victim.weights and not derived.victim_defence and noise.testing() is None
                and not active(config.defence, noise))


def utility_note(config, derived):
    if derived.victim_defence:
        return ('victim utility: agreement of the defended victim\'s predictions with the original victim\'s '
                '(before defence training) on the same images (no labels needed)')
    if not utility_charged(config, derived):
        return (f'victim utility: not measured: --weights {config.victim.weights} with no defence on its tensor would '
                'be compared with itself; if the file is a defended victim, name the victim it was made from with '
                '--reference pretrained or --reference FILE')
    if not config.victim.random:
        return 'victim utility: agreement of its predictions with vs without the defence (no labels needed)'
    return 'victim utility: the victim is random-initialised, so its agreement figures are not meaningful'


def evaluate_and_report(attack, scored, config, derived, extra=None, plan=AttackPlan(), history=(), bound=None,
                        measures=(), mean_image=None):
    """The full evaluation (quality and victim utility) of the Scored images by the attack `plan`, beside the
    baselines on the same images (`mean_image`: the mean training image, where known), printed and written into the
    run's folder as eval{_attack}.json and eval{_attack}_per_image.csv with the run's record (config.Config and
    config.Derived); `history`: the training history of the decoder used; `bound`: the Bound of these images where
    another attack on them already has one; `measures`: more per-batch hooks, as `evaluate` takes. Returns
    (per-image figures, summary), the baselines' among them."""
    noise = derived.noise(config.noise).testing()
    bound = bound or Bound(attack, noise, config.noise.probes)  # the prior-aware bound needs run_bound's
    charged = utility_charged(config, derived)
    baselines = Baselines(attack, config, derived, mean_image)
    per_image = evaluate(attack, scored.images, scored.indices, config.data.batch_size, noise, utility=charged,
                         plan=plan, perceptual=load_lpips(attack.device),
                         measures=[*measures, baselines, *([bound] if bound.missing is None else [])])
    attacker = attacker_name(plan.kind, config.decoder, config.training.feature_weight)
    trained_for = () if plan.kind == 'optimize' else history
    run = attacks_in(plan.kind, attack.decoder is not None)
    settings = {**(extra or {}), 'attack': dataclasses.asdict(plan), 'attacks_run': run, 'attacker': attacker,
                'precision': attack.precision, 'provenance': provenance(attack.device),
                'bound': bound.record(summarise(per_image)),
                'training': training_record(trained_for, config.training, derived.epochs(config.training)),
                'data': scored.description, 'held_out': scored.fingerprint,
                'msssim': msssim_note(config.data.image_size), 'utility': utility_note(config, derived),
                'config': to_record(config, derived)}
    if plan.kind == ALL:
        settings.update(worst_case_note=WORST_CASE_NOTE, shares=shares(per_image, run))
    summary = write_evaluation(per_image, scored.names, settings, config.outputs.save_dir, plan.kind)
    own, found = split_baselines(summary)
    own, each = split_attacks(own)
    for kind, figures in each.items():
        print(f'  {kind}: {format_summary(figures)}')
    print(f'{plan.kind} attack ({attacker}) on {len(scored.names)} images: {format_summary(own)}')
    if plan.kind == ALL:
        print(WORST_CASE_NOTE)
    print(baseline_line(found))
    for flag in result_flags(own['psnr']['mean'], found, len(scored.names)).values():
        print(f'warning: {flag}')
    print(bound.line(summary, per_image))
    if charged:
        print(format_utility(summary))
    print(f'{utility_note(config, derived)}\n{msssim_note(config.data.image_size)}')
    return per_image, summary
