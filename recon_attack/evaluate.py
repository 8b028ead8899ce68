"""The evaluation of an attack: every held-out image's reconstruction scored from the tensor the device sent (the
same tensor for every attack), the victim's utility under the defences, the bound beside it, and the record of it
all (eval{_attack}.json and its per-image CSV)."""
import dataclasses
import os

import torch

from .attacks import attacker_name, received, recover
from .bound import Bound
from .config import AttackPlan
from .defences import active
from .metrics import (METRICS, format_summary, format_utility, load_lpips, msssim_note, score, summarise,
                      victim_agreement)
from .records import to_record
from .stopping import training_record
from .utils import progress, provenance, save_csv, save_json, to_unit


@torch.no_grad()
def evaluate(attack, images, indices, batch_size, noise=None, desc='evaluating', utility=False, plan=AttackPlan(),
             perceptual=None, first=0, measures=()):
    """Per-image metrics (CPU tensors) of the attack's reconstructions of images[indices] (none with plan None);
    with `utility`, also the victim's agreement between what the device sends and the undefended tensor; LPIPS
    with `perceptual`; each of `measures(images, sent, positions, recon)`: more per-image figures (a dict) from
    each batch. `noise`: the device's test noise (a config.Noise); `first`: the position of images[indices[0]]
    among the images scored (a slice of them under torchrun)."""
    if attack.decoder is not None:
        attack.decoder.eval()
    results = {}
    for start in progress(range(0, len(indices), batch_size), desc=desc):
        target = attack.to_images(images[indices[start:start + batch_size]])
        positions = range(first + start, first + start + len(target))
        encoded, sent = received(attack, target, positions, noise)
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
    """The attack's name in file names: '' for the decoder (eval.json), '_optimize', '_decoder_optimize'."""
    return '' if kind == 'decoder' else '_' + kind.replace('+', '_')


def evaluation_file(kind):
    """The name of the json an evaluation of attack `kind` writes into its folder (the per-image CSV beside it)."""
    return f'eval{attack_slug(kind)}.json'


def evaluated_plans(plan):
    """The attacks a decoder's training run evaluates: the decoder alone, then the attack `plan` (a
    config.AttackPlan) where it is another (each into its own evaluation_file)."""
    return [AttackPlan()] + ([plan] if plan.kind != 'decoder' else [])


def write_evaluation(per_image, names, extra, save_dir, kind):
    """The evaluation_file of attack `kind` (means, stds, settings) and the per-image CSV beside it
    (eval{_attack}_per_image.csv); returns the summary."""
    summary = summarise(per_image)
    path = os.path.join(save_dir, evaluation_file(kind))
    save_json({**extra, 'n_images': len(names), 'metrics': summary}, path)
    rows = [{'image': n, **{m: f'{per_image[m][i].item():.6g}' for m in per_image}} for i, n in enumerate(names)]
    save_csv(rows, path.removesuffix('.json') + '_per_image.csv')
    return summary


def mean_image_baseline(splits, scored=None, batch_size=256):
    """Per-image metrics of the trivial attack that always answers the mean training image, on the held-out images
    (or `scored`, uint8 images)."""
    mean = torch.zeros(splits.images.shape[1:], dtype=torch.float64)
    for start in range(0, len(splits.train_idx), batch_size):
        mean += splits.images[splits.train_idx[start:start + batch_size]].double().sum(0)
    mean = to_unit(mean / len(splits.train_idx))
    images, indices = (splits.images, splits.val_idx) if scored is None else (scored, torch.arange(len(scored)))
    results = {m: [] for m in METRICS}
    for start in range(0, len(indices), batch_size):
        target = to_unit(images[indices[start:start + batch_size]])
        for name, values in score(mean.expand_as(target), target).items():
            results[name].append(values)
    return {m: torch.cat(v) for m, v in results.items()}


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
                        measures=()):
    """The full evaluation (quality and victim utility) of the Scored images by the attack `plan`, printed and
    written into the run's folder as eval{_attack}.json and eval{_attack}_per_image.csv with the run's record
    (config.Config and config.Derived); `history`: the training history of the decoder used; `bound`: the Bound of
    these images where another attack on them already has one; `measures`: more per-batch hooks, as `evaluate`
    takes. Returns (per-image figures, summary)."""
    noise = derived.noise(config.noise).testing()
    bound = bound or Bound(attack, noise, config.noise.probes)
    charged = utility_charged(config, derived)
    per_image = evaluate(attack, scored.images, scored.indices, config.data.batch_size, noise, utility=charged,
                         plan=plan, perceptual=load_lpips(attack.device),
                         measures=[*measures, *([bound] if bound.missing is None else [])])
    attacker = attacker_name(plan.kind, config.decoder, config.training.feature_weight)
    trained_for = () if plan.kind == 'optimize' else history
    settings = {**(extra or {}), 'attack': dataclasses.asdict(plan), 'attacker': attacker,
                'precision': attack.precision, 'provenance': provenance(attack.device), 'bound': bound.record(),
                'training': training_record(trained_for, config.training, derived.epochs(config.training)),
                'data': scored.description, 'held_out': scored.fingerprint,
                'msssim': msssim_note(config.data.image_size), 'utility': utility_note(config, derived),
                'config': to_record(config, derived)}
    summary = write_evaluation(per_image, scored.names, settings, config.outputs.save_dir, plan.kind)
    print(f'{plan.kind} attack ({attacker}) on {len(scored.names)} images: {format_summary(summary)}')
    print(bound.line(summary, per_image))
    if charged:
        print(format_utility(summary))
    print(f'{utility_note(config, derived)}\n{msssim_note(config.data.image_size)}')
    return per_image, summary
