"""Measuring like a reviewer: runs over several seeds share one held-out set, tables give the mean and spread over
seeds, a difference counts only where it holds across seeds, and attackers and defences train until they stop
improving on images that are never the reported ones."""
import csv
import json

import pytest
import torch

from conftest import tiny_config
from recon_attack.attacks import build_attack
from recon_attack.checkpoint import load_checkpoint
from recon_attack.data import load_splits
from recon_attack.stopping import Plateau
from recon_attack.tables import against_first, difference_text, holm, over_seeds, paired_difference
from recon_attack.utils import read_json

TINY = ('--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--decoder_depth', 'light',
        '--num_samples', '2', '--num_workers', '0', '--num_epochs', '1')


def evaluation(seed, psnr):
    return {'config': {'seed': seed}, 'n_images': 4, 'training': {'epochs': 1, 'minutes': 0.1},
            'metrics': {m: {'mean': psnr if m == 'psnr' else 0.5, 'std': 1.0}
                        for m in ('mse', 'psnr', 'ssim', 'ms_ssim')}}


def test_the_held_out_split_and_the_victim_do_not_move_with_the_attackers_seed(tmp_path):
    first, second = (tiny_config(tmp_path, seed=seed).data for seed in (0, 1))
    assert torch.equal(load_splits(first).val_idx, load_splits(second).val_idx)
    cpu = torch.device('cpu')
    victims = [build_attack(tiny_config(tmp_path, seed=seed), cpu)[0].victim for seed in (0, 1)]
    assert victims[0].fingerprint() == victims[1].fingerprint()
    other = tiny_config(tmp_path, split_seed=1).data
    assert not torch.equal(load_splits(first).images[load_splits(first).val_idx],
                           load_splits(other).images[load_splits(other).val_idx])  # its own, recorded seed


def test_checkpoints_from_before_split_seeds_keep_the_split_they_were_trained_on(tmp_path):
    state = {'config': {'seed': 3}, 'decoder': {}, 'data': {}, 'format': 'recon-attack/3'}
    torch.save(state, tmp_path / 'old.pth')
    config = load_checkpoint(str(tmp_path / 'old.pth'))['config']
    assert (config['split_seed'], config['victim_seed']) == (3, 3)


def test_over_seeds_gives_the_mean_and_the_spread_over_the_seeds():
    row = over_seeds([evaluation(0, 10.0), evaluation(1, 12.0), evaluation(2, 14.0)])
    assert row['psnr'] == pytest.approx(12.0) and row['psnr_seed_std'] == pytest.approx(2.0)
    assert row['psnr_std'] == 1.0 and row['n_seeds'] == 3  # the per-image spread stays its own figure


def verdict(baseline, other):
    difference = paired_difference(baseline, other)
    return difference_text(difference, difference['p'])


def test_a_difference_counts_only_where_it_holds_across_seeds():
    baseline = over_seeds([evaluation(s, p) for s, p in ((0, 10.0), (1, 11.0), (2, 12.0))])
    steady = over_seeds([evaluation(s, p) for s, p in ((0, 10.5), (1, 11.6), (2, 12.4))])  # +0.5 each, +-0.1
    noisy = over_seeds([evaluation(s, p) for s, p in ((0, 12.0), (1, 10.0), (2, 12.5))])  # +0.5 on average
    assert verdict(baseline, steady).endswith('higher PSNR (the attack leaks more)')
    assert verdict(baseline, noisy).endswith('no measurable difference')
    assert paired_difference(baseline, steady)['low'] > 0
    # the t interval over 3 paired seeds: mean 0.5, std 0.1, t(0.975, 2) = 4.303
    assert paired_difference(baseline, steady)['high'] - 0.5 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    # and its p-value: t = 0.5 / (0.1 / sqrt 3) = 8.66 on 2 degrees of freedom
    assert paired_difference(baseline, steady)['p'] == pytest.approx(0.01307, rel=1e-3)


