"""Verdicts a reviewer accepts: every result beside its baselines and flagged where it does not beat them, tables
that render and say how they were made, stopping images that share no photo or person with training, the best
stopping epoch's weights, independent random streams, and outputs a newcomer reads right."""
import csv
import os
import re
import signal
import subprocess

import matplotlib
import pytest
import torch

from conftest import interrupt_training, run_cli, tiny_config, write_photos
from recon_attack import utils, visualize
from recon_attack.attacks import build_attack
from recon_attack.cli import build_parser, resolve_config
from recon_attack.config import Noise
from recon_attack.data import CELEBA_IDENTITIES, load_splits
from recon_attack.evaluate import result_flags, untrained_decoder
from recon_attack.metrics import psnr
from recon_attack.noise import held_out_draws, training_draws
from recon_attack.report import over_seed_groups
from recon_attack.train import BestWeights
from recon_attack.utils import read_json

CPU = torch.device('cpu')
FEW = ('--image_size', '32', '--batch_size', '8', '--num_batches', '12', '--decoder_depth', 'light',
       '--num_samples', '2', '--num_workers', '0', '--num_epochs', '1')  # 8 held-out images


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def rendered_tables(markdown):
    """Each Markdown table's rows as lists of cells; a table renders only where every row has the header's cells."""
    tables, rows = [], []
    for line in markdown.splitlines() + ['']:
        if line.startswith('|'):
            rows.append(line.strip('|').split(' | ') if not line.startswith('|---') else line.count('---|') * ['---'])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def assert_renders(markdown):
    tables = rendered_tables(markdown)
    assert tables
    for table in tables:
        assert {len(row) for row in table} == {len(table[0])}, table[:2]


@pytest.fixture
def suptitles(monkeypatch):
    """Each figure's file name and its title (suptitle), as drawn."""
    drawn, save = {}, visualize.save_figure

    def spy(fig, path):
        drawn[os.path.basename(path)] = fig.get_suptitle()
        return save(fig, path)
    monkeypatch.setattr(visualize, 'save_figure', spy)
    return drawn


# Baselines, in every output

def test_every_output_stands_beside_its_baselines_and_flags_what_does_not_beat_them(tmp_path, main_here, suptitles):
    # --lr 0: the attack is the untrained decoder, so it cannot beat its baselines; 8 held-out images
    result = main_here(tmp_path, '--train', *FEW, '--lr', '0', '--train_noise', '--noise_var', '0.05',
                       '--attack', 'decoder+optimize', '--attack_steps', '2', '--save_dir', 'run')
    assert result.returncode == 0, result.stderr
    assert 'noise on the input image (--noise_at features puts it on the sent tensor): variance 0.05' in result.stdout
    evaluation = read_json(tmp_path / 'run' / 'eval.json')
    assert set(evaluation['baselines']) == {'mean_image', 'untrained_decoder'}
    assert set(evaluation['flags']) == {'few images', 'within baseline'}
    assert 'psnr' in evaluation['metrics'] and 'mean_image_psnr' not in evaluation['metrics']
    assert 'baselines on these images: mean training image' in result.stdout
    assert 'warning: scored on 8 images, fewer than 16' in result.stdout
    assert 'warning: within the spread of the' in result.stdout
    # per image: the mean training image scored against each held-out image
    splits = load_splits(tiny_config(tmp_path, image_size=32, batch_size=8, num_batches=12).data)
    mean = splits.images[splits.train_idx].double().mean(0) / 255
    rows = {r['image']: r for r in read_csv(tmp_path / 'run' / 'eval_per_image.csv')}
    expected = psnr(mean.float().expand(len(splits.val_idx), -1, -1, -1), splits.images[splits.val_idx].float() / 255)
    assert [float(rows[n]['mean_image_psnr']) for n in splits.val_names] == pytest.approx(expected.tolist(), abs=0.01)
    for figure in ('samples.png', 'psnr_hist.png', 'samples_decoder_optimize.png'):
        assert 'baselines on these images: mean training image' in suptitles[figure], figure
        assert 'WARNING: within the spread of the' in suptitles[figure], figure
    # a log file gets one line a loop, not a progress bar's redraws
    assert '\r' not in result.stderr and 'epoch 1/1 (' in result.stderr
    # the report: a baseline column and the flags, in a table that renders
    report = main_here(tmp_path, '--report', 'run', '--save_dir', 'report')
    assert report.returncode == 0, report.stderr
    table = (tmp_path / 'report' / 'report.md').read_text()
    assert_renders(table)
    header, _, first = rendered_tables(table)[0][:3]
    assert first[header.index('flag')] == 'few images, within baseline'
    assert first[header.index('strongest baseline PSNR (dB)')].split()[0] == (
        f'{max(b["psnr"]["mean"] for b in evaluation["baselines"].values()):.2f}')
    assert 'WARNING: few images: 1, 2' in suptitles['report.png']
    assert 'WARNING: within baseline: 1' in suptitles['report.png']
    # --eval says what the checkpoint's refinement costs; --visualize draws beside the run, never over its figures
    drawn = (tmp_path / 'run' / 'samples.png').read_bytes()
    evaluated = main_here(tmp_path, '--eval', '--model_path', 'run/model.pth')
    assert "the checkpoint's --attack decoder+optimize runs 2 Adam steps" in evaluated.stdout
    assert main_here(tmp_path, '--visualize', '--model_path', 'run/model.pth').returncode == 0
    assert (tmp_path / 'run' / 'visualize_model' / 'samples.png').is_file()
    assert (tmp_path / 'run' / 'samples.png').read_bytes() == drawn


