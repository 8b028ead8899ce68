"""Channel-subset and noise defences, the victim's utility under them, and sweeps."""
import csv
import os

import pytest
import torch

from conftest import run_cli, tiny_config
from data import load_splits
from evaluate import evaluate, summarise
from models import Noise, build_attack, keep_count, select_channels
from train import train
from utils import load_checkpoint

CPU = torch.device('cpu')


def test_keep_channels_is_a_fraction_or_a_count():
    assert keep_count(1, 128) == 128
    assert keep_count(0.25, 128) == 32
    assert keep_count(0.001, 128) == 1
    assert keep_count(24, 128) == 24


def test_channel_selection_rules():
    features = torch.randn(16, 8, 4, 4) * torch.tensor([1, 5, 2, 9, 1, 1, 7, 1.0]).view(1, 8, 1, 1)
    assert select_channels('first', 3, features) == [0, 1, 2]
    assert select_channels('topvar', 3, features) == [1, 3, 6]
    random_a, random_b = select_channels('random', 3, features, seed=1), select_channels('random', 3, features, seed=1)
    assert random_a == random_b and len(set(random_a)) == 3
    assert select_channels('random', 3, features, seed=2) != random_a


@pytest.mark.parametrize('how', ['random', 'topvar'])
def test_chosen_channels_are_deterministic_and_stored_in_the_checkpoint(tmp_path, how):
    runs = [tiny_config(tmp_path / str(i), num_epochs=1, keep_channels=0.25, channel_select=how) for i in range(2)]
    for cfg in runs:
        train(cfg, CPU)
    stored = [load_checkpoint(os.path.join(cfg['save_dir'], 'model.pth'))['config']['channel_indices'] for cfg in runs]
    assert stored[0] == stored[1] and len(stored[0]) == 32
    state = load_checkpoint(os.path.join(runs[0]['save_dir'], 'model.pth'))
    rebuilt = build_attack(state['config'], CPU)
    assert rebuilt.channel_mask.flatten().nonzero().flatten().tolist() == stored[0]


def test_dropped_channels_reach_the_server_as_exact_zeros(tmp_path):
    attack = build_attack(tiny_config(tmp_path), CPU)
    kept = [3, 17, 64]
    attack.keep_only(kept, 128)
    images = torch.rand(4, 3, 32, 32)
    noise = Noise('features', 0.5, 1.0)
    sent = attack.send(images, noise, attack.noise_generator(0))
    dropped = [c for c in range(128) if c not in kept]
    assert torch.count_nonzero(sent[:, dropped]) == 0
    assert torch.count_nonzero(sent[:, kept]) == sent[:, kept].numel()


def victim_utility(torch_home, monkeypatch, tmp_path, noise=None, **overrides):
    """The genuine mobilenet_v2's agreement on the built-in validation crops under a defence."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(torch_home / 'hub'))
    cfg = tiny_config(tmp_path, arch='mobilenet_v2', split='block6', pretrained=True, image_size=64, **overrides)
    splits = load_splits(cfg)
    return summarise(evaluate(build_attack(cfg, CPU), splits.images, splits.val_idx, 32, noise, utility=True))


def test_undefended_victim_agrees_with_itself(torch_home, monkeypatch, tmp_path):
    summary = victim_utility(torch_home, monkeypatch, tmp_path)
    assert summary['top1_agreement']['mean'] == 1.0 and summary['top5_agreement']['mean'] == 1.0
    assert summary['kl']['mean'] == pytest.approx(0, abs=1e-6)


def test_harsh_defences_cost_the_genuine_victim_its_predictions(torch_home, monkeypatch, tmp_path):
    summary = victim_utility(torch_home, monkeypatch, tmp_path, channel_indices=[0])
    assert summary['top1_agreement']['mean'] < 0.5 and summary['kl']['mean'] > 0.5
    noisy = victim_utility(torch_home, monkeypatch, tmp_path, noise=Noise('features', 0.0, 25.0))
    assert noisy['top1_agreement']['mean'] < 0.5


def test_a_sweep_writes_its_table_and_figures_and_resumes(tmp_path):
    args = ('--sweep', 'keep_channels', '--sweep_values', '1', '0.25', '--image_size', '32', '--batch_size', '16',
            '--num_batches', '22', '--num_epochs', '1', '--decoder_depth', 'light', '--num_samples', '2',
            '--num_workers', '0', '--save_dir', 'sweep')
    run_cli(tmp_path, *args)
    folder = tmp_path / 'sweep'
    for name in ('sweep.csv', 'sweep.md', 'sweep.png', 'sweep_samples.png'):
        assert (folder / name).is_file(), name
    with open(folder / 'sweep.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['keep_channels'] for r in rows] == ['1', '0.25']
    assert [int(r['channels_sent']) for r in rows] == [128, 32]
    assert '| keep_channels | tensor | channels sent | PSNR (dB)' in (folder / 'sweep.md').read_text()

    first_model = (folder / 'keep_channels=1' / 'model.pth').read_bytes()
    os.remove(folder / 'keep_channels=0.25' / 'eval.json')  # as if the sweep had been stopped during that value
    result = run_cli(tmp_path, *args)
    assert 'sweep keep_channels 1/2: 1 already done' in result.stdout
    assert 'sweep keep_channels 2/2: keep_channels=0.25' in result.stdout
    assert (folder / 'keep_channels=1' / 'model.pth').read_bytes() == first_model
    with open(folder / 'sweep.csv') as f:
        assert [r['psnr'] for r in csv.DictReader(f)][0] == rows[0]['psnr']
