"""The researcher's day: published settings by name (@presets), live curves (--tensorboard), and one report
across finished runs and sweeps (--report)."""
import csv
import json
import os

import pytest
import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import main_in
from recon_attack.cli import build_parser, idle_flags, presets, resolve_config, resolve_presets
from recon_attack.config import Derived
from recon_attack import cut
from recon_attack.records import to_record
from recon_attack.tables import provenance_note
from recon_attack.train import CURVES
from recon_attack.utils import provenance

# A one-epoch smoke run of any preset: random victim, built-in photos, tiny images and data.
SMOKE = ('--no-use_pretrained', '--image_size', '32', '--batch_size', '8', '--num_batches', '4', '--num_epochs', '1',
         '--attack_steps', '2', '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0')
TINY = ('--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '1', '--decoder_depth',
        'light', '--num_samples', '2', '--num_workers', '0')
# What each preset sets (the rest are the flags' defaults).
EXPECTED = {
    'original': dict(mode='train', arch='mobilenet_v3_large', split='block13_expand', pretrained=True, image_size=320,
                     decoder='original', interpolation='transpose', decoder_depth='medium', optim='adam', lr=1e-3,
                     scheduler='none', loss='mse', batch_size=32, num_epochs=10),
    'simba': dict(mode='train', arch='resnet18', split='layer2', pretrained=True, image_size=128, loss='ssim',
                  optim='adam', lr=1e-2, batch_size=128, num_epochs=150),
    'glass': dict(mode='sweep', sweep='split', sweep_values=['layer1', 'layer2', 'layer3', 'layer4'], arch='resnet18',
                  pretrained=True, image_size=64, attack='decoder+optimize'),
    'he_shallow': dict(mode='attack', attack='optimize', arch='resnet18', split='layer1', pretrained=True,
                       image_size=64, num_batches=22),
    'he_deep': dict(mode='attack', attack='optimize', arch='resnet18', split='layer3', pretrained=True, image_size=64,
                    num_batches=22),
    'adamw_cosine': dict(mode='train', decoder='original', decoder_depth='medium', optim='adamw', lr=2e-3,
                      scheduler='cosine', warmup_epochs=1, batch_size=16, attack='decoder+optimize', pretrained=True),
}


def command(*argv):
    parser = build_parser()
    argv = resolve_presets(list(argv))
    return resolve_config(parser, parser.parse_args(argv), argv)


def parse(*argv):
    """The command's flags: its configuration's record and the mode's own arguments."""
    resolved = command(*argv)
    own = {key: getattr(resolved, key) for key in resolved._fields if key not in ('config', 'derived', 'state')}
    return {**to_record(resolved.config, resolved.derived), **own}