def test_the_untrained_baseline_is_the_decoder_the_attacker_starts_from(tmp_path):
    config = tiny_config(tmp_path, seed=3)
    attack, derived = build_attack(config, CPU)
    untrained = untrained_decoder(config, derived, CPU)
    assert all(torch.equal(value, untrained.state_dict()[key]) for key, value in attack.decoder.state_dict().items())


def test_a_result_is_flagged_within_one_per_image_std_of_the_strongest_baseline():
    baselines = {'mean_image': {'psnr': {'mean': 12.0, 'std': 1.0}},
                 'untrained_decoder': {'psnr': {'mean': 10.0, 'std': 3.0}}}
    assert result_flags(13.0, baselines, 16) == {'within baseline': pytest.approx(
        'within the spread of the mean training image baseline (12.00 ± 1.00 dB): no leak shown beyond it')}
    assert result_flags(13.01, baselines, 16) == {}
    assert list(result_flags(20.0, baselines, 15)) == ['few images']


# Comparisons over seeds

def test_a_sweep_where_the_seeds_vary_nothing_gives_no_verdict(tmp_path, main_here, suptitles):
    result = main_here(tmp_path, '--sweep', 'noise_var', '--sweep_values', '0.01', '0.0101', '--noise_at', 'features',
                       '--attack', 'optimize', '--attack_steps', '2', '--seeds', '3', '--image_size', '32',
                       '--batch_size', '8', '--num_batches', '12', '--num_workers', '0', '--save_dir', 'sweep')
    assert result.returncode == 0, result.stderr
    table = (tmp_path / 'sweep' / 'sweep.md').read_text()
    assert_renders(table)
    assert 'the seeds vary nothing here (every seed gives the same difference): no verdict' in table
    assert 'PSNR (the attack leaks' not in table and '10 epochs' not in table
    assert 'no training (the white-box optimisation alone)' in table and 'strongest baseline PSNR (dB)' in table
    assert 'no training' in suptitles['sweep.png'] and 'WARNING: few images: 0.01, 0.0101' in suptitles['sweep.png']
    rows = read_csv(tmp_path / 'sweep' / 'sweep.csv')
    assert all(row['machine'] and row['precision'] and row['commit'] and row['made'] for row in rows)


def test_a_report_counts_a_re_evaluated_seed_once_and_pairs_only_comparable_rows():
    def row(number, lr, seed, precision='fp32 on cpu', epochs=1, made='2026-01-01'):
        return {'#': number, 'attack': 'decoder', 'lr': lr, 'seed': str(seed), 'held_out_set': 'A', 'epochs': epochs,
                'precision': precision, 'machine': 'cpu', 'made': made}
    from test_measurement import evaluation
    rows = [row(1, 'a', 0), row(2, 'a', 0, made='2026-01-02'), row(3, 'a', 1), row(4, 'a', 2),
            row(5, 'a', 0, 'bf16 autocast on cpu'), row(6, 'a', 1, 'bf16 autocast on cpu')]
    psnrs = [10.0, 10.5, 11.0, 12.0, 20.0, 21.0]
    results = [{**evaluation(int(r['seed']), p), 'precision': r['precision'],
                'provenance': {'machine': r['machine'], 'time': r['made']}} for r, p in zip(rows, psnrs)]
    grouped, tested, warning = over_seed_groups(rows, ['attack', 'lr', 'seed'], results)
    assert [g['rows'] for g in grouped] == ['2 3 4', '5 6']  # the latest evaluation of seed 0; bf16 apart
    assert grouped[0]['n_seeds'] == 3 and grouped[0]['psnr'] == pytest.approx((10.5 + 11.0 + 12.0) / 3)
    assert grouped[1]['against_first'] == '— (rows 5 6)' and tested == 0  # other arithmetic: never paired
    assert warning.startswith('WARNING: row 1 repeats the setting and seed of another row')