def test_no_verdict_where_the_seeds_vary_nothing_or_are_too_few():
    baseline = over_seeds([evaluation(s, 14.51) for s in range(3)])
    shifted = over_seeds([evaluation(s, 14.51 - 1e-9) for s in range(3)])  # every seed the same difference
    assert verdict(baseline, shifted) == ('-0.00 dB over 3 shared seeds: the seeds vary nothing here (every seed '
                                          'gives the same difference): no verdict')
    two = [over_seeds([evaluation(s, p + s) for s in range(2)]) for p in (10.0, 12.0)]
    assert verdict(*two) == '+2.00 dB over 2 shared seeds, fewer than 3: no verdict'
    one = over_seeds([evaluation(0, 20.0)])
    assert verdict(baseline, one) == '+5.49 dB over 1 shared seed, fewer than 3: no verdict'
    assert verdict(baseline, over_seeds([evaluation(5, 20.0)])) == 'no shared seeds: no verdict'


def test_verdicts_are_holm_corrected_across_a_table():
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    # three settings each 0.5 dB above the first on 3 seeds, each "higher" alone (p 0.029, 0.0033, 0.029): only the
    # clearest survives the family's correction
    first = over_seeds([evaluation(s, p) for s, p in ((0, 10.0), (1, 11.0), (2, 12.0))])
    others = [over_seeds([evaluation(s, 10.0 + s + d) for s, d in enumerate(shifts)])
              for shifts in ((0.35, 0.65, 0.5), (0.45, 0.55, 0.5), (0.65, 0.35, 0.5))]
    assert all(paired_difference(first, other)['p'] < 0.05 for other in others)
    rows = [first, *others]
    assert against_first(rows) == 3
    assert [row['against_first'].rsplit(': ', 1)[1] for row in others] == [
        'no measurable difference', 'higher PSNR (the attack leaks more)', 'no measurable difference']
    assert all(', Holm p ' in row['against_first'] for row in others)


def test_seeds_train_every_seed_on_one_held_out_set_and_tabulate_them(tmp_path, main_here):
    result = main_here(tmp_path, '--train', *TINY, '--seeds', '2', '--save_dir', 'runs')
    assert result.returncode == 0, result.stderr
    evaluations = [json.loads((tmp_path / 'runs' / f'seed={s}' / 'eval.json').read_text()) for s in (0, 1)]
    assert evaluations[0]['held_out'] == evaluations[1]['held_out']
    assert evaluations[0]['metrics']['psnr']['mean'] != evaluations[1]['metrics']['psnr']['mean']
    with open(tmp_path / 'runs' / 'seeds.csv') as f:
        [row] = list(csv.DictReader(f))
    psnrs = torch.tensor([e['metrics']['psnr']['mean'] for e in evaluations], dtype=torch.float64)
    assert float(row['psnr']) == pytest.approx(psnrs.mean().item())
    assert float(row['psnr_seed_std']) == pytest.approx(psnrs.std().item())
    table = (tmp_path / 'runs' / 'seeds.md').read_text()
    assert 'PSNR (dB, mean ± spread over seeds)' in table
    first, last = sorted(e['provenance']['time'] for e in evaluations)
    assert f'Made on: {evaluations[0]["provenance"]["machine"]}' in table
    assert (first if first == last else f'{first} to {last}') in table
    report = main_here(tmp_path, '--report', 'runs', '--save_dir', 'report')
    assert report.returncode == 0, report.stderr
    assert 'Over seeds: the rows that differ only in `seed`' in (tmp_path / 'report' / 'report.md').read_text()
    with open(tmp_path / 'report' / 'report_seeds.csv') as f:
        [group] = list(csv.DictReader(f))
    assert group['rows'] == '1 2' and float(group['psnr']) == pytest.approx(psnrs.mean().item())


def test_a_sweep_over_seeds_compares_each_value_with_the_first_across_seeds(tmp_path, main_here):
    result = main_here(tmp_path, '--sweep', 'keep_channels', '--sweep_values', '1', '0.25', *TINY, '--seeds', '2',
                       '--save_dir', 'sweep')
    assert result.returncode == 0, result.stderr
    for value in ('1', '0.25'):
        for seed in (0, 1):
            assert (tmp_path / 'sweep' / f'keep_channels={value}' / f'seed={seed}' / 'eval.json').is_file()
    table = (tmp_path / 'sweep' / 'sweep.md').read_text()
    assert 'seeds 0-1' in table and 'PSNR against 1 (95 % interval over paired seeds)' in table
    assert '2 shared seeds, fewer than 3: no verdict' in table and 'PSNR (the attack leaks' not in table
    assert 'no comparison in this table could be tested' in table