def test_every_preset_is_described_here():
    assert sorted(EXPECTED) == presets()


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_each_preset_parses_into_its_setting(name):
    by_path = parse(f'@presets/{name}.args', '--data_dir', 'celeba')  # as the README gives it
    assert {k: by_path[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert by_path['save_dir'] == f'runs/{name}'
    assert parse(f'@{name}', '--data_dir', 'celeba') == by_path  # by name, from any folder


def test_a_renamed_preset_still_works_and_says_its_new_name(capsys):
    assert parse('@strongest') == parse('@adamw_cosine')
    assert 'note: @strongest is now @adamw_cosine' in capsys.readouterr().err


def test_renamed_flags_and_values_still_work_in_commands_and_preset_files(tmp_path, capsys):
    old = tmp_path / 'old.args'
    old.write_text('--train --aug --interpolation upsample  # written before the renames\n')
    current = parse('--train', '--train_noise', '--interpolation', 'bicubic')
    assert parse(f'@{old}') == parse('--train', '--aug', '--interpolation=upsample') == current
    assert parse('--defend', 'nopeek')['mode'] == 'train_defence'
    notes = capsys.readouterr().err
    for note in ('--aug is now --train_noise', '--interpolation upsample is now --interpolation bicubic',
                 '--defend is now --train_defence'):
        assert note in notes


def test_a_flag_after_a_preset_overrides_it_and_one_before_does_not():
    cfg = parse('--interpolation', 'transpose', '@original', '--interpolation', 'bicubic', '--no-use_pretrained',
                '--num_epochs', '3')
    assert (cfg['interpolation'], cfg['pretrained'], cfg['num_epochs']) == ('bicubic', False, 3)
    assert (cfg['arch'], cfg['split'], cfg['image_size']) == ('mobilenet_v3_large', 'block13_expand', 320)
    assert parse('--num_epochs', '3', '@original')['num_epochs'] == 10


def test_the_original_preset_builds_exactly_the_original_cut():
    """features[0..12] and the 1x1 expansion of block 13 on the device (672 channels at stride 16), the rest and
    the head on the server: together exactly torchvision's MobileNetV3-Large."""
    cfg = parse('@original', '--no-use_pretrained')
    victim = cut(cfg['arch'], cfg['split'], pretrained=cfg['pretrained'], weights=cfg['weights'],
                 seed=cfg['victim_seed'])
    torch.manual_seed(cfg['victim_seed'])  # the random victim's weights: the same seed, the same network
    reference = torchvision.models.mobilenet_v3_large(weights=None).eval()
    images = torch.rand(2, 3, cfg['image_size'], cfg['image_size'])
    normalised = (images - victim.mean) / victim.std
    with torch.no_grad():
        sent = victim.encode(images)
        expected = reference.features[13].block[0](reference.features[:13](normalised))
        assert sent.shape == (2, 672, 20, 20)
        torch.testing.assert_close(sent, expected, rtol=0, atol=0)
        torch.testing.assert_close(victim.classify(sent), reference(normalised), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_each_preset_runs_one_epoch_offline_on_the_builtin_photos(name, tmp_path, main_here):
    result = main_here(tmp_path, f'@{name}', *SMOKE, '--save_dir', 'out')
    assert result.returncode == 0, result.stderr
    assert f'note: @{name} describes a published setting on its own data' in result.stdout
    written = os.listdir(tmp_path / 'out')
    expected = {'sweep': 'sweep.md', 'attack': 'eval_optimize.json'}.get(EXPECTED[name]['mode'], 'eval.json')
    assert expected in written, written


def test_tensorboard_writes_the_curves_tensorboard_reads(tmp_path, main_here):
    assert not parse('--train')['tensorboard']  # off by default
    result = main_here(tmp_path, '--train', *TINY, '--num_epochs', '3', '--log_interval', '2', '--tensorboard',
                       '--save_dir', 'run')
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / 'run'), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    assert set(events.Tags()['scalars']) == set(CURVES.values())
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())['history']
    for key, tag in CURVES.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([h[key] for h in history], rel=1e-6)
    grids = events.Images('validation/reconstructions')
    assert [g.step for g in grids] == [1, 2, 3]  # the first, every --log_interval, the last
    assert (grids[0].width, grids[0].height) == (2 * 34 + 2, 2 * 34 + 2)  # 2 images over their 2 reconstructions


def test_a_report_leaves_out_flags_that_made_no_difference():
    plain = idle_flags(command('--train').config)
    assert {'warmup_epochs', 'step_size', 'sparse_reg', 'noise_var', 'defence_k', 'defence_p', 'keep_channels',
            'nopeek_weight', 'defend_epochs', 'train'} <= plain
    tuned = idle_flags(command('--train', '--scheduler', 'cosine', '--defence', 'topk', '--sparse').config)
    assert {'warmup_epochs', 'defence_k', 'sparse_reg'}.isdisjoint(tuned)
    assert {'step_size', 'defence_p', 'defend_epochs'} <= tuned
    defended = Derived(victim_defence='trained defence: nopeek')
    assert 'defend_epochs' not in idle_flags(command('--train').config, defended)


@pytest.fixture(scope='module')
def finished_runs(tmp_path_factory):
    """Two small sweeps and a plain run with another split seed (so other held-out images), in one folder."""
    cwd = tmp_path_factory.mktemp('runs')
    main_in(cwd, '--sweep', 'keep_channels', '--sweep_values', '1', '0.5', *TINY, '--save_dir', 'keep')
    main_in(cwd, '--sweep', 'split', '--sweep_values', 'layer1', 'layer2', *TINY, '--save_dir', 'split')
    main_in(cwd, '--train', *TINY, '--split_seed', '1', '--save_dir', 'plain')
    return cwd


def read_report(folder):
    with open(folder / 'report.csv') as f:
        return list(csv.DictReader(f))


def test_report_tabulates_sweeps_and_a_run_against_their_eval_json(finished_runs, main_here):
    result = main_here(finished_runs, '--report', 'keep', 'spl*', 'plain', '--save_dir', 'report')
    assert result.returncode == 0, result.stderr
    rows = read_report(finished_runs / 'report')
    assert [r['run'] for r in rows] == ['keep/keep_channels=0.5', 'keep/keep_channels=1', 'split/split=layer1',
                                        'split/split=layer2', 'plain']
    for row in rows:
        evaluation = json.loads((finished_runs / row['run'] / 'eval.json').read_text())
        for metric in ('psnr', 'ssim', 'ms_ssim', 'top1_agreement', 'top5_agreement', 'kl', 'mse'):
            assert float(row[metric]) == evaluation['metrics'][metric]['mean'], (row['run'], metric)
        assert float(row['psnr_std']) == evaluation['metrics']['psnr']['std']
        assert int(row['n_images']) == evaluation['n_images']
    # the settings that differ are columns, those shared are not
    assert [(r['split'], r['keep_channels'], r['split_seed']) for r in rows] == [
        ('layer2', '0.5', '0'), ('layer2', '1', '0'), ('layer1', '—', '0'), ('layer2', '—', '0'), ('layer2', '—', '1')]
    assert 'arch' not in rows[0] and 'train' not in rows[0]
    # the plain run (another split seed) was scored on other held-out images: flagged, not silently compared
    assert [r['held_out_set'] for r in rows] == ['A', 'A', 'A', 'A', 'B']
    table = (finished_runs / 'report' / 'report.md').read_text()
    assert 'WARNING: these rows were not scored on the same held-out images (set A: rows 1, 2, 3, 4; set B: rows 5)' in table
    # where each was made: in every row, and once for the table (one machine, one commit here)
    made = provenance(torch.device('cpu'))
    assert {(r['machine'], r['commit'], r['precision']) for r in rows} == {(made['machine'], made['commit'],
                                                                           rows[0]['precision'])}
    assert f'Made on: {made["machine"]}; arithmetic {rows[0]["precision"]}; {made["torch"]}; commit {made["commit"]}' \
        in table
    assert 'Same in every run: arch resnet18' in table
    assert (finished_runs / 'report' / 'report.png').stat().st_size > 10_000


def test_report_of_runs_on_the_same_images_has_one_set(finished_runs, main_here):
    result = main_here(finished_runs, '--report', 'split', '--save_dir', 'report_split')
    assert result.returncode == 0, result.stderr
    assert {r['held_out_set'] for r in read_report(finished_runs / 'report_split')} == {'A'}
    assert 'WARNING' not in (finished_runs / 'report_split' / 'report.md').read_text()


@pytest.mark.parametrize('args, message', [
    (('--report', 'nowhere'), '--report nowhere: no such folder'),
    (('--report', 'plain/samples'), '--report plain/samples: no finished run in it'),
    (('--report', 'plain/eval.json'), '--report plain/eval.json: not a folder'),
    (('--report', 'plain', '--arch', 'resnet50'), '--report reads finished runs: it takes folders, --save_dir and '
                                                  '--overwrite, not --arch'),
    (('@nope',), '@nope: no such file; the presets are adamw_cosine, glass, he_deep, he_shallow, original, simba'),
])
def test_bad_report_and_preset_arguments_are_one_line(finished_runs, main_here, args, message):
    result = main_here(finished_runs, *args)
    assert result.returncode == 2 and message in result.stderr
    assert 'Traceback' not in result.stderr


def test_a_table_says_where_its_records_were_made_and_which_do_not_say():
    made = [{'precision': 'fp32 on cpu', 'provenance': {'machine': 'M1', 'torch': 'torch 1', 'commit': 'c1',
                                                        'time': '2026-01-02T00:00:00+00:00'}},
            {'precision': 'bf16 autocast on cuda', 'provenance': {'machine': 'M2', 'torch': 'torch 1', 'commit': 'c1',
                                                                  'time': '2026-01-01T00:00:00+00:00'}}]
    assert provenance_note(made + [{}]) == (
        'Made on: M1 / M2; arithmetic bf16 autocast on cuda / fp32 on cpu; torch 1; commit c1; '
        '2026-01-01T00:00:00+00:00 to 2026-01-02T00:00:00+00:00 (1 of 3 records do not say: written before the tool '
        'recorded it)')
    assert provenance_note([{}]).startswith('Made on: not recorded (1 of 1 records do not say')
