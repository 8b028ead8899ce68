"""Small shared helpers: errors the CLI reports in one line, atomic file writes, devices, where a result was made, run
folders, progress bars."""
import csv
import datetime
import functools
import io
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
import torchvision
from tqdm import tqdm

from .distributed import is_main_process, rank_and_world

TOOL_DIR = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
    """Bad input the user can fix: main prints it on one line and exits with status 2."""


class RunError(Exception):
    """A run that cannot go on (non-finite loss, out of memory): one line, exit status 1."""
    exit_code = 1


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: training stopped after a step and saved where it was; exit status 130."""
    exit_code = 130


def to_unit(uint8_images):
    """uint8 images (0-255) as float32 in [0, 1], the range every model and metric here works in."""
    return uint8_images.float().div_(255)


def atomic_write_bytes(path, data):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a truncated file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_torch(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_json(obj, path):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + '\n').encode())


def read_json(path):
    """The JSON file's content, or None where it is missing or unreadable (a run that did not finish)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_csv(rows, path):
    """rows: a list of dicts sharing the same keys."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())


def pick_device(name):
    """The device to run on; under torchrun, this process's GPU (LOCAL_RANK)."""
    if name == 'cpu' or (name == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        print('warning: --device cuda asked for, but CUDA is not available: running on the CPU')
        return torch.device('cpu')
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    torch.cuda.set_device(device)
    return device


def make_deterministic():
    """Deterministic kernels on CUDA too (the CPU's are already). cuBLAS needs its workspace setting before its
    first use; an operation that has no deterministic CUDA kernel (bicubic upsampling's and adaptive pooling's
    backward) makes PyTorch warn instead of failing the run."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def processor():
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform reports)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def tool_commit():
    """The tool's git commit (12 digits, '+ uncommitted changes' where tracked files differ from it or code that
    git does not track is in the checkout: a new .py file, anything new in the package), or why there is none."""
    def git(*args):
        return subprocess.run(['git', '-C', TOOL_DIR, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git('rev-parse', '--short=12', 'HEAD')
        changed = git('status', '--porcelain', '--untracked-files=no') or git(
            'ls-files', '--others', '--exclude-standard', '--', '*.py', 'recon_attack')
        return commit + (' + uncommitted changes' if changed else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown (not a git checkout)'


def provenance(device):
    """Where and with what a result was made, for its record and the tables built from it: the machine (GPU or
    CPU, processes), the library versions, the tool's commit and the time (UTC)."""
    if device.type == 'cuda':
        machine = f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    else:
        machine = f'{processor()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads'
    if rank_and_world()[1] > 1:
        machine += f', {rank_and_world()[1]} processes'
    return {'machine': machine, 'torch': f'torch {torch.__version__}, torchvision {torchvision.__version__}',
            'commit': tool_commit(),
            'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def progress(iterable, desc, unit='batch'):
    """The progress bar of every long loop (rank 0's only); where stderr is a file, not a terminal, one plain line
    as the loop starts instead of the bar's redraws, which would bury the log."""
    if sys.stderr.isatty() or not is_main_process():
        return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not is_main_process())
    return PlainProgress(iterable, desc, unit)


class PlainProgress:
    """What `progress` gives a log file: the loop's name and length, once (tqdm's interface, its redraws left out)."""

    def __init__(self, iterable, desc, unit):
        self.iterable = iterable
        plural = unit + ('es' if unit.endswith(('ch', 'sh', 's', 'x')) else 's')
        count = f' ({len(iterable)} {plural})' if hasattr(iterable, '__len__') else ''
        print(f'{desc}{count}', file=sys.stderr, flush=True)

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix(self, **values):
        """The bar's running figures: a log file gets the loop's result from the line after it instead."""


def fresh_run_dir(save_dir):
    """`save_dir` if it holds no earlier run, else the first free `save_dir_N` beside it."""
    if not os.path.exists(save_dir) or not os.listdir(save_dir):
        return save_dir
    n = 1
    while os.path.exists(f'{save_dir.rstrip(os.sep)}_{n}'):
        n += 1
    return f'{save_dir.rstrip(os.sep)}_{n}'
