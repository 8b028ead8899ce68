"""Small shared helpers: errors the CLI reports in one line, atomic file writes, devices, run folders."""
import argparse
import csv
import datetime
import functools
import io
import json
import os
import platform
import re
import subprocess
import tempfile

import torch
import torch.distributed as dist
import torchvision
from tqdm import tqdm


TOOL_DIR = os.path.dirname(os.path.abspath(__file__))

# Settings of how a run is carried out, not of what it computes: they may differ from a checkpoint's (resume,
# evaluation) and between a sweep and its resume. COMMAND_KEYS always come from the command at hand (a loaded
# checkpoint never sets them); the rest of RUN_KEYS from the checkpoint unless given.
COMMAND_KEYS = frozenset({'mode', 'model_path', 'device', 'save_dir', 'overwrite', 'num_samples', 'num_workers',
                          'cache_dir', 'eval_split'})
RUN_KEYS = COMMAND_KEYS | {'feature_cache_gb', 'log_interval', 'compile', 'deterministic', 'tensorboard'}
# What a run derives and writes into its configuration itself (never a flag).
DERIVED_KEYS = ('channel_indices', 'victim_fingerprint', 'victim_defence', 'sent_shape', 'bound_calibration')
# Not settings of what a run computes: compared by neither a sweep's resume nor a report.
NOT_SETTINGS = RUN_KEYS | set(DERIVED_KEYS) | {'sweep_values', 'seeds'}


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


def setting(group, flag, help, dest=None):
    """An on / off flag: `--flag` and `--no-flag`, so a flag after a preset (@FILE) can turn its setting off."""
    group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=False, help=help)


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
    """The tool's git commit (12 digits, '+ uncommitted changes' where tracked files differ from it), or why there
    is none."""
    def git(*args):
        return subprocess.run(['git', '-C', TOOL_DIR, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git('rev-parse', '--short=12', 'HEAD')
        return commit + (' + uncommitted changes' if git('status', '--porcelain', '--untracked-files=no') else '')
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


def init_distributed(device):
    """One process per GPU under torchrun (gloo on the CPU); returns False when not launched by torchrun."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return False
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                            device_id=device if device.type == 'cuda' else None)
    return True


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def same_on_all_processes(value):
    """Rank 0's `value` in every torchrun process (e.g. a run folder chosen by looking at the disk)."""
    if rank_and_world()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def is_main_process():
    """Only rank 0 prints, writes checkpoints and draws."""
    return rank_and_world()[0] == 0


def progress(iterable, desc, unit='batch'):
    """The progress bar of every long loop (rank 0's only)."""
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not is_main_process())


def fresh_run_dir(save_dir):
    """`save_dir` if it holds no earlier run, else the first free `save_dir_N` beside it."""
    if not os.path.exists(save_dir) or not os.listdir(save_dir):
        return save_dir
    n = 1
    while os.path.exists(f'{save_dir.rstrip(os.sep)}_{n}'):
        n += 1
    return f'{save_dir.rstrip(os.sep)}_{n}'


# Settings added by format 3 and the values that reproduce what a format-2 checkpoint's run did.
FORMAT_2_SETTINGS = {'decoder': 'original', 'decoder_width': None, 'decoder_blocks': None, 'decoder_norm': 'none',
                     'feature_weight': 0.0, 'loss': 'mse', 'augment': False, 'ema': 0.0, 'warmup_epochs': 0.0,
                     'minutes': None}


# Renamed flags (config keys), old -> new: the old flag still works with a notice, and checkpoints, eval jsons and
# presets written with the old name still load.
RENAMED_FLAGS = {'aug': 'train_noise', 'defend': 'train_defence', 'eval_pth': 'eval', 'eval_ckpt': 'eval'}
# Renamed values of a flag, old -> new, read the same way.
RENAMED_VALUES = {'interpolation': {'upsample': 'bicubic'}}


def renamed_value(key, value):
    return RENAMED_VALUES.get(key, {}).get(value, value) if isinstance(value, str) else value


def current_config(config):
    """A configuration as this version names it: one written under a renamed flag or value, or before --split_seed
    and --victim_seed (checkpoint formats 2 and 3, their eval jsons: --seed seeded the split and the random victim
    too), read as it was meant."""
    current = {}
    for key, value in config.items():
        key = RENAMED_FLAGS.get(key, key)
        if key == 'eval':  # --eval_pth and --eval_ckpt were one mode: either one switched on is --eval
            current[key] = value or current.get(key, False)
        else:
            current[key] = renamed_value(key, value)
    if 'mode' in current:
        current['mode'] = RENAMED_FLAGS.get(current['mode'], current['mode'])
    return {'split_seed': config.get('seed', 0), 'victim_seed': config.get('seed', 0), **current}


def load_checkpoint(path, need_optimizer=False):
    """A recon-attack checkpoint, loaded with weights_only=True: files from others are untrusted."""
    if not os.path.isfile(path):
        raise UsageError(f'--model_path {path}: no such file')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if unsafe:  # a pickle that names Python objects to build: it could run anything
            raise UsageError(f'--model_path {path}: refused as unsafe: it asks to build the Python object '
                             f'{unsafe.group(1)}, and loading it could run code from the file; weights_only=True '
                             f'accepts only tensors and plain data') from None
        raise UsageError(f'--model_path {path}: not a checkpoint (not written by torch.save, or damaged)') from None
    if not isinstance(state, dict) or not {'config', 'decoder'} <= set(state):
        raise UsageError(f'--model_path {path}: not a recon-attack checkpoint (no config and decoder inside)')
    if 'data' not in state:
        raise UsageError(f'--model_path {path}: written by an older recon-attack that did not record which images it '
                         f'trained on, so none can be scored as held out; train it again')
    if state.get('format') == 'recon-attack/2':
        state['config'] = {**FORMAT_2_SETTINGS, **state['config']}
    state['config'] = current_config(state['config'])
    if need_optimizer and 'optimizer' not in state:
        raise UsageError(f'--model_path {path}: holds no optimizer state (a model.pth); resume from a ckpt_N.ckpt')
    return state