# Stopping images and the weights kept

def test_stopping_images_share_no_photo_with_training(tmp_path):
    splits = load_splits(tiny_config(tmp_path).data, stopping=True)
    trained = {splits.origin(i) for i in splits.train_idx.tolist()}
    stopping = {splits.origin(i) for i in splits.stop_idx.tolist()}
    assert stopping and trained and not stopping & trained
    assert sorted(stopping) == splits.record()['stop_origins']


def test_stopping_images_share_no_celeba_identity_with_training(tmp_path):
    names = [f'{i:06d}.jpg' for i in range(1, 49)]
    root = write_photos(tmp_path / 'celeba', names)
    identities = {name: str(i % 6) for i, name in enumerate(names)}  # 6 people, 8 photos each, interleaved
    (root / CELEBA_IDENTITIES).write_text(''.join(f'{n} {p}\n' for n, p in identities.items()))
    data = tiny_config(tmp_path, data_dir=str(root), image_size=32, batch_size=4, num_batches=12).data
    splits = load_splits(data, stopping=True)
    people = [{identities[splits.names[i]] for i in part.tolist()} for part in (splits.train_idx, splits.stop_idx)]
    assert people[0] and people[1] and not people[0] & people[1]


def test_the_weights_kept_are_those_of_the_highest_stopping_psnr_the_earliest_of_ties():
    best, decoder = BestWeights(), torch.nn.Linear(1, 1)
    for epoch, value in enumerate((10.0, 11.0, 11.04, 11.04, 11.02), start=1):
        torch.nn.init.constant_(decoder.weight, epoch)
        best.offer(decoder, epoch, value)
    assert (best.epoch, best.value, best.decoder['weight'].item()) == (3, 11.04, 3.0)
    restored = BestWeights()
    restored.load_state_dict({'epoch': 2, 'decoder': {}}, [{'stop_psnr': 10.0}, {'stop_psnr': 11.0}])
    assert restored.value == 11.0  # a checkpoint from before the value was stored: read from its history


# Random streams

def test_training_draws_never_repeat_a_held_out_images_test_draws():
    for epoch in range(4):
        training = training_draws(0, epoch, 0, CPU)
        test = held_out_draws([epoch], CPU)
        assert not torch.equal(torch.randn(8, generator=training.noise), torch.randn(8, generator=test.noise[0]))
        assert not torch.equal(torch.rand(8, generator=training.masks), torch.rand(8, generator=test.masks[0]))


def test_a_dropout_mask_does_not_depend_on_the_noise_drawn_before_it(tmp_path):
    attack, _ = build_attack(tiny_config(tmp_path, defence='dropout', defence_p=0.5), CPU)
    images = torch.rand(3, 3, 32, 32)
    quiet = attack.send(images, None, held_out_draws(range(3), CPU))
    noisy = attack.send(images, Noise('features', 0.0, 1.0), held_out_draws(range(3), CPU))
    dropped = noisy == 0  # the noise leaves no other zero
    assert 0.3 < dropped.float().mean() < 0.7 and torch.all(quiet[dropped] == 0)


def test_a_random_channel_subset_belongs_to_the_defence_not_the_attacker(tmp_path):
    def channels(**flags):
        config = tiny_config(tmp_path, keep_channels=0.25, channel_select='random', **flags)
        return build_attack(config, CPU, load_splits(config.data).calibration_images(16))[1].channel_indices
    assert channels(seed=0) == channels(seed=1)
    assert channels(victim_seed=0) != channels(victim_seed=1)


# Resuming a --minutes run

def test_a_minutes_run_interrupted_in_its_first_epoch_resumes_within_its_budget(tmp_path):
    args = ['--image_size', '32', '--batch_size', '8', '--num_batches', '60', '--decoder_depth', 'light',
            '--num_samples', '2', '--num_workers', '0', '--minutes', '0.02', '--scheduler', 'cosine']
    code, out, err = interrupt_training(tmp_path, signal.SIGINT, 'epoch 1/', *args, '--save_dir', 'cut')
    assert code == 130, out + err
    resumed = run_cli(tmp_path, '--resume', '--model_path', 'cut/interrupted.ckpt')
    budget = re.search(r'--minutes 0.02: the first epoch took [\d.]+s, so (\d+) epochs in all', resumed.stdout)
    metrics = read_json(tmp_path / 'cut' / 'metrics.json')
    assert budget and metrics['config']['num_epochs'] == len(metrics['history']) == int(budget[1])


# Records and help

