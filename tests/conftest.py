import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch.set_num_threads(2)


def tiny_config(tmp_path, **overrides):
    """A complete configuration for a seconds-long run on the built-in data."""
    from main import build_parser, resolve_config
    argv = ['--train', '--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '2',
            '--decoder_depth', 'light', '--save_dir', str(tmp_path / 'run'), '--cache_dir', str(tmp_path / 'cache'),
            '--num_workers', '0']
    parser = build_parser()
    cfg, _ = resolve_config(parser, parser.parse_args(argv), argv)
    cfg.update(overrides)
    return cfg


def run_cli(cwd, *args, check=True):
    """Runs main.py in a subprocess in `cwd` (decode cache under it); returns the CompletedProcess."""
    env = {**os.environ, 'RECON_CACHE_DIR': os.path.join(cwd, 'cache'), 'OMP_NUM_THREADS': '2'}
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f'exit {result.returncode}\n{result.stdout}\n{result.stderr}')
    return result


@pytest.fixture
def cli(tmp_path):
    return lambda *args, check=True: run_cli(tmp_path, *args, check=check)
