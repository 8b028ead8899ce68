"""The fast paths compute what the plain ones do: torchrun/DDP, torch.compile, the benchmark's two loops."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn.functional as F

import bench as bench_module
from conftest import ROOT, run_cli, tiny_config
from recon_attack import cli
from recon_attack.attacks import build_attack
from recon_attack.data import fingerprint, load_splits
from recon_attack.records import with_flags
from recon_attack.utils import Interrupted

TINY = ('--train', '--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '2',
        '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0')


def history(path):
    with open(path) as f:
        return json.load(f)['history']


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # A decoder with group norm: batch norm would normalise each process's half of the batch on its own (the CPU has
    # no SyncBatchNorm), and two epochs amplify that to several per cent; group norm leaves only summation order.
    args = (*TINY, '--decoder', 'residual', '--decoder_norm', 'group')
    run_cli(tmp_path, *args, '--save_dir', 'one')
    env = {**os.environ, 'RECON_CACHE_DIR': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(ROOT, 'main.py'), *args, '--save_dir', 'two'],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('epoch 2/2: train loss') == 1  # only rank 0 prints
    one, two = history(tmp_path / 'one' / 'metrics.json'), history(tmp_path / 'two' / 'metrics.json')
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):  # the same steps on the same global batches, summed in another order
        assert b['val_loss'] == pytest.approx(a['val_loss'], rel=5e-3)
        assert b['psnr'] == pytest.approx(a['psnr'], abs=0.02)
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=5e-3)
    assert (tmp_path / 'two' / 'model.pth').is_file() and (tmp_path / 'two' / 'samples.png').is_file()


def test_compiled_training_step_matches_eager(tmp_path):
    cfg = tiny_config(tmp_path)
    splits = load_splits(cfg.data)
    images = splits.images[splits.train_idx[:16]]
    losses = []
    for compiled in (False, True):
        attack, _ = build_attack(with_flags(cfg, compile=compiled), torch.device('cpu'))
        attack.decoder.train()
        target = attack.to_images(images)
        losses.append(F.mse_loss(attack.decode(attack.send(target), training=True), target))
        losses[-1].backward()
        assert all(p.grad is not None for p in attack.decoder.parameters())
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-2)


def test_benchmark_runs_both_paths_and_checks_they_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bench_module.main(['--image_size', '32', '--batch_size', '32', '--epochs', '3', '--num_workers', '0',
                       '--decoder_depth', 'light', '--save_dir', 'bench'])
    with open(tmp_path / 'bench' / 'bench.json') as f:
        bench = json.load(f)
    assert bench['first_batch_loss']['same'] and bench['first_batch_loss']['max_pixel_difference'] == 0
    trained_on = bench['settings']['train_images'] // 32 * 32  # full batches only, on both paths
    rates = {}
    for path in ('reference', 'tool'):
        epochs = bench[path]['epochs']
        assert epochs['images'] == [trained_on, trained_on], path  # the warm-up epoch is not timed
        rates[path] = float(np.median([n / s for n, s in zip(epochs['images'], epochs['seconds'])]))
        assert bench[path]['train_images_per_s'] == pytest.approx(rates[path])
    assert bench['speedup'] == pytest.approx(rates['tool'] / rates['reference'])
    assert 'speed-up (tool / reference)' in capsys.readouterr().out


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rank_process(rank, world, port, cwd, argv, stop_at_check):
    """One torchrun-like process: main.py's run in this process, recording which training images it stepped on
    (by content) into batches_rank{rank}.json; with `stop_at_check`, a stop is requested at that stop check, as
    Ctrl-C would, on every process at once."""
    from recon_attack import train as train_module
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port), RECON_CACHE_DIR=os.path.join(cwd, 'cache'))
    torch.set_num_threads(1)
    os.chdir(cwd)
    batches, real_loss = [], train_module.training_loss

    def recording_loss(attack, recon, images, sent, activations, training):
        batches.append([fingerprint((image * 255).round().to(torch.uint8).cpu()) for image in images])
        return real_loss(attack, recon, images, sent, activations, training)
    train_module.training_loss = recording_loss

    class StopAt(train_module.StopRequest):
        checks = 0

        def requested(self, step=0):
            StopAt.checks += 1
            if StopAt.checks == stop_at_check:
                self.signal = 'SIGTERM'
            return self.signal is not None
    train_module.StopRequest = StopAt
    try:
        cli.run(argv)
    except Interrupted:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(cwd, f'batches_rank{rank}.json'), 'w') as f:
        json.dump(batches, f)


def run_processes(cwd, world, argv, stop_at_check=None):
    """`world` processes of main.py's run (gloo on the CPU); returns each one's training batches."""
    torch.multiprocessing.start_processes(rank_process, args=(world, free_port(), str(cwd), argv, stop_at_check),
                                          nprocs=world, start_method='spawn')
    batches = []
    for rank in range(world):
        with open(cwd / f'batches_rank{rank}.json') as f:
            batches.append(json.load(f))
    return batches


def test_ranks_split_each_batch_and_resume_with_their_own_noise(tmp_path, monkeypatch, capsys):
    """Input noise (--train_noise) and dropout both draw from each process's own generator: a run stopped mid-epoch
    under two processes must resume to the uninterrupted run's figures exactly."""
    args = (*TINY, '--train_noise', '--noise_var', '0.02', '--defence', 'dropout', '--defence_p', '0.2',
            '--log_interval', '1')
    whole = run_processes(tmp_path, 2, [*args, '--save_dir', 'whole'])
    alone = run_processes(tmp_path, 1, [*args, '--save_dir', 'alone'])[0]
    assert len(whole[0]) == len(whole[1]) == len(alone) == 40  # 20 steps in each of the 2 epochs
    for step, (first, second, batch) in enumerate(zip(whole[0], whole[1], alone)):
        assert len(first) == len(second) == 8 and not set(first) & set(second), step
        assert set(first) | set(second) == set(batch), step

    run_processes(tmp_path, 2, [*args, '--save_dir', 'cut'], stop_at_check=25)  # epoch 2, after its 5th step
    stopped = torch.load(tmp_path / 'cut' / 'interrupted.ckpt', weights_only=True)['partial_epoch']
    assert stopped['step'] == 5 and len(stopped['processes']) == 2
    assert not torch.equal(stopped['processes'][0]['noise_rng'], stopped['processes'][1]['noise_rng'])
    run_processes(tmp_path, 2, ['--resume', '--model_path', 'cut/interrupted.ckpt'])
    for key in ('train_loss', 'val_loss', 'psnr', 'ssim'):
        assert [h[key] for h in history(tmp_path / 'cut' / 'metrics.json')] == pytest.approx(
            [h[key] for h in history(tmp_path / 'whole' / 'metrics.json')], rel=1e-6), key

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(['--resume', '--model_path', 'cut/interrupted.ckpt', '--cache_dir', str(tmp_path / 'cache')])
    assert 'stopped mid-epoch by 2 process(es): resume it with torchrun --nproc_per_node 2' in capsys.readouterr().err