def test_the_commit_counts_code_git_does_not_track(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c', 'user.email=t@t', *args], check=True,
                       capture_output=True)
    git('init', '-q')
    (tmp_path / 'tool.py').write_text('')
    git('add', 'tool.py')
    git('commit', '-q', '-m', 'one')
    monkeypatch.setattr(utils, 'TOOL_DIR', str(tmp_path))
    try:
        utils.tool_commit.cache_clear()  # asked once a process
        assert not utils.tool_commit().endswith('uncommitted changes')
        (tmp_path / 'new_defence.py').write_text('')
        utils.tool_commit.cache_clear()
        assert utils.tool_commit().endswith(' + uncommitted changes')
    finally:
        utils.tool_commit.cache_clear()  # the next test asks about the tool's own folder again


def test_deterministic_promises_no_bit_for_bit_gpu_runs():
    help_text = ' '.join(build_parser().format_help().split())
    assert 'GPU runs repeat more closely, but not bit for bit' in help_text
    assert 'runs repeat bit for bit on a GPU' not in help_text


def test_a_data_folder_says_the_image_size_it_defaults_to(tmp_path, capsys):
    root = write_photos(tmp_path / 'photos', ['a.png', 'b.png'])
    parser = build_parser()
    argv = ['--train', '--data_dir', str(root)]
    assert resolve_config(parser, parser.parse_args(argv), argv).config.data.image_size == 320
    assert 'image size: 320 px, the default with --data_dir' in capsys.readouterr().out


# Figures a newcomer reads right

def rows_of(count, **values):
    row = {'psnr': 12.0, 'psnr_std': 1.0, 'ssim': 0.3, 'ms_ssim': 0.4, 'psnr_ceiling': None, 'top1_agreement': 0.9,
           'top5_agreement': 1.0, 'baseline_psnr': 11.0, 'family': 'fixed', **values}
    return [dict(row, psnr=12.0 + 0.01 * i) for i in range(count)]


def test_figure_titles_promise_only_what_is_drawn(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(visualize, 'save_figure', lambda fig, path: drawn.append(fig))
    visualize.plot_sweep(rows_of(2), ['layer1', 'layer2'], 'split', 'decoder', 't', str(tmp_path / 's.png'))
    visualize.plot_sweep(rows_of(2), ['0.1', '0.2'], 'noise_var', 'decoder', 't', str(tmp_path / 's.png'))
    assert [fig.axes[0].get_title() for fig in drawn] == ['reconstruction quality', 'reconstruction vs victim utility']
    assert all('strongest baseline' in ' '.join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
               for fig in drawn)
    visualize.plot_privacy_utility(rows_of(1) + rows_of(1, family='trained'), ['1', '2'], 't', str(tmp_path / 'r.png'))
    assert drawn[-1].axes[0].get_title() == 'privacy vs utility'  # no family has two points: no frontier drawn
    visualize.plot_privacy_utility(rows_of(3), ['1', '2', '3'], 't', str(tmp_path / 'r.png'))
    assert "frontier" in drawn[-1].axes[0].get_title()
    offsets = [text.xyann for text in drawn[-1].axes[0].texts]
    assert len(set(offsets)) == 3  # close points' labels on different sides
    history = [{'epoch': e, 'train_loss': 0.1, 'val_loss': 0.05, 'psnr': 12.0, 'ssim': 0.3} for e in (1, 2)]
    visualize.plot_history(history, 't', str(tmp_path / 'l.png'), 'ssim')
    labels = [ax.get_ylabel() for ax in drawn[-1].axes]
    assert 'training loss (1 - SSIM)' in labels and 'validation MSE' in labels and 'loss' not in labels
    matplotlib.pyplot.close('all')


def test_a_figure_title_flags_by_the_number_of_images_it_scores():
    def per_image(n, attack_psnr):
        spread = torch.linspace(-1, 1, n)
        return {'psnr': attack_psnr + spread, 'mean_image_psnr': 12.0 + spread, 'mean_image_ssim': 0.1 + 0 * spread}
    title, _ = visualize.scored_title('t', per_image(20, 20.0))
    assert title == 't\nbaselines on these images: mean training image 12.00 dB'  # 20 images, far above: no flag
    title, _ = visualize.scored_title('t', per_image(4, 12.5))
    assert 'WARNING: scored on 4 images, fewer than 16' in title and 'WARNING: within the spread of the mean' in title


def test_a_setting_run_at_one_seed_shows_no_spread_over_seeds():
    from recon_attack.tables import over_seeds, seed_cells
    from test_measurement import evaluation
    assert '12.00 (one seed: no spread)' in seed_cells(over_seeds([evaluation(0, 12.0)]))
    assert '12.50 ± 0.71' in seed_cells(over_seeds([evaluation(0, 12.0), evaluation(1, 13.0)]))
