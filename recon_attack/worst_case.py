"""--attack all: every attack that applies, run on the same sent tensor, and what leaks at least: each image's worst
case over them. Picking an image's best reconstruction needs the image itself, so the worst case is an oracle over
attacks (the defender's conservative view); beside it stands the pick an attacker can make without the image (the
reconstruction whose re-encoding by the victim lies closest to the sent tensor: the victim's weights are known)."""
import dataclasses

import torch

from .attacks import SINGLE_ATTACKS, feature_error, recover
from .metrics import score

ALL = 'all'
WORST, PICKED = 'worst case', "attacker's pick"
WORST_ROW = f'{WORST} (highest PSNR)'  # the sample grid's row of each image's highest-PSNR reconstruction
LOWER_LEAKS_MORE = ('mse', 'lpips')  # every other metric is higher the more an image leaks
NOTE = ('worst case: each image\'s metric at the attack that leaks most by it, an oracle over attacks that needs '
        'the image (the defender\'s conservative view); attacker\'s pick: the reconstruction whose re-encoding by '
        'the victim lies closest to the sent tensor, which an attacker with the victim\'s weights can choose')


def attacks_in(kind, has_decoder=True):
    """The single attacks an attack `kind` runs: itself, or for 'all' each one that applies (those from a decoder's
    output only where a decoder is trained)."""
    if kind != ALL:
        return [kind]
    return [k for k in SINGLE_ATTACKS if has_decoder or not k.startswith('decoder')]


def column(kind, metric):
    """A single attack's per-image figure among the worst case's (eval_all.json, its CSV): 'optimize:psnr'."""
    return f'{kind}:{metric}'


def run_all(attack, sent, plan, target, perceptual=None):
    """Every attack of --attack all (a config.AttackPlan of kind 'all') on the same sent tensor, scored per image:
    (figures, reconstructions). Figures: each attack's under column(kind, metric), the worst case as the metrics
    themselves (each metric at its most-leaking attack), the attacker's pick under column(PICKED, metric), and
    which attack each image's highest PSNR and the pick came from (indices into attacks_in). Reconstructions:
    {row label: images} of each attack, the highest-PSNR one per image, and the pick, for the sample grid."""
    kinds = attacks_in(plan.kind, attack.decoder is not None)
    images = {k: recover(attack, sent, dataclasses.replace(plan, kind=k), target.shape) for k in kinds}
    scores = {k: score(images[k], target, perceptual) for k in kinds}
    figures = {column(k, m): v for k, s in scores.items() for m, v in s.items()}
    stacked = {m: torch.stack([scores[k][m] for k in kinds]) for m in scores[kinds[0]]}
    for metric, values in stacked.items():
        figures[metric] = values.amin(0) if metric in LOWER_LEAKS_MORE else values.amax(0)
    best = stacked['psnr'].argmax(0)
    with torch.no_grad():
        picked = torch.stack([feature_error(attack, images[k], sent) for k in kinds]).argmin(0)
    figures.update({column(PICKED, m): values.gather(0, picked[None])[0] for m, values in stacked.items()})
    figures.update({column(WORST, 'attack'): best.float(), column(PICKED, 'attack'): picked.float()})
    every = torch.stack([images[k] for k in kinds])
    rows = {**images, WORST_ROW: every[best, torch.arange(len(best))],
            PICKED: every[picked, torch.arange(len(picked))]}
    return figures, rows


def split_attacks(summary):
    """(the worst case's summary, {attack or PICKED: {metric: summary}}) of an evaluation's summary."""
    own = {m: v for m, v in summary.items() if ':' not in m}
    parts = {}
    for name, values in summary.items():
        kind, _, metric = name.partition(':')
        if metric and metric != 'attack':
            parts.setdefault(kind, {})[metric] = values
    return own, parts


def shares(per_image, kinds):
    """How often each attack gave an image's highest PSNR, and how often the attacker picked it."""
    def share(index):
        return {k: (per_image[column(index, 'attack')] == i).float().mean().item() for i, k in enumerate(kinds)}
    return {'highest_psnr': share(WORST), 'picked': share(PICKED)}