@pytest.mark.parametrize('args, message', [
    (('--attack', 'optimize', '--seeds', '2'), '--seeds is for --train, --sweep and --train_defence (what trains), not --attack'),
    (('--train', '--seeds', '0'), '--seeds: must be at least 1'),
])
def test_bad_seeds_are_one_line(tmp_path, main_here, args, message):
    result = main_here(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr and 'Traceback' not in result.stderr


def test_stopping_images_are_held_out_from_training_and_never_reported(tmp_path):
    data = tiny_config(tmp_path).data
    plain, stopping = load_splits(data), load_splits(data, stopping=True)
    assert torch.equal(plain.val_idx, stopping.val_idx)  # the reported images do not move
    stop, train = set(stopping.stop_idx.tolist()), set(stopping.train_idx.tolist())
    assert len(stop) >= len(plain.val_idx) and not stop & train and not stop & set(plain.val_idx.tolist())
    assert stop | train == set(plain.train_idx.tolist())
    assert set(stopping.record()['stop']) == {stopping.names[i] for i in stop}


def test_the_stopping_rule_follows_its_figure_and_is_rebuilt_from_a_history():
    history = [{'epoch': e, 'stop_psnr': p} for e, p in enumerate((10.0, 11.0, 11.04, 11.02, 11.3), start=1)]
    plateau = Plateau(2, 0.05, 'stop_psnr')
    reached = []
    for row in history:
        plateau.update(row)
        reached.append(plateau.reached(row['epoch']))
    assert reached == [False, False, False, True, False] and plateau.best_epoch == 5
    rebuilt = Plateau(2, 0.05, 'stop_psnr', history[:4])
    assert rebuilt.reached(4) and rebuilt.best_epoch == 2  # a resumed run stops where the uninterrupted one would
    falling = Plateau(1, 0.1, 'objective', [{'epoch': 1, 'objective': 1.0}, {'epoch': 2, 'objective': 0.95}],
                      rising=False, relative=True)
    assert falling.reached(2) and falling.best_epoch == 1  # 5 % is less than a tenth of itself
    assert not Plateau(0, 0.05, 'stop_psnr', history).reached(5)  # patience 0: off


def test_training_stops_on_a_plateau_or_says_the_cap_stopped_it(tmp_path, main_here):
    # --lr 0.3: here the stopping images' PSNR peaks at epoch 1 while the reported one still rises
    plateau = main_here(tmp_path, '--train', *TINY, '--num_epochs', '4', '--stop_patience', '1', '--stop_delta', '100',
                        '--lr', '0.3', '--log_interval', '1', '--save_dir', 'plateau')
    assert plateau.returncode == 0, plateau.stderr
    assert 'training stopped after epoch 2: the PSNR on the stopping images last improved' in plateau.stdout
    evaluation = read_json(tmp_path / 'plateau' / 'eval.json')
    assert evaluation['training']['epochs'] == evaluation['epoch'] == 2
    assert evaluation['training']['stopping'] == {'patience': 1, 'delta': 100.0, 'on': 'stop_psnr', 'best_epoch': 1,
                                                  'epochs': 2, 'plateau_reached': True, 'cap_hit': False}
    history = read_json(tmp_path / 'plateau' / 'metrics.json')['history']
    assert all('stop_psnr' in row for row in history)
    # the attack uses the weights of the epoch with the highest PSNR on the stopping images (ties: the earliest)
    best = max(history, key=lambda row: (row['stop_psnr'], -row['epoch']))['epoch']
    model = load_checkpoint(str(tmp_path / 'plateau' / 'model.pth'))
    kept = load_checkpoint(str(tmp_path / 'plateau' / f'ckpt_{best}.ckpt'))['decoder']
    assert all(torch.equal(value, kept[key]) for key, value in model['decoder'].items())
    assert evaluation['metrics']['psnr']['mean'] == pytest.approx(history[best - 1]['psnr'], abs=1e-4)
    if best < 2:
        assert model['weights_epoch'] == best and history[0]['psnr'] != history[1]['psnr']
        assert f'the attack uses the decoder of epoch {best}, the highest PSNR on the stopping images' in plateau.stdout
        evaluated = main_here(tmp_path, '--eval', '--model_path', 'plateau/model.pth')
        assert f'(2 epochs, the weights of epoch {best}, the best on the stopping images)' in evaluated.stdout
    else:
        assert 'weights_epoch' not in model
    capped = main_here(tmp_path, '--train', *TINY, '--stop_patience', '3', '--save_dir', 'capped')
    assert capped.returncode == 0, capped.stderr
    assert 'the cap of 1 epochs stopped training before a plateau' in capped.stdout
    assert read_json(tmp_path / 'capped' / 'eval.json')['training']['stopping']['cap_hit']


def test_defence_training_stops_when_its_objective_flattens_and_draws_both_curves(tmp_path, main_here):
    result = main_here(tmp_path, '--train_defence', 'nopeek', '--image_size', '32', '--batch_size', '16', '--num_batches',
                       '8', '--num_workers', '0', '--defend_epochs', '5', '--stop_patience', '1', '--stop_delta',
                       '0.99', '--save_dir', 'defended')
    assert result.returncode == 0, result.stderr
    record = read_json(tmp_path / 'defended' / 'defence.json')
    assert record['precision'] in ('fp32 on cpu', 'bf16 autocast on cpu')  # beside its figures, as evaluations say
    assert len(record['history']) == 2 and record['stopping']['plateau_reached']
    assert 'defence training stopped after epoch 2: its objective (KL + privacy term)' in result.stdout
    assert all({'kl', 'privacy', 'objective'} <= set(row) for row in record['history'])
    assert (tmp_path / 'defended' / 'defence.png').stat().st_size > 10_000


def test_a_resumed_run_keeps_its_stopping_images_and_ends_as_the_uninterrupted_one(tmp_path, main_here):
    common = ('--num_epochs', '3', '--log_interval', '1', '--stop_patience', '5')
    assert main_here(tmp_path, '--train', *TINY, *common, '--save_dir', 'whole').returncode == 0
    resumed = main_here(tmp_path, '--resume', '--model_path', 'whole/ckpt_1.ckpt', '--save_dir', 'resumed')
    assert resumed.returncode == 0, resumed.stderr
    whole, again = (torch.load(tmp_path / run / 'model.pth', weights_only=True) for run in ('whole', 'resumed'))
    assert whole['data']['stop'] == again['data']['stop'] and len(whole['data']['stop']) >= 32
    assert [h['stop_psnr'] for h in whole['history']] == [h['stop_psnr'] for h in again['history']]
    assert all(torch.equal(value, again['decoder'][key]) for key, value in whole['decoder'].items())


def test_a_report_compares_settings_over_seeds_only_on_the_same_held_out_images():
    from recon_attack.report import over_seed_groups
    runs = [('a', 0, 'A', 10.0), ('a', 1, 'A', 11.0), ('a', 0, 'B', 30.0), ('a', 1, 'B', 31.0), ('b', 0, 'A', 10.5),
            ('b', 1, 'A', 11.6)]
    rows = [{'#': i, 'attack': 'decoder', 'lr': lr, 'seed': str(seed), 'held_out_set': images, 'epochs': 1,
             'precision': 'fp32 on cpu', 'machine': 'cpu', 'made': None}
            for i, (lr, seed, images, _) in enumerate(runs, start=1)]
    grouped, tested, warning = over_seed_groups(rows, ['attack', 'lr', 'seed'],
                                                [evaluation(seed, psnr) for _, seed, _, psnr in runs])
    assert [g['rows'] for g in grouped] == ['1 2', '3 4', '5 6']
    assert grouped[1]['against_first'] == '— (rows 3 4)'  # the first of set B: not compared with set A
    assert grouped[2]['against_first'].startswith('+0.55 dB')  # against rows 1 2 (set A), paired by seed
    assert tested == 0 and warning is None  # two seeds: no test; each seed once
