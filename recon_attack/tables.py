"""What every table shares: a result's row and Markdown cells (the baselines and flags beside the attack), the mean
and spread over seeds, the paired comparison that alone calls a difference real (Holm-corrected across a table), and
the line that says where the records behind a table were made."""
import math

import torch
from scipy import stats

from .evaluate import BASELINES
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


def strongest_baseline(result):
    """(name, mean PSNR) of the baseline that scored highest on the evaluation's images; (None, None) where the
    evaluation predates baselines."""
    baselines = result.get('baselines') or {}
    if not baselines:
        return None, None
    name = max(baselines, key=lambda b: baselines[b]['psnr']['mean'])
    return name, baselines[name]['psnr']['mean']


def made_columns(*results):
    """Where and with what the evaluations were made, each field's distinct values joined (the CSVs' last columns;
    None where none says)."""
    def each(values):
        found = sorted({v for v in values if v})
        return ' / '.join(found) if found else None
    made = [result.get('provenance') or {} for result in results]
    return {'machine': each(m.get('machine') for m in made), 'precision': each(r.get('precision') for r in results),
            'commit': each(m.get('commit') for m in made), 'made': each(m.get('time') for m in made)}


def result_columns(result):
    """An eval{_attack}.json's figures as a table row: how long its decoder trained (None where the evaluation
    predates that record), each metric's mean, the PSNR's std, the strongest baseline's PSNR and the result's flags
    (None where the evaluation predates them), the images scored."""
    means = {name: stats['mean'] for name, stats in result['metrics'].items()}
    training = result.get('training', {})
    baseline, baseline_psnr = strongest_baseline(result)
    return {'epochs': training.get('epochs'), 'train_minutes': training.get('minutes'),
            'psnr': means['psnr'], 'psnr_std': result['metrics']['psnr']['std'],
            'baseline': baseline, 'baseline_psnr': baseline_psnr,
            'flags': None if baseline is None else ', '.join(result.get('flags', {})),
            'psnr_ceiling': means.get('psnr_ceiling'), 'unbounded': isinstance(result.get('bound'), str),
            'singular': singular(result.get('bound')), 'prior_bound': prior_bound(result.get('bound')),
            'ssim': means['ssim'],
            'ms_ssim': means['ms_ssim'], 'lpips': means.get(PERCEPTUAL), 'mse': means['mse'],
            **{name: means.get(name) for name in UTILITY}, 'n_images': result['n_images']}


RESULT_HEADER = ('epochs | training (min) | PSNR (dB) | strongest baseline PSNR (dB) | flag | '
                 'unbiased ceiling (dB, dFIL) | prior-aware bound (dB, van Trees: estimate / guaranteed) | SSIM | '
                 'MS-SSIM | LPIPS | top-1 agreement | top-5 agreement | KL (nats)')
BASELINE_NOTE = ('baselines: the mean training image and an untrained decoder of the attacker\'s architecture, scored '
                 'on the same images from the same tensor (the stronger shown); flag "within baseline": the attack\'s '
                 'mean PSNR is within one per-image std of it, no leak shown beyond it; "few images": fewer than 16 '
                 'images scored; "—": evaluated before the tool recorded baselines')
RESULT_FORMATS = {'epochs': '{:.3g}', 'train_minutes': '{:.1f}', 'ssim': '{:.3f}', 'ms_ssim': '{:.3f}',
                  'lpips': '{:.3f}',
                  'top1_agreement': '{:.3f}', 'top5_agreement': '{:.3f}', 'kl': '{:.4f}'}


def result_cells(row):
    """The Markdown cells of RESULT_HEADER for a row of `result_columns` ('—' for what was not measured)."""
    cells = {k: '—' if row[k] is None else form.format(row[k]) for k, form in RESULT_FORMATS.items()}
    return ' | '.join([cells['epochs'], cells['train_minutes'], f'{row["psnr"]:.2f} ± {row["psnr_std"]:.2f}',
                       *baseline_cells(row), ceiling_cell(row), prior_cell(row),
                       *(cells[k] for k in ('ssim', 'ms_ssim', 'lpips', *UTILITY))])


def flagged_line(rows, labels):
    """A figure title's line naming the rows each flag marks ('' where none is flagged)."""
    marked = {}
    for row, label in zip(rows, labels):
        for flag in (row.get('flags') or '').split(', '):
            if flag:
                marked.setdefault(flag, []).append(str(label))
    return ''.join(f'\nWARNING: {flag}: {", ".join(named)}' for flag, named in marked.items())


