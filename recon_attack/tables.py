"""What every table shares: a result's row and Markdown cells, the mean and spread over seeds, the paired comparison
that alone calls a difference real, and the line that says where the records behind a table were made."""
import math

import torch
from scipy import stats

from .metrics import PERCEPTUAL, UTILITY
from .models.cuts import probe_feature_shape
from .models.layouts import layout_of


def provenance_note(records):
    """Where and with what the records (eval or defence json) behind a table were made: each machine, arithmetic,
    library version and commit among them, and the span of their times."""
    made = [r['provenance'] for r in records if r.get('provenance')]
    missing = '' if len(made) == len(records) else (
        f' ({len(records) - len(made)} of {len(records)} records do not say: written before the tool recorded it)')
    if not made:
        return 'Made on: not recorded' + missing

    def each(values):
        return ' / '.join(sorted(set(values)))
    times = sorted(m['time'] for m in made)
    span = times[0] if times[0] == times[-1] else f'{times[0]} to {times[-1]}'
    arithmetic = each(r['precision'] for r in records if r.get('precision'))
    return (f'Made on: {each(m["machine"] for m in made)}' + (f'; arithmetic {arithmetic}' if arithmetic else '')
            + f'; {each(m["torch"] for m in made)}; commit {each(m["commit"] for m in made)}; {span}{missing}')


def result_columns(result):
    """An eval{_attack}.json's figures as a table row: how long its decoder trained (None where the evaluation
    predates that record), each metric's mean, the PSNR's std, the images scored."""
    means = {name: stats['mean'] for name, stats in result['metrics'].items()}
    training = result.get('training', {})
    return {'epochs': training.get('epochs'), 'train_minutes': training.get('minutes'),
            'psnr': means['psnr'], 'psnr_std': result['metrics']['psnr']['std'],
            'psnr_ceiling': means.get('psnr_ceiling'), 'unbounded': isinstance(result.get('bound'), str),
            'ssim': means['ssim'],
            'ms_ssim': means['ms_ssim'], 'lpips': means.get(PERCEPTUAL), 'mse': means['mse'],
            **{name: means.get(name) for name in UTILITY}, 'n_images': result['n_images']}


RESULT_HEADER = ('epochs | training (min) | PSNR (dB) | unbiased ceiling (dB, dFIL) | SSIM | MS-SSIM | LPIPS | '
                 'top-1 agreement | top-5 agreement | KL (nats)')
RESULT_FORMATS = {'epochs': '{:.3g}', 'train_minutes': '{:.1f}', 'ssim': '{:.3f}', 'ms_ssim': '{:.3f}', 'lpips': '{:.3f}',
                  'top1_agreement': '{:.3f}', 'top5_agreement': '{:.3f}', 'kl': '{:.4f}'}


def result_cells(row):
    """The Markdown cells of RESULT_HEADER for a row of `result_columns` ('—' for what was not measured)."""
    cells = {k: '—' if row[k] is None else form.format(row[k]) for k, form in RESULT_FORMATS.items()}
    return ' | '.join([cells['epochs'], cells['train_minutes'], f'{row["psnr"]:.2f} ± {row["psnr_std"]:.2f}',
                       ceiling_cell(row), *(cells[k] for k in ('ssim', 'ms_ssim', 'lpips', *UTILITY))])


def ceiling_cell(row):
    """The unbiased-attacker ceiling: a number only where the sent tensor carries noise the bound covers."""
    if row['psnr_ceiling'] is not None:
        return f'{row["psnr_ceiling"]:.2f}'
    return 'no bound' if row['unbounded'] else '—'  # '—': an evaluation from before the bound was recorded


SEEDS_HEADER = ('seeds | epochs | training (min) | PSNR (dB, mean ± spread over seeds) | per-image PSNR std | '
                'unbiased ceiling (dB, dFIL) | SSIM | MS-SSIM | LPIPS | top-1 agreement | top-5 agreement | KL (nats)')
