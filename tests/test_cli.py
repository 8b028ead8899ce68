"""The command-line flows, run as a user runs them: main.py as a script for the first run, then its command line."""
import csv
import json
import os
import subprocess

import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT, run_cli, run_script, tiny_config
from recon_attack import cut
from recon_attack.attacks import SplitAttack, build_attack
from recon_attack.visualize import capture_decoder_activations

TINY = ('--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--decoder_depth', 'light',
        '--num_samples', '3', '--num_workers', '0')
CPU = torch.device('cpu')
FIGURES = ('loss.png', 'samples.png', 'feature_maps.png', 'decoder_layers.png', 'psnr_hist.png')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder holding one 2-epoch training run in run/ (a checkpoint after every epoch)."""
    cwd = tmp_path_factory.mktemp('cli')
    result = run_script(cwd, '--train', *TINY, '--num_epochs', '2', '--log_interval', '1', '--save_dir', 'run')
    assert f'outputs written to {cwd / "run"}' in result.stdout
    return cwd


def history(path):
    with open(path) as f:
        return json.load(f)['history']


def assert_valid_png(path, min_side=100):
    with Image.open(path) as image:
        assert image.format == 'PNG'
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= min_side, (path, image.size)


def test_train_writes_checkpoints_metrics_and_figures(workdir):
    run = workdir / 'run'
    for name in ('metrics.json', 'ckpt_1.ckpt', 'ckpt_2.ckpt', 'model.pth'):
        assert (run / name).is_file(), name
    assert [h['epoch'] for h in history(run / 'metrics.json')] == [1, 2]
    for name in FIGURES:
        assert_valid_png(run / name)
    samples = sorted(os.listdir(run / 'samples'))
    assert len(samples) == 6 and all(n.endswith(('_original.png', '_reconstruction.png')) for n in samples)
    for name in samples:
        assert_valid_png(run / 'samples' / name, min_side=32)


@pytest.mark.parametrize('filename', ['model.pth', 'ckpt_2.ckpt'])
def test_evaluation_reproduces_the_final_validation_metrics(workdir, filename):
    out = f'eval_{filename}'
    result = run_cli(workdir, '--eval', '--model_path', f'run/{filename}', '--save_dir', out)
    assert 'PSNR' in result.stdout and 'MS-SSIM: 2 of 5 scales at 32px' in result.stdout
    with open(workdir / out / 'eval.json') as f:
        evaluation = json.load(f)
    final = history(workdir / 'run' / 'metrics.json')[-1]
    assert evaluation['metrics']['psnr']['mean'] == pytest.approx(final['psnr'], abs=1e-4)
    assert evaluation['metrics']['ssim']['mean'] == pytest.approx(final['ssim'], abs=1e-5)
    assert evaluation['metrics']['mse']['mean'] == pytest.approx(final['val_loss'], rel=1e-5)
    assert evaluation['precision'] == SplitAttack(cut('resnet18', 'layer2'), None, CPU, bf16=True).precision
    made, head = evaluation['provenance'], subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short=12', 'HEAD'],
                                                          capture_output=True, text=True)
    assert made['commit'].startswith(head.stdout.strip() if head.returncode == 0 else 'unknown (not a git checkout)')
    assert made['torch'] == f'torch {torch.__version__}, torchvision {torchvision.__version__}'
    # the same held-out images as the evaluation at the end of training: one content fingerprint, however reached
    assert evaluation['held_out'] == json.loads((workdir / 'run' / 'eval.json').read_text())['held_out']
    with open(workdir / out / 'eval_per_image.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == evaluation['n_images'] == 32
    assert sum(float(r['psnr']) for r in rows) / 32 == pytest.approx(final['psnr'], abs=1e-3)


def test_resume_accepts_flags_that_agree_with_the_checkpoint_or_only_change_how_it_runs(workdir):
    run_cli(workdir, '--resume', '--model_path', 'run/ckpt_1.ckpt', '--lr', '0.001', '--batch_size', '16',
            '--log_interval', '1', '--save_dir', 'resumed_same')
    assert (workdir / 'resumed_same' / 'ckpt_2.ckpt').is_file()


def test_deterministic_turns_on_deterministic_kernels(tmp_path, monkeypatch, main_here):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        assert main_here(tmp_path, '--attack', 'optimize', '--attack_steps', '1', *TINY, '--deterministic',
                         '--save_dir', 'det').returncode == 0
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_resume_from_epoch_one_matches_the_uninterrupted_run(workdir):
    run_cli(workdir, '--resume', '--model_path', 'run/ckpt_1.ckpt', '--save_dir', 'resumed')
    uninterrupted, resumed = history(workdir / 'run' / 'metrics.json'), history(workdir / 'resumed' / 'metrics.json')
    assert [h['epoch'] for h in resumed] == [1, 2]
    for key in ('train_loss', 'val_loss', 'psnr', 'ssim'):
        assert resumed[1][key] == pytest.approx(uninterrupted[1][key], rel=1e-5), key


@pytest.mark.parametrize('filename', ['model.pth', 'ckpt_1.ckpt'])
def test_visualize_from_pth_and_ckpt(workdir, filename):
    out = workdir / f'figures_{filename}'
    result = run_cli(workdir, '--visualize', '--model_path', f'run/{filename}', '--save_dir', out, '--test_noise')
    for name in FIGURES:
        assert_valid_png(out / name)
    written = os.listdir(out / 'samples')  # one reconstruction an image: from the tensor the evaluation scores
    assert sum(n.endswith('_reconstruction.png') for n in written) == 8  # --num_samples: this command's default
    assert sum(n.endswith('_original.png') for n in written) == 8
    assert str(out) in result.stdout


def test_decoder_hooks_are_removed_after_capturing(tmp_path):
    attack, _ = build_attack(tiny_config(tmp_path), torch.device('cpu'))
    activations = capture_decoder_activations(attack, attack.send(torch.rand(1, 3, 32, 32))[0])
    assert len(activations) == len(attack.decoder.stages) + 1
    assert activations[-1].shape == (3, 32, 32)
    assert all(not m._forward_hooks for m in attack.decoder.modules())


def test_running_the_main_command_twice_keeps_the_first_run(workdir):
    before = (workdir / 'run' / 'model.pth').read_bytes()
    result = run_cli(workdir, '--train', *TINY, '--num_epochs', '1', '--save_dir', 'run')
    assert 'run already holds a run: writing to run_1' in result.stdout
    assert (workdir / 'run_1' / 'model.pth').is_file()
    assert (workdir / 'run' / 'model.pth').read_bytes() == before


@pytest.mark.parametrize('args, message', [
    (('--train', '--split', 'layer9'), "invalid choice for resnet18: 'layer9' (choose from layer1, layer2"),
    (('--train', '--eval'), 'choose exactly one of'),
    (('--eval', '--model_path', 'missing.pth'), 'missing.pth: no such file'),
    (('--eval', '--model_path', 'run/model.pth', '--arch', 'resnet50'),
     '--arch resnet50 contradicts the checkpoint run/model.pth, trained with arch=resnet18'),
    (('--resume', '--model_path', 'run/model.pth'), '--resume needs a training checkpoint'),
    (('--train', '--batch_size', '0'), '--batch_size: must be at least 1'),
    (('--train', '--arch', 'vit_b_16', '--image_size', '40'),
     'vit_b_16 does not run at 40 px (AssertionError: Input shape indivisible by patch size!); it runs at 32, 64'),
    (('--train', '--keep_channels', '500'), '--keep_channels: resnet18 cut at layer2 sends only 128 channels, got 500'),
    (('--sweep', 'split', '--sweep_values', 'layer1', 'block3'), 'block3 not a split of resnet18'),
    (('--train', '--sweep_values', '1'), '--sweep_values needs --sweep'),
    (('--resume', '--model_path', 'run/ckpt_1.ckpt', '--lr', '0.1'),
     '--lr 0.1 contradicts the checkpoint run/ckpt_1.ckpt, trained with lr=0.001; --resume goes on as the run was'),
    (('--resume', '--model_path', 'run/ckpt_1.ckpt', '--data_dir', 'elsewhere'), '--data_dir elsewhere contradicts'),
    (('--resume', '--model_path', 'run/ckpt_1.ckpt', '--batch_size', '8'), '--batch_size 8 contradicts'),
    (('--eval', '--model_path', 'run/model.pth', '--eval_split', 'test'),
     '--eval_split test: the built-in photos has no list_eval_partition.txt'),
    (('--train', '--eval_split', 'test'), '--eval_split is for --eval and --visualize'),
    (('--train', '--fil_probes', '1'), '--fil_probes: at least 2'),
    (('--train', '--noise_for_bound', '15', '--test_noise_var', '0.1'),
     '--noise_for_bound sets the noise on the tensor itself (the run\'s own): drop --test_noise_var'),
    (('--train', '--noise_snr', '10', '--noise_var', '0.1'), '--noise_snr sets the noise on the tensor itself'),
    (('--train', '--noise_for_bound', 'nan'), '--noise_for_bound: a PSNR ceiling in dB, got nan'),
    (('--sweep', 'noise_for_bound', '--sweep_values', 'inf'), 'a PSNR ceiling in dB, got inf'),
    (('--train', '--bound_quantile', '0.9'), '--bound_quantile: it sets how --noise_for_bound calibrates'),
    (('--train', '--noise_for_bound', '15', '--bound_quantile', '1.5'), '--bound_quantile: a share in (0, 1), got 1.5'),
    (('--train', '--noise_snr', '10', '--noise_for_bound', '15'), '--noise_for_bound sets the noise too; choose one'),
    (('--train', '--prior_sigma', '0'), '--prior_sigma: a positive std, got 0'),
    (('--train', '--nosie_var', '0.1'), '--nosie_var: did you mean --noise_var'),
    (('--train', '--defence', 'nopeek'), 'nopeek is a trained defence: --train_defence nopeek fine-tunes the victim'),
])
def test_bad_flags_exit_2_with_one_line(workdir, main_here, args, message):
    result = main_here(workdir, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert 'Traceback' not in result.stderr