def baseline_cells(row):
    """The strongest baseline's PSNR (with its name) and the row's flags."""
    if row['baseline'] is None:
        return ['—', '—']
    return [f'{row["baseline_psnr"]:.2f} ({BASELINES[row["baseline"]]})', row['flags'] or 'none']


def singular(bound):
    """Whether an eval json's bound record says no unbiased attacker exists."""
    return isinstance(bound, dict) and bound.get('unbiased', '').startswith('the Fisher information is singular')


def prior_bound(bound):
    """(estimate, guaranteed) PSNR of an eval json's prior-aware bound; None where it has none."""
    prior = bound.get('prior_aware') if isinstance(bound, dict) else None
    return None if prior is None else (prior['psnr'], prior['psnr_guaranteed'])


def prior_cell(row):
    if row['prior_bound'] is not None:
        return '{:.2f} / {:.2f}'.format(*row['prior_bound'])
    return 'no bound' if row['unbounded'] else '—'


def ceiling_cell(row):
    """The unbiased-attacker ceiling: a number only where the sent tensor carries noise the bound covers, and no
    unbiased attacker is ruled out."""
    if row['singular']:
        return 'singular (no unbiased attacker)'
    if row['psnr_ceiling'] is not None:
        return f'{row["psnr_ceiling"]:.2f}'
    return 'no bound' if row['unbounded'] else '—'  # '—': an evaluation from before the bound was recorded


SEEDS_HEADER = ('seeds | epochs | training (min) | PSNR (dB, mean ± spread over seeds) | per-image PSNR std | '
                'strongest baseline PSNR (dB) | flag | unbiased ceiling (dB, dFIL) | '
                'prior-aware bound (dB, van Trees: estimate / guaranteed) | SSIM | MS-SSIM | LPIPS | '
                'top-1 agreement | top-5 agreement | KL (nats)')
CONFIDENCE = 0.95  # of the paired interval over seeds; the family-wise level of a table's verdicts
MIN_SEEDS = 3  # fewer paired seeds give an interval too wide, and a spread too uncertain, to decide anything


def over_seeds(results):
    """One row from evaluations of one setting at several seeds (the same held-out images): each figure's mean over
    the seeds, the spread of the PSNR over the seeds (std of the per-seed means), its per-image std (the mean over
    seeds), and the PSNR of each seed (to pair with another setting's)."""
    rows = [result_columns(r) for r in results]
    psnr_by_seed = {r['config']['seed']: row['psnr'] for r, row in zip(results, rows)}
    means = {key: None if any(row[key] is None for row in rows) else sum(row[key] for row in rows) / len(rows)
             for key in rows[0] if key not in ('baseline', 'flags', 'unbounded', 'singular', 'prior_bound')}
    means['unbounded'] = all(row['unbounded'] for row in rows)
    means['singular'] = any(row['singular'] for row in rows)
    bounds = [row['prior_bound'] for row in rows]
    means['prior_bound'] = None if None in bounds else tuple(sum(b) / len(b) for b in zip(*bounds))
    means['baseline'] = rows[0]['baseline'] if all(row['baseline'] == rows[0]['baseline'] for row in rows) else None
    if means['baseline'] is None:
        means['baseline_psnr'] = None
    means['flags'] = ', '.join(dict.fromkeys(f for row in rows if row['flags'] for f in row['flags'].split(', ')))
    values = torch.tensor(list(psnr_by_seed.values()), dtype=torch.float64)
    return {**means, 'psnr_seed_std': values.std().item() if len(values) > 1 else 0.0, 'n_seeds': len(rows),
            'psnr_by_seed': psnr_by_seed}


def seed_cells(row):
    """The Markdown cells of SEEDS_HEADER for a row of `over_seeds`."""
    cells = result_cells(row).split(' | ')
    spread = f' ± {row["psnr_seed_std"]:.2f}' if row['n_seeds'] > 1 else ' (one seed: no spread)'
    return ' | '.join([str(row['n_seeds']), *cells[:2], f'{row["psnr"]:.2f}{spread}',
                       f'{row["psnr_std"]:.2f}', *cells[3:]])