CONFIDENCE = 0.95  # of the paired interval over seeds that decides "better"


def over_seeds(results):
    """One row from evaluations of one setting at several seeds (the same held-out images): each figure's mean over
    the seeds, the spread of the PSNR over the seeds (std of the per-seed means), its per-image std (the mean over
    seeds), and the PSNR of each seed (to pair with another setting's)."""
    rows = [result_columns(r) for r in results]
    psnr_by_seed = {r['config']['seed']: row['psnr'] for r, row in zip(results, rows)}
    means = {key: None if any(row[key] is None for row in rows) else sum(row[key] for row in rows) / len(rows)
             for key in rows[0]}
    means['unbounded'] = all(row['unbounded'] for row in rows)
    values = torch.tensor(list(psnr_by_seed.values()), dtype=torch.float64)
    return {**means, 'psnr_seed_std': values.std().item() if len(values) > 1 else 0.0, 'n_seeds': len(rows),
            'psnr_by_seed': psnr_by_seed}


def seed_cells(row):
    """The Markdown cells of SEEDS_HEADER for a row of `over_seeds`."""
    cells = result_cells(row).split(' | ')
    return ' | '.join([str(row['n_seeds']), *cells[:2], f'{row["psnr"]:.2f} ± {row["psnr_seed_std"]:.2f}',
                       f'{row["psnr_std"]:.2f}', *cells[3:]])


def paired_difference(baseline, other):
    """How `other`'s PSNR differs from `baseline`'s (rows of `over_seeds`), paired by seed: the mean difference over
    the seeds both have, its CONFIDENCE t interval, and the verdict, which names a setting higher or lower only
    where the interval excludes 0."""
    seeds = sorted(set(baseline['psnr_by_seed']) & set(other['psnr_by_seed']))
    differences = torch.tensor([other['psnr_by_seed'][s] - baseline['psnr_by_seed'][s] for s in seeds],
                               dtype=torch.float64)
    if len(differences) < 2:
        return {'seeds': len(seeds), 'difference': differences.mean().item() if len(seeds) else None,
                'low': None, 'high': None, 'verdict': 'fewer than two shared seeds: no verdict'}
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(seeds) - 1) * differences.std().item() / math.sqrt(len(seeds))
    mean = differences.mean().item()
    verdict = ('no measurable difference' if mean - half <= 0 <= mean + half else
               f'{"higher" if mean > 0 else "lower"} PSNR (the attack leaks {"more" if mean > 0 else "less"})')
    return {'seeds': len(seeds), 'difference': mean, 'low': mean - half, 'high': mean + half, 'verdict': verdict}


def against_first(rows, held_out=lambda row: None, first_text=lambda row: '—'):
    """row['against_first'] for rows of `over_seeds`: the PSNR difference from the first row scored on the same
    held-out images (`held_out(row)` names them), paired by seed; `first_text(row)` for those first rows."""
    for row in rows:
        first = next(r for r in rows if held_out(r) == held_out(row))
        row['against_first'] = first_text(row) if row is first else difference_text(paired_difference(first, row))


def difference_text(difference):
    if difference['low'] is None:
        return difference['verdict']
    return (f'{difference["difference"]:+.2f} dB [{difference["low"]:+.2f}, {difference["high"]:+.2f}] over '
            f'{difference["seeds"]} seeds: {difference["verdict"]}')


def tensor_columns(config, derived):
    """The sent tensor's shape and how many of its channels are sent (of a vector: its values), from a run's
    configuration and what it derived."""
    shape = derived.sent_shape or probe_feature_shape(config.victim, config.data.image_size)
    channels = layout_of(tuple(shape)).channels(tuple(shape)) or shape[0]
    return {'tensor': 'x'.join(map(str, shape)),
            'channels_sent': len(derived.channel_indices) if derived.channel_indices else channels}
