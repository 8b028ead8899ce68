"""docs/extending.md's example, run as written: its defence pasted into a copy of the tool works end to end."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

from conftest import ROOT, THREADS

DOC = pathlib.Path(ROOT) / 'docs' / 'extending.md'
ANCHOR = 'KEEP_CHANNELS = KeepChannels()\n'
REGISTRY = re.compile(r'DEFENCES = \{d\.name: d for d in \(.*?\)\}\n', re.S)

CHECK = '''
import contextlib, io, pathlib, torch
import main
from conftest import tiny_config
from data import load_splits
from defences import build_attack, check_flags
from utils import UsageError
cfg = tiny_config(pathlib.Path('.'), defence='quantise', quantise_bits=2)
check_flags(cfg)
splits = load_splits(cfg)
attack = build_attack(cfg, torch.device('cpu'), splits.calibration_images(16))
sent = attack.send(attack.to_images(splits.images[:8]))
levels = [row.unique().numel() for row in sent.flatten(1)]
clean = attack.encode(attack.to_images(splits.images[:8]))
assert max(levels) <= 4 and min(levels) >= 2 and not torch.equal(sent, clean), levels
try:
    check_flags({**cfg, 'quantise_bits': 0})
except UsageError as e:
    print('refused:', e)
main.main(['--train', '--defence', 'quantise', '--quantise_bits', '2', '--image_size', '32', '--batch_size', '16',
           '--num_batches', '6', '--num_epochs', '1', '--decoder_depth', 'light', '--num_samples', '2',
           '--num_workers', '0', '--save_dir', 'run'])
main.main(['--report', 'run', '--save_dir', 'report'])
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    main.main(['--help'])
print('help:', ' '.join(help_text.getvalue().split()))
'''


def python_blocks(text):
    return re.findall(r'```python\n(.*?)```', text, re.S)


def test_the_documented_defence_runs_end_to_end(tmp_path):
    new_class, registry = python_blocks(DOC.read_text())
    copy = tmp_path / 'tool'
    shutil.copytree(pathlib.Path(ROOT), copy, ignore=shutil.ignore_patterns('.git', 'runs', 'results', '__pycache__'))
    source = (copy / 'defences.py').read_text()
    assert source.count(ANCHOR) == 1 and len(REGISTRY.findall(source)) == 1, 'docs/extending.md names what is gone'
    source = source.replace(ANCHOR, new_class + '\n\n' + ANCHOR)
    (copy / 'defences.py').write_text(REGISTRY.sub(registry.replace('\\', '\\\\'), source))

    env = {'RECON_CACHE_DIR': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': str(THREADS), 'PATH': '/usr/bin:/bin',
           'PYTHONPATH': f'{copy}:{copy / "tests"}'}
    checked = subprocess.run([sys.executable, '-c', CHECK], cwd=copy, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert 'refused: argument --quantise_bits: between 1 and 16 bits, got 0' in checked.stdout
    evaluation = json.loads((copy / 'run' / 'eval.json').read_text())
    assert evaluation['config']['defence'] == 'quantise' and evaluation['metrics']['kl']['mean'] > 0  # charged
    assert evaluation['provenance']['commit'] == 'unknown (not a git checkout)'  # a copy without .git says so
    assert 'quantised to 2 bits' in (copy / 'report' / 'report.md').read_text()  # tables name it
    assert 'quantise: round each sample to 2^--quantise_bits levels' in checked.stdout  # --help lists it
