"""The fast paths compute what the plain ones do: torchrun/DDP, torch.compile, the benchmark's two loops."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_cli, tiny_config
from data import load_splits
from models import build_attack

TINY = ('--train', '--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '2',
        '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0')


def history(path):
    with open(path) as f:
        return json.load(f)['history']


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    run_cli(tmp_path, *TINY, '--save_dir', 'one')
    env = {**os.environ, 'RECON_CACHE_DIR': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(ROOT, 'main.py'), *TINY, '--save_dir', 'two'],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('epoch 2/2: train loss') == 1  # only rank 0 prints
    one, two = history(tmp_path / 'one' / 'metrics.json'), history(tmp_path / 'two' / 'metrics.json')
    # Not bit-identical: the CPU has no SyncBatchNorm, so each process normalises its half of the batch.
    for a, b in zip(one, two):
        assert b['val_loss'] == pytest.approx(a['val_loss'], rel=0.05)
        assert b['psnr'] == pytest.approx(a['psnr'], abs=0.25)
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=0.08)
    assert (tmp_path / 'two' / 'model.pth').is_file() and (tmp_path / 'two' / 'samples.png').is_file()


def test_compiled_training_step_matches_eager(tmp_path):
    cfg = tiny_config(tmp_path)
    splits = load_splits(cfg)
    images = splits.images[splits.train_idx[:16]]
    losses = []
    for compiled in (False, True):
        attack = build_attack({**cfg, 'compile': compiled}, torch.device('cpu'))
        attack.decoder.train()
        target = attack.to_images(images)
        losses.append(F.mse_loss(attack.decode(attack.send(target), training=True), target))
        losses[-1].backward()
        assert all(p.grad is not None for p in attack.decoder.parameters())
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-2)


def test_benchmark_runs_both_paths_and_checks_they_agree(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--image_size', '32', '--batch_size', '32',
                             '--epochs', '2', '--num_workers', '0', '--decoder_depth', 'light', '--save_dir', 'bench'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / 'bench' / 'bench.json') as f:
        bench = json.load(f)
    assert bench['first_batch_loss']['same'] and bench['first_batch_loss']['max_pixel_difference'] == 0
    assert bench['reference']['train_images_per_s'] > 0 and bench['tool']['train_images_per_s'] > 0
    assert bench['speedup'] == pytest.approx(bench['tool']['train_images_per_s'] / bench['reference']['train_images_per_s'])
    assert 'speed-up (tool / reference)' in result.stdout