def paired_difference(baseline, other):
    """How `other`'s PSNR differs from `baseline`'s (rows of `over_seeds`), paired by seed: the mean difference over
    the seeds both have, its CONFIDENCE t interval and two-sided p-value; None for both, with the reason as the
    verdict, where fewer than MIN_SEEDS seeds are shared or the seeds vary nothing (every seed gives the same
    difference, so the seeds measured no spread to weigh it against). `holm` sets the verdict."""
    seeds = sorted(set(baseline['psnr_by_seed']) & set(other['psnr_by_seed']))
    differences = torch.tensor([other['psnr_by_seed'][s] - baseline['psnr_by_seed'][s] for s in seeds],
                               dtype=torch.float64)
    found = {'seeds': len(seeds), 'difference': differences.mean().item() if len(seeds) else None,
             'low': None, 'high': None, 'p': None}
    if not seeds:
        return {**found, 'verdict': 'no shared seeds: no verdict'}
    measured = f'{found["difference"]:+.2f} dB over {len(seeds)} shared seed{"s" if len(seeds) > 1 else ""}'
    if len(seeds) < MIN_SEEDS:
        return {**found, 'verdict': f'{measured}, fewer than {MIN_SEEDS}: no verdict'}
    spread = differences.std().item()
    if spread <= 1e-9 * max(1.0, differences.abs().max().item()):
        return {**found, 'verdict': f'{measured}: the seeds vary nothing here (every seed gives the same '
                                    'difference): no verdict'}
    error = spread / math.sqrt(len(seeds))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(seeds) - 1) * error
    mean = found['difference']
    p = 2 * stats.t.sf(abs(mean) / error, len(seeds) - 1)
    return {**found, 'low': mean - half, 'high': mean + half, 'p': p, 'verdict': None}


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (None: not tested): each adjusted p-value, which a
    verdict compares with 1 - CONFIDENCE to keep the chance of any spurious verdict in the family below it."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted, running = [None] * len(p_values), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def against_first(rows, held_out=lambda row: None, first_text=lambda row: '—'):
    """row['against_first'] for rows of `over_seeds`: the PSNR difference from the first row scored on the same
    held-out images (`held_out(row)` names them), paired by seed, its verdict Holm-corrected across every
    comparison of the table; `first_text(row)` for those first rows. Returns the number of comparisons tested."""
    firsts = [next(r for r in rows if held_out(r) == held_out(row)) for row in rows]
    differences = [None if row is first else paired_difference(first, row) for row, first in zip(rows, firsts)]
    adjusted = holm([d and d['p'] for d in differences])
    for row, difference, p in zip(rows, differences, adjusted):
        row['against_first'] = first_text(row) if difference is None else difference_text(difference, p)
    return sum(p is not None for p in adjusted)


def holm_note(tested):
    tested_text = (f'verdicts Holm-corrected across the {tested} comparisons tested in this table at a family-wise '
                   f'{100 * (1 - CONFIDENCE):g} %' if tested else 'no comparison in this table could be tested')
    return f'{tested_text}; no verdict with fewer than {MIN_SEEDS} seeds or where the seeds vary nothing'



def difference_text(difference, p):
    """A paired difference as a cell: the difference, its (uncorrected) interval, the Holm-adjusted p-value and
    the verdict it gives."""
    if difference['verdict']:
        return difference['verdict']
    verdict = ('no measurable difference' if p > 1 - CONFIDENCE else
               f'{"higher" if difference["difference"] > 0 else "lower"} PSNR (the attack leaks '
               f'{"more" if difference["difference"] > 0 else "less"})')
    return (f'{difference["difference"]:+.2f} dB [{difference["low"]:+.2f}, {difference["high"]:+.2f}] over '
            f'{difference["seeds"]} seeds, Holm p {p:.3g}: {verdict}')


def markdown_lines(header, rows):
    """A Markdown table's lines from its header and rows, each its cells joined by ' | ': the delimiter row has as
    many cells as the header, so the table renders."""
    return [f'| {header} |', '|' + '---|' * (header.count(' | ') + 1)] + [f'| {row} |' for row in rows]


def tensor_columns(config, derived):
    """The sent tensor's shape and how many of its channels are sent (of a vector: its values), from a run's
    configuration and what it derived."""
    shape = derived.sent_shape or probe_feature_shape(config.victim, config.data.image_size)
    channels = layout_of(tuple(shape)).channels(tuple(shape)) or shape[0]
    return {'tensor': 'x'.join(map(str, shape)),
            'channels_sent': len(derived.channel_indices) if derived.channel_indices else channels}
